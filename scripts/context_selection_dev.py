"""Choose how a compressed context's re-reading scores become what it keeps, on a development set.

Query-agnostic contexts (compress once, ask many) keep what the re-reading pass scores highest
(:func:`uncomp_cli.contexts.compress.allocate_globally`), or what the score gate predicts it would
(``--scorer gate``). This script compares ways of turning
those scores into a selection — neighbour pooling, a per-head floor of the method's own budget —
on needle prompts of several wordings and on RULER-style variable tracking, re-reading each
context once for every variant, method and budget (the selection is the cheap part). Exact match
for needles, RULER's all-answers score for the other tasks; one line per wording or task.

It holds none of the wordings a report is made on: choose here, report with ``uncomp eval``.

  python scripts/context_selection_dev.py --haystack ../shared/data/haystack --lengths 2k,4k --seed 12 \\
      --variants global,pool3,floor50 --methods uncomp,snapkv --budgets 10%,5%
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict

import torch

from uncomp_cli.contexts import compress
from uncomp_cli.contexts import reread as reread_module
from uncomp_cli.contexts.compress import ask_ids, compress_ids, reading_store
from uncomp_cli.engine import recording
from uncomp_cli.engine.generation import GenerationSettings
from uncomp_cli.eval import needle, ruler
from uncomp_cli.eval.metrics import METRICS
from uncomp_cli.haystack import load_haystack
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import template_tail
from uncomp_cli.policies.registry import make_policy, with_profile
from uncomp_cli.units import parse_lengths

#: Development wordings: a needle sentence, its question and the answer's start.
WORDINGS = {
    "secret-code": needle.Templates("Remember this: the secret code of {key} is {value}.",
                                    "What is the secret code of {key}?", "The secret code of {key} is"),
    "locker": needle.Templates("The locker combination used in {key} is {value}.",
                               "Which locker combination is used in {key}?",
                               "The locker combination used in {key} is"),
    "builtin-seed12": needle.Templates(),
    "password": needle.Templates("The password for the {key} account is {value}.",
                                 "What is the password for the {key} account?",
                                 "The password for the {key} account is"),
    "serial": needle.Templates("Note that the serial number printed on the {key} crate is {value}.",
                               "What serial number is printed on the {key} crate?",
                               "The serial number printed on the {key} crate is"),
}
#: Variants: name -> allocate_globally's keyword arguments, and ``words``: whether heads keep whole
#: words (``compress.WHOLE_WORDS``). "default": as shipped; "global": KVzip's ranking weighted by the
#: method's head budgets, without tokens shared by every head or whole words (the default before
#: SHARED_TOKENS); "shared25": the default before WHOLE_WORDS and SHARE_POWER 0.
VARIANTS = {
    "default": {},
    "global": {"shared": 0.0},
    "pool3": {"pool": 3, "shared": 0.0},
    "pool5": {"pool": 5, "shared": 0.0},
    "pool7": {"pool": 7, "shared": 0.0},
    "floor25": {"floor": 0.25, "shared": 0.0},
    "floor50": {"floor": 0.5, "shared": 0.0},
    "floor100": {"floor": 1.0, "shared": 0.0},
    "pool3-floor25": {"pool": 3, "floor": 0.25, "shared": 0.0},
    "pool3-floor50": {"pool": 3, "floor": 0.5, "shared": 0.0},
    "pool5-floor50": {"pool": 5, "floor": 0.5, "shared": 0.0},
    "share50": {"share_power": 0.5, "shared": 0.0},
    "share0": {"share_power": 0.0, "shared": 0.0},
    "shared25": {"shared": 0.25, "consensus": "votes"},
    "shared50": {"shared": 0.5, "consensus": "votes"},
    "rank25": {"shared": 0.25, "consensus": "rank"},
    "rank50": {"shared": 0.5, "consensus": "rank"},
    "shared25-share50": {"share_power": 0.5},
    "shared25-share0": {"share_power": 0.0},
    # shared25-spread3, shared40-spread3 (agreement max-pooled over 3 neighbours) and shared25-chunk8,
    # shared25-chunk16, shared40-chunk16 (shared tokens in aligned runs, ChunkKV) are at commit c0484d5.
    # Copy heads (scripts/needle_kept.py --signals) first keep `factor` × the mean head budget by their
    # own scores, the default ranking spreading the rest: the heads whose copy score is ≥ `threshold`.
    "copy10x2": {"copy_floor": (0.1, 2.0)},
    "copy30x4": {"copy_floor": (0.3, 4.0)},
}
# Every variant above ran before heads kept whole words (compress.WHOLE_WORDS) and while the method's
# head budgets weighted the ranking (SHARE_POWER 1), and runs so still.
for _kwargs in VARIANTS.values():
    _kwargs.setdefault("words", False)
    _kwargs.setdefault("share_power", 1.0)
VARIANTS["default"] = {}  # as shipped: whole words, unweighted (SHARE_POWER 0), shared tokens by rank
# Whole words (contexts/words.py): a token scores the most of its word's tokens (a number's digits).
VARIANTS["words"] = {"words": True, "share_power": 1.0}
VARIANTS["words-share0"] = {"words": True, "share_power": 0.0}
# ... and the tokens every head keeps extended to whole words (their cut-off can fall inside a number).
VARIANTS["shared-words"] = {"shared_words": True, "consensus": "votes"}
# Multi-query (--questions 4): four needles compete for the shared tokens (issue 22, "Multi-query").
# Before CONSENSUS "rank" the default was "votes": "votes" is that one. w-reach1 and
# w-shared0-reach1 (a token scoring the most of its word and the words either side) are at e544999.
VARIANTS["votes"] = {"consensus": "votes"}
VARIANTS["w-shared0"] = {"shared": 0.0}
VARIANTS["w-shared50"] = {"shared": 0.5, "consensus": "votes"}
VARIANTS["w-rank25"] = {"consensus": "rank"}  # = default now
VARIANTS["w-pool3"] = {"pool": 3, "consensus": "votes"}
VARIANTS["w-shared10"] = {"shared": 0.1, "consensus": "votes"}
VARIANTS["w-rank10"] = {"shared": 0.1, "consensus": "rank"}
VARIANTS["w-shared0-floor25"] = {"shared": 0.0, "floor": 0.25}
VARIANTS["w-shared0-floor50"] = {"shared": 0.0, "floor": 0.5}
VARIANTS["w-rank25-floor25"] = {"consensus": "rank", "floor": 0.25}
# s-mean25, s-max25, s-top4-25, s-mean50, s-top4-50 (the shared tokens as whole sentences, by their
# tokens' mean, most, or best four ranks) are at 306cde9.
# Oracles (not selections: they know where the needles are): every head keeps the needles' whole
# sentences, only their values' digits, or the sentences without the digits, on top of the default.
VARIANTS["oracle-sentence"] = {"oracle": "sentence"}
VARIANTS["oracle-value"] = {"oracle": "value"}
VARIANTS["oracle-rest"] = {"oracle": "rest"}
VARIANTS["w-rank25-floor50"] = {"consensus": "rank", "floor": 0.5}
VARIANTS["w-rank25-floor10"] = {"consensus": "rank", "floor": 0.1}
VARIANTS["w-rank10-floor25"] = {"consensus": "rank", "floor": 0.25, "shared": 0.1}
VARIANTS["w-rank40-floor25"] = {"consensus": "rank", "floor": 0.25, "shared": 0.4}
# The default plus summary entries of the evicted tokens, biased to take their attention mass
# (scripts/kv_summaries.py): one or eight per KV head, bias log(count) or calibrated (lse).
VARIANTS["sum1-count"] = {"summaries": (1, "count")}
VARIANTS["sum8-count"] = {"summaries": (8, "count")}
VARIANTS["sum8-lse"] = {"summaries": (8, "lse")}
VARIANTS["sum8-zero"] = {"summaries": (8, "zero")}  # the mass without the values
VARIANTS["merge-nearest"] = {"summaries": (0, "nearest")}  # values merged into the nearest kept key's
# Diagnostics (not selections: over the budget): the default, with these layers keeping every token.
VARIANTS["whole-l0-1"] = {"whole_layers": (0, 2)}
VARIANTS["whole-l0-4"] = {"whole_layers": (0, 5)}
VARIANTS["whole-l10-14"] = {"whole_layers": (10, 15)}
VARIANTS["whole-l25-29"] = {"whole_layers": (25, 30)}
VARIANTS["whole-l0-14"] = {"whole_layers": (0, 15)}
VARIANTS["whole-l15-29"] = {"whole_layers": (15, 30)}
# The default, every head also keeping the context's first tokens (the chat template's header and more).
VARIANTS["head32"] = {"first_tokens": 32}
VARIANTS["head64"] = {"first_tokens": 64}
# The default with the kept keys and values rounded to 8 or 4 bits (scripts/kv_quant_sim.py, simulated).
VARIANTS["q8"] = {"bits": 8}
VARIANTS["q4"] = {"bits": 4}


def with_copy_floor(allocate, copy: torch.Tensor, threshold: float, factor: float):
    """``allocate`` after each copy head ([layers, H_kv] ``copy`` ≥ ``threshold``) has marked its own
    best ``factor`` × mean budget tokens as kept."""
    def allocate_with_floor(layers, recorded, **kwargs):
        n = recorded[0].shape[-1]
        budgets = [n if b is None else min(int(b), n) for layer in layers for b in layer.budgets]
        count = min(int(factor * sum(budgets) / len(budgets)), n)
        floored = []
        for scores, heads in zip(recorded, copy):
            scores = scores.clone()
            for head in (heads >= threshold).nonzero().flatten().tolist():
                scores[0, head, scores[0, head].topk(count).indices] = float("inf")
            floored.append(scores)
        return allocate(layers, floored, **kwargs)
    return allocate_with_floor


class _KeepingAll:
    """A layer whose select() keeps every token whatever budgets it is given (a diagnostic)."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def select(self, scores, window, budgets=None):
        self._layer.select(scores, window, [scores.shape[-1]] * scores.shape[1])


def with_whole_layers(allocate, span: tuple[int, int]):
    """``allocate``, then layers ``span`` [start, stop) keep every token (over the budget)."""
    def allocate_whole(layers, recorded, **kwargs):
        wrapped = [_KeepingAll(layer) if span[0] <= i < span[1] else layer for i, layer in enumerate(layers)]
        return allocate(wrapped, recorded, **kwargs)
    return allocate_whole


def with_forced(allocate, positions: list[int]):
    """``allocate`` after every head has marked ``positions`` as kept (an oracle)."""
    def allocate_forced(layers, recorded, **kwargs):
        forced = []
        for scores in recorded:
            scores = scores.clone()
            scores[..., positions] = float("inf")
            forced.append(scores)
        return allocate(layers, forced, **kwargs)
    return allocate_forced


#: Tokens one sentence holds at most (:func:`sentence_ids`); a longer run starts a new one.
MAX_SENTENCE_TOKENS = 40


def sentence_ids(tokenizer, ids: list[int]) -> torch.Tensor:
    """Each token's sentence number [N], rising: a token after one that ends a sentence (its text
    ends in ``.``, ``?``, ``!`` or holds a newline) starts a new one, as does a sentence already
    :data:`MAX_SENTENCE_TOKENS` long."""
    texts = {token: tokenizer.decode([token]) for token in set(ids)}
    sentences, sentence, length, ended = [], 0, 0, True
    for token in ids:
        if ended or length >= MAX_SENTENCE_TOKENS:
            sentence, length = sentence + 1, 0
        sentences.append(sentence)
        length += 1
        text = texts[token]
        ended = "\n" in text or text.rstrip()[-1:] in (".", "?", "!")
    return torch.tensor(sentences, dtype=torch.long)


def needle_positions(tokenizer, ids: list[int], values: list[str], part: str) -> list[int]:
    """Where the needles whose values are ``values`` lie in ``ids``: their sentences' tokens
    (``sentence``), only the value's tokens (``value``), or the sentences without them (``rest``)."""
    sentences = sentence_ids(tokenizer, ids)
    positions = []
    for number in sentences.unique().tolist():
        tokens = (sentences == number).nonzero().flatten().tolist()
        texts = [tokenizer.decode([ids[t]]) for t in tokens]
        if not any(value in "".join(texts) for value in values):
            continue
        digits = [t for t, text in zip(tokens, texts) if text.strip().isdigit()]
        value = set(digits) | {t - 1 for t in digits if not tokenizer.decode([ids[t - 1]]).strip()}
        positions += {"sentence": tokens, "value": sorted(value), "rest": [t for t in tokens if t not in value]}[part]
    return positions


def examples_of(tokenizer, args) -> dict[str, list]:
    lengths = parse_lengths(args.lengths)
    sets = {}
    haystack = load_haystack(args.haystack)
    for name in filter(None, args.wordings.split(",")):
        sets[name] = needle.make_examples(tokenizer, haystack, lengths, [0.1, 0.3, 0.5, 0.7, 0.9], seed=args.seed,
                                          templates=WORDINGS[name], samples=args.samples,
                                          questions=args.questions)
    for task in filter(None, args.tasks.split(",")):
        sets[task] = ruler.make_examples(tokenizer, [task], lengths, args.ruler_samples, seed=args.seed,
                                         haystack=haystack)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--lengths", default="2k,4k")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--samples", type=int, default=1, help="needle prompts per length × depth")
    parser.add_argument("--ruler-samples", type=int, default=3, help="prompts per RULER task and length")
    parser.add_argument("--wordings", default="secret-code,locker")
    parser.add_argument("--tasks", default="vt", help="RULER tasks, comma-separated (none: '')")
    parser.add_argument("--methods", default="uncomp")
    parser.add_argument("--budgets", default="10%,5%")
    parser.add_argument("--variants", default="default,global")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="default: the embedded model (or UNCOMP_MODEL)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--verbose", action="store_true", help="every answer on stderr")
    parser.add_argument("--questions", type=int, default=1,
                        help="needles hidden in each context, each asked on its one compression (multi-query)")
    parser.add_argument("--scorer", default="reconstruct", choices=compress.CONTEXT_SCORERS,
                        help="how context tokens are scored (uncomp's --context-scorer)")
    parser.add_argument("--reread", default="whole", choices=("whole", "chunked-bfloat16"),
                        help="chunked-bfloat16: KVzip's 2,000-token chunks with bfloat16 products (cheaper), "
                             "to compare with the default: the whole context at once, in the model's dtype")
    parser.add_argument("--kv-bits", type=int, default=None, help="8: compressed contexts rounded to 8 bits")
    args = parser.parse_args()
    unknown = [w for w in filter(None, args.wordings.split(",")) if w not in WORDINGS]
    if unknown:
        parser.error(f"unknown wording {unknown[0]!r}; known: {', '.join(WORDINGS)}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if args.reread == "chunked-bfloat16":
        reread_module.REREAD_CHUNK = 2000
        recording.BFLOAT16_PRODUCTS = True
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tail = template_tail(loaded.tokenizer)
    sets = examples_of(loaded.tokenizer, args)
    readings = reading_store(8 << 30)
    plain, whole_words = compress.allocate_globally, compress.WHOLE_WORDS
    copy = None
    if any("copy_floor" in VARIANTS[v] for v in args.variants.split(",")):
        from needle_kept import copy_scores_of  # late: needle_kept imports this module
        copy = copy_scores_of(loaded, load_haystack(args.haystack))
    if any("summaries" in VARIANTS[v] for v in args.variants.split(",")):
        import kv_summaries
        kv_summaries.install()
    scores: dict[tuple, list[float]] = defaultdict(list)
    for set_name, examples in sets.items():
        contexts: dict[tuple, list] = {}  # a context's ids -> its examples (several with --questions)
        for example in examples:
            contexts.setdefault(tuple(example.prompt_ids[:example.context_tokens]), []).append(example)
        for index, (context_ids, asked) in enumerate(contexts.items()):
            for method in args.methods.split(","):
                for budget in args.budgets.split(","):
                    policy = with_profile(make_policy(method) if method == "full" else
                                          make_policy(method, budget=budget), loaded)
                    for variant in args.variants.split(","):
                        kwargs = dict(VARIANTS[variant])
                        floor = kwargs.pop("copy_floor", None)
                        summaries = kwargs.pop("summaries", None)
                        allocate = plain if floor is None else with_copy_floor(plain, copy, *floor)
                        if (oracle := kwargs.pop("oracle", None)) is not None:
                            allocate = with_forced(allocate, needle_positions(
                                loaded.tokenizer, list(context_ids), [a for e in asked for a in e.answers], oracle))
                        if (first := kwargs.pop("first_tokens", None)) is not None:
                            allocate = with_forced(allocate, list(range(first)))
                        if (span := kwargs.pop("whole_layers", None)) is not None:
                            allocate = with_whole_layers(allocate, span)
                        if (bits := kwargs.pop("bits", None)) is not None:
                            from kv_quant_sim import with_quantised
                            allocate = with_quantised(allocate, bits)
                        compress.WHOLE_WORDS = kwargs.pop("words", whole_words)
                        compress.allocate_globally = functools.partial(allocate, **kwargs)
                        if summaries is not None:
                            sys.modules["kv_summaries"].SETTINGS = summaries
                        try:
                            context = compress_ids(loaded, list(context_ids), policy, args.scorer, tail, readings,
                                                   kv_bits=None if method == "full" else args.kv_bits)
                        finally:
                            compress.allocate_globally, compress.WHOLE_WORDS = plain, whole_words
                            if summaries is not None:
                                sys.modules["kv_summaries"].SETTINGS = None
                        for example in asked:
                            question = list(example.prompt_ids[example.context_tokens:])
                            answer = ask_ids(loaded, context, question,
                                             GenerationSettings(max_new_tokens=example.max_new_tokens))
                            score = METRICS[example.metric](answer.text, example)["score"]
                            scores[(set_name, method, budget, variant)].append(score)
                            if args.verbose:
                                print(f"  {example.id} {method} {budget} {variant}: {answer.text!r} "
                                      f"({', '.join(example.answers)}) {score:g}", file=sys.stderr)
                        if method == "full":  # no budget or variant changes it: answered once, copied
                            answered = scores[(set_name, method, budget, variant)]
                            for other in args.budgets.split(","):
                                for name in args.variants.split(","):
                                    scores[(set_name, method, other, name)] = answered
                            break
                    if method == "full":
                        break
            print(f"{set_name} {index + 1}/{len(contexts)}", file=sys.stderr, flush=True)
    table = {" ".join(key): round(100 * sum(v) / len(v), 1) for key, v in scores.items()}
    if args.json:
        print(json.dumps({"args": vars(args), "scores": table, "counts": {" ".join(k): len(v) for k, v in
                                                                          scores.items()}}, indent=1))
        return
    for method in args.methods.split(","):
        for budget in args.budgets.split(","):
            print(f"\n{method} {budget}: " + " | ".join(args.variants.split(",")))
            for set_name in sets:
                print(f"  {set_name:14s} " + "  ".join(f"{table[' '.join((set_name, method, budget, v))]:5.1f}"
                                                      for v in args.variants.split(",")))
            means = [sum(table[" ".join((s, method, budget, v))] for s in sets) / len(sets)
                     for v in args.variants.split(",")]
            print(f"  {'mean':14s} " + "  ".join(f"{m:5.1f}" for m in means))
            if "full" in args.methods.split(",") and method != "full":  # of the full cache's answers, how many kept
                kept = {v: sum(sum(a * b for a, b in zip(scores[(s, "full", budget, v)],
                                                         scores[(s, method, budget, v)])) for s in sets)
                        for v in args.variants.split(",")}
                full = sum(sum(scores[(s, "full", budget, args.variants.split(",")[0])]) for s in sets)
                print(f"  {'of full ' + format(full, 'g'):14s} " + "  ".join(f"{kept[v]:5g}" for v in kept))


if __name__ == "__main__":
    main()
