"""How many layer × KV-head pairs keep each token of a needle after query-agnostic compression.

Compresses a needle prompt's context (``reconstruct``) and prints, for each token of the needle
sentence and the token after it, the share of layer × KV-head pairs whose cache still holds it,
with the mean share over the whole context (the base rate a budget gives). A needle the
re-reading singles out is kept well above the base rate (docs/results.md, issue 22).

``--signals`` adds each needle token's rank (0: first) among the context's tokens by its surprisal
under the prefix (self-information, what Selective Context prunes by), and lists the model's copy
heads: KV heads whose queries, on a text read twice, attend to the token after their own first
occurrence (induction, how a model copies a number out).

  python scripts/needle_kept.py --haystack ../shared/data/haystack --wordings secret-code,builtin-seed12
  python scripts/needle_kept.py --haystack ../shared/data/haystack --wordings password --length 2048 --signals
"""

from __future__ import annotations

import argparse

import torch
from context_selection_dev import WORDINGS

from uncomp_cli.contexts import compress
from uncomp_cli.contexts.compress import compress_ids
from uncomp_cli.eval import needle
from uncomp_cli.haystack import load_haystack
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import template_tail
from uncomp_cli.policies.registry import make_policy, with_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--wordings", default="secret-code,builtin-seed12")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depth", default="0.5", help="needle depth(s), comma-separated")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--method", default="uncomp")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--signals", action="store_true", help="surprisal ranks and the copy heads too")
    parser.add_argument("--before-words", action="store_true",
                        help="select as before whole words: WHOLE_WORDS off, heads weighted by their budgets")
    args = parser.parse_args()
    if args.before_words:
        compress.WHOLE_WORDS, compress.SHARE_POWER = False, 1.0
    torch.set_grad_enabled(False)
    loaded = load_model(None, device="cpu")
    tokenizer = loaded.tokenizer
    haystack = load_haystack(args.haystack)
    policy = with_profile(make_policy(args.method, budget=args.budget), loaded)
    depths = [float(depth) for depth in args.depth.split(",")]
    examples = [(wording, example) for wording in args.wordings.split(",") for example in
                needle.make_examples(tokenizer, haystack, [args.length], depths, seed=args.seed,
                                     templates=WORDINGS[wording])]
    for name, example in examples:
        ids = list(example.prompt_ids[:example.context_tokens])
        context = compress_ids(loaded, ids, policy, "reconstruct", template_tail(tokenizer))
        sentence = tokenizer(" " + example.meta["needle"], add_special_tokens=False)["input_ids"]
        inner = sentence[1:-1]  # the ends may merge with the text around the needle
        start = next(i for i in range(len(ids)) if ids[i:i + len(inner)] == inner) - 1
        counts, pairs = torch.zeros(len(ids)), 0
        for layer in context.cache.layers:
            for group in layer.groups:
                for positions in group.positions[0]:
                    counts[positions[positions < len(ids)]] += 1
                    pairs += 1
        span = range(start, min(start + len(sentence) + 1, len(ids)))
        print(f"{name} {example.id}: {pairs} layer × KV-head pairs; "
              f"context mean kept share {float(counts.mean()) / pairs:.3f}")
        print("  " + " ".join(f"{tokenizer.decode([ids[i]])!r}:{counts[i] / pairs:.2f}" for i in span))
        if args.signals:
            ranks = surprisal_ranks(loaded.model, ids)
            print(f"  surprisal rank of {len(ids)}: " +
                  " ".join(f"{tokenizer.decode([ids[i]])!r}:{int(ranks[i])}" for i in span))
    if args.signals:
        scores = copy_scores_of(loaded, haystack)
        order = scores.flatten().argsort(descending=True)[:10].tolist()
        heads = scores.shape[1]
        print("copy heads (layer, KV head, attention to the next token's first occurrence): " +
              ", ".join(f"({i // heads}, {i % heads}, {float(scores.flatten()[i]):.2f})" for i in order) +
              f"; median {float(scores.median()):.3f}")


def surprisal_ranks(model, ids: list[int]) -> torch.Tensor:
    """Each token's rank by -log p(token | prefix), most surprising first (the first token: last)."""
    logits = model(torch.tensor([ids])).logits[0].float()
    surprisal = torch.cat([torch.full((1,), -1.0),
                           torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")])
    order = surprisal.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(ids))
    return ranks


def copy_scores_of(loaded, haystack: str) -> torch.Tensor:
    """:func:`copy_scores` on the haystack's first 400 tokens."""
    return copy_scores(loaded.model, loaded.tokenizer(haystack[:20000], add_special_tokens=False)["input_ids"][:400])


def copy_scores(model, ids: list[int]) -> torch.Tensor:
    """[layers, KV heads]: on ``ids`` read twice, the mean attention a second-reading query pays the
    token after its own first occurrence (the most of the KV head's query heads). Eager attention,
    so the probabilities come out; the model is left with its own attention implementation."""
    own = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        attentions = model(torch.tensor([ids + ids]), output_attentions=True).attentions
    finally:
        model.config._attn_implementation = own
    n = len(ids)
    queries, keys = torch.arange(n, 2 * n - 1), torch.arange(1, n)
    per_head = torch.stack([a[0][:, queries, keys].mean(-1) for a in attentions])  # [layers, heads]
    kv_heads = model.config.num_key_value_heads
    return per_head.view(per_head.shape[0], kv_heads, -1).amax(-1)


if __name__ == "__main__":
    main()
