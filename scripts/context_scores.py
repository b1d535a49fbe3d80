"""Where a needle's tokens rank under question-independent scores (docs/methods.md, compressed contexts).

For needle prompts built like ``uncomp eval needle``'s, prints per layer and KV head the rank of the
needle's last token among the context's tokens under the reconstruction score (the most attention a
re-reading query pays each token, ``--context-scorer reconstruct``), and the ranks of the needle's
tokens under self-information (the token's surprise under the model, pooled like the selection).
Rank 0 is the best; a 10 % budget keeps about the top tenth.

  python scripts/context_scores.py --haystack ../shared/data/haystack --length 1024 --seed 12
"""

from __future__ import annotations

import argparse
import time

import torch

from uncomp_cli.contexts.reread import RECONSTRUCT_CHUNK, REPEAT_PROMPT
from uncomp_cli.engine.checkpoint import checkpoint, rollback
from uncomp_cli.engine.selection import pool_scores
from uncomp_cli.engine.steps import forward_last, prompt_positions
from uncomp_cli.eval import needle
from uncomp_cli.haystack import load_haystack
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import question_ids
from uncomp_cli.policies.registry import make_policy


def reconstruction_scores(loaded, ids: list[int]) -> tuple[list[torch.Tensor], float, float]:
    """Per layer [H_kv, N] reconstruction scores of the context ``ids``, and the prefill and re-reading seconds."""
    policy = make_policy("snapkv", budget="100%")
    mask = torch.ones(1, len(ids), dtype=torch.long)
    started = time.perf_counter()
    with policy.attach(loaded.model, mask, policy.plan(loaded.model, mask).deferred()) as cache, \
            torch.inference_mode():
        forward_last(loaded.model, torch.tensor([ids]), mask, prompt_positions(mask), cache)
    prefill = time.perf_counter() - started
    saved = checkpoint(cache)
    reread = question_ids(loaded.tokenizer, REPEAT_PROMPT, "") + ids
    total = len(ids)
    started = time.perf_counter()
    with policy.resume(loaded.model, cache), torch.inference_mode():
        for layer in cache.layers:
            layer.start_recording()
        for start in range(0, len(reread), RECONSTRUCT_CHUNK):
            chunk = torch.tensor([reread[start:start + RECONSTRUCT_CHUNK]])
            total += chunk.shape[1]
            loaded.model(input_ids=chunk, attention_mask=torch.ones(1, total, dtype=torch.long),
                         position_ids=torch.arange(total - chunk.shape[1], total)[None], cache=cache,
                         use_cache=True, logits_to_keep=1)
        scores = [layer.recorded[0] for layer in cache.layers]
    rollback(cache, saved)
    return scores, prefill, time.perf_counter() - started


def self_information(loaded, ids: list[int]) -> torch.Tensor:
    """[N] −log p(token | earlier tokens); the first token gets the largest value."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
        surprise = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return torch.cat([surprise.max()[None], surprise])


def rank(scores: torch.Tensor, position: int) -> int:
    return int((scores > scores[position]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--layers", default="2,5,10,15,20,25,29")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(None, device="cpu")
    example = needle.make_examples(loaded.tokenizer, load_haystack(args.haystack), [args.length], [args.depth],
                                   seed=args.seed)[0]
    ids = list(example.prompt_ids[: example.context_tokens])
    value = loaded.tokenizer(example.answers[0], add_special_tokens=False)["input_ids"]
    # the needle's last digit: where the number's tokens stand in the context
    last = next(i + len(value) - 1 for i in range(len(ids)) if ids[i:i + len(value)] == value)
    scores, prefill, reread = reconstruction_scores(loaded, ids)
    print(f"context {len(ids)} tokens, needle ends at {last}; prefill {prefill:.1f} s, re-reading {reread:.1f} s")
    for layer in (int(x) for x in args.layers.split(",")):
        ranks = [rank(scores[layer][head], last) for head in range(scores[layer].shape[0])]
        print(f"reconstruct layer {layer:2d}: needle rank per KV head {ranks}")
    surprise = self_information(loaded, ids)
    for kernel in (1, 21):
        pooled = pool_scores(surprise[None], kernel, "avg")[0]
        print(f"self-information, avg pooling {kernel:2d}: needle digits' ranks "
              f"{[rank(pooled, p) for p in range(last - len(value) + 1, last + 1)]}")


if __name__ == "__main__":
    main()
