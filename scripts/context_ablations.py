"""Why a compressed context loses a needle of an unfamiliar wording: two selections nobody can use.

Both replace the context scorer's selection (``allocate_globally``) after a prefill that keeps
every token, on needle prompts of a development wording (``scripts/context_selection_dev.py``'s
WORDINGS), and answer as ``uncomp generate --context-file`` would:

* ``heads``: whole KV heads instead of tokens (DuoAttention/RazorAttention's idea). Each KV head's
  copy score is measured on the built-in calibration text (a span of a window repeated after it:
  the attention a head pays, while the span is repeated, to the token being copied — Wu et al.'s
  retrieval score); the heads with the highest keep every token, the rest their 4 sinks and last
  8 tokens, the method's total budget unchanged.
* ``needle``: an oracle — the needle sentence (its value, the 16 tokens before it and the 2 after
  it: the full stop) in every head, the rest of each head's budget the most recent tokens.
  Without the full stop the answer runs on into more digits ("55129866888").

  python scripts/context_ablations.py --haystack ../shared/data/haystack --keep heads --budgets 10%,25%,50%,90%
  python scripts/context_ablations.py --haystack ../shared/data/haystack --keep needle --budgets 10%,5%
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from context_selection_dev import WORDINGS

from uncomp_cli.contexts import compress
from uncomp_cli.contexts.compress import SINKS, ask_ids, compress_ids
from uncomp_cli.engine.generation import GenerationSettings
from uncomp_cli.engine.selection import PRUNE_WINDOW
from uncomp_cli.eval import needle
from uncomp_cli.eval.metrics import METRICS
from uncomp_cli.haystack import load_haystack
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import template_tail
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.profile.calibration_text import builtin_texts, token_windows


def copy_scores(loaded, samples: int = 8, seq_len: int = 1024, spans: int = 4, span_len: int = 24) -> torch.Tensor:
    """[L, H_kv]: per KV head (its best query head), the mean attention paid to the token being
    copied while spans of a built-in window are repeated after it."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    windows = token_windows(builtin_texts(seq_len * samples, tokenizer), tokenizer, samples, seq_len).input_ids
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    mass, count, rng = torch.zeros(layers, heads), 0, random.Random(0)
    try:
        for row in windows.tolist():
            ids, sources = list(row), []
            for start in sorted(rng.sample(range(16, seq_len - span_len - 16, span_len), spans)):
                sources += [(len(ids) + j, start + j) for j in range(2, span_len)]  # the first two: not copies yet
                ids += row[start:start + span_len]
            with torch.inference_mode():
                attentions = model(torch.tensor([ids]), output_attentions=True).attentions
            for position, source in sources:
                for layer, attention in enumerate(attentions):
                    mass[layer] += attention[0, :, position - 1, source].float()
                count += 1
    finally:
        model.set_attn_implementation(previous)
    return (mass / count).view(layers, kv_heads, heads // kv_heads).amax(-1)


def value_positions(tokenizer, ids: list[int], value: str) -> list[int]:
    pieces = [tokenizer.decode([t]).strip() for t in ids]
    for start in range(len(pieces)):
        text = ""
        for end in range(start, min(start + 16, len(pieces))):
            text += pieces[end]
            if text == value:
                return list(range(start, end + 1))
            if not value.startswith(text):
                break
    raise SystemExit(f"value {value} not found in the context")


def keep_heads(order: list[int], kv_heads: int):
    def allocate(layers, recorded, **_):
        n = recorded[0].shape[-1]
        total = sum(min(int(b), n) for layer in layers for b in layer.budgets)
        keep = torch.full((len(layers) * kv_heads,), min(n, SINKS + PRUNE_WINDOW))
        rest = total - int(keep.sum())
        for index in order:
            give = min(rest, n - int(keep[index]))
            keep[index] += give
            rest -= give
        recency = torch.arange(n, dtype=torch.float32).expand(1, kv_heads, n).clone()
        recency[..., :SINKS] = float("inf")  # the sinks, then the most recent tokens
        for layer_index, layer in enumerate(layers):
            layer.select(recency.clone(), PRUNE_WINDOW, keep.view(len(layers), kv_heads)[layer_index].tolist())
    return allocate


def keep_needle(span: list[int], before: int = 16, after: int = 2):
    def allocate(layers, recorded, **_):
        n = recorded[0].shape[-1]
        for layer, scores in zip(layers, recorded):
            ranked = torch.arange(n, dtype=torch.float32).expand_as(scores).clone()
            ranked[..., :SINKS] = float("inf")
            ranked[..., max(0, span[0] - before):span[-1] + 1 + after] = float("inf")
            layer.select(ranked, PRUNE_WINDOW, [n if b is None else min(int(b), n) for b in layer.budgets])
    return allocate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--keep", choices=("heads", "needle"), required=True)
    parser.add_argument("--wording", default="secret-code", choices=sorted(WORDINGS))
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--budgets", default="10%,5%")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(None, device="cpu")
    tail = template_tail(loaded.tokenizer)
    kv_heads = loaded.model.config.num_key_value_heads
    order = None
    if args.keep == "heads":
        scores = copy_scores(loaded)
        order = scores.flatten().argsort(descending=True).tolist()
        print("highest copy scores (layer, KV head, score):",
              [(i // kv_heads, i % kv_heads, round(float(scores.flatten()[i]), 2)) for i in order[:8]], file=sys.stderr)
    examples = needle.make_examples(loaded.tokenizer, load_haystack(args.haystack),
                                    [int(n) for n in args.lengths.split(",")], [0.1, 0.3, 0.5, 0.7, 0.9],
                                    seed=args.seed, templates=WORDINGS[args.wording])
    plain = compress.allocate_globally
    compress.reread = lambda loaded, cache, policy, ids, tail: [  # no re-reading: these selections ignore it
        torch.zeros(1, kv_heads, len(ids)) for _ in cache.layers]
    for budget in args.budgets.split(","):
        right = 0
        for example in examples:
            context, question = list(example.prompt_ids[:example.context_tokens]), \
                list(example.prompt_ids[example.context_tokens:])
            compress.allocate_globally = keep_heads(order, kv_heads) if order is not None else \
                keep_needle(value_positions(loaded.tokenizer, context, example.answers[0]))
            try:
                made = compress_ids(loaded, context, make_policy(args.method, budget=budget), "reconstruct", tail)
            finally:
                compress.allocate_globally = plain
            answer = ask_ids(loaded, made, question, GenerationSettings(max_new_tokens=example.max_new_tokens))
            score = METRICS[example.metric](answer.text, example)["score"]
            right += score
            print(f"  {example.id} {budget}: {answer.text!r} ({example.answers[0]}) {score:g}", file=sys.stderr)
        print(f"{args.keep} {args.method} {budget}: {right:g}/{len(examples)}", flush=True)


if __name__ == "__main__":
    main()
