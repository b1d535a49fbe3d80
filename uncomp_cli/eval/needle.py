"""Needle in a haystack: hide a 7-digit number in long text at a given depth and ask for it.

The haystack is any folder of text files the user supplies (the package ships none; the tests and
docs use the Paul Graham essays in ``../shared/data/haystack``). The prompt goes through the chat
template and ends with an answer prefix, so even a small model answers with the number itself.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from uncomp_cli.errors import UncompError
from uncomp_cli.eval.examples import Example
from uncomp_cli.models.prompting import context_prompt

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ("Tokyo", "Lisbon", "Nairobi", "Quito", "Oslo", "Hanoi", "Perth", "Dakar", "Lima", "Riga")
#: The metric (a key of ``uncomp_cli.eval.metrics.METRICS``) that scores needle examples.
METRIC = "needle"
#: Enough for a 7-digit number and a few words around it.
DEFAULT_MAX_NEW_TOKENS = 12


@dataclass(frozen=True)
class Templates:
    """The needle sentence, the question and the answer prefix, with ``{key}``/``{value}`` placeholders.

    The answer prefix starts the model's reply so a small model answers with the number itself.
    """

    needle: str = NEEDLE
    question: str = QUESTION
    answer_prefix: str = ANSWER_PREFIX


def make_templates(needle: str | None = None, question: str | None = None,
                   answer_prefix: str | None = None) -> Templates:
    """Templates with the given overrides, checked.

    A custom needle or question without an explicit answer prefix gets none: the default prefix
    speaks of "the special magic number" and would contradict a different needle.
    """
    custom = needle is not None or question is not None
    templates = Templates(
        needle=NEEDLE if needle is None else needle,
        question=QUESTION if question is None else question,
        answer_prefix=answer_prefix if answer_prefix is not None else ("" if custom else ANSWER_PREFIX),
    )
    for option, text, allowed in (("--needle-template", templates.needle, {"key", "value"}),
                                  ("--question-template", templates.question, {"key"}),
                                  ("--answer-prefix", templates.answer_prefix, {"key"})):
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as exc:
            raise UncompError(f"{option}: {exc} (write a literal brace as {{{{ or }}}})") from None
        if fields - allowed:
            names = ", ".join("{" + f + "}" for f in sorted(allowed))
            raise UncompError(f"{option} may use only {names}; it has {', '.join(sorted(fields - allowed))!r}")
    if "{value}" not in templates.needle:
        raise UncompError("--needle-template must contain {value}, the number to retrieve")
    if not templates.question.strip():
        raise UncompError("--question-template is empty")
    return templates


@dataclass(frozen=True)
class NeedleCase:
    """One prompt of the grid: its target length, needle depth and the expected answer."""

    length: int
    depth: float
    key: str
    value: str
    distractors: tuple[tuple[str, str], ...] = ()
    #: Which prompt of its length × depth cell: sample s hides its needle in the haystack text that
    #: starts at token s × length, so the samples of a cell differ in text as well as in key and number.
    sample: int = 0


def make_cases(lengths: list[int], depths: list[float], seed: int = 0, distractors: int = 0,
               samples: int = 1) -> list[NeedleCase]:
    """A deterministic grid of cases, ``samples`` per length × depth cell; ``distractors`` other keys
    with their own numbers (multi-key). One sample gives the same cases as before samples existed."""
    if not 0 <= distractors < len(KEYS):
        raise UncompError(f"--distractors must be between 0 and {len(KEYS) - 1}, got {distractors}")
    if samples < 1:
        raise UncompError(f"--samples must be at least 1, got {samples}")
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            for sample in range(samples):
                keys = rng.sample(KEYS, 1 + distractors)
                values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
                cases.append(NeedleCase(length, depth, keys[0], values[0], tuple(zip(keys[1:], values[1:])), sample))
    return cases


def haystack_tokens_needed(lengths: list[int], samples: int = 1) -> int:
    """Haystack tokens a grid reads: sample s of length L reads tokens [s × L, (s + 1) × L)."""
    return max(lengths) * samples


def tokenize_haystack(tokenizer, haystack: str, max_tokens: int | None = None) -> list[int]:
    """The haystack's token ids, once for a whole grid; with ``max_tokens``, only its first ``max_tokens``.

    Only a prefix of the text is tokenised then (the essays run to ~180k tokens); the tokens at a
    cut may differ from the whole text's, so the prefix is tokenised with a margin and trimmed.
    """
    if max_tokens is not None:
        chars = max(4096, 8 * max_tokens)
        while chars < len(haystack):
            ids = tokenizer(haystack[:chars], add_special_tokens=False)["input_ids"]
            if len(ids) >= max_tokens + 64:
                return ids[:max_tokens]
            chars *= 2
    return tokenizer(haystack, add_special_tokens=False)["input_ids"]


def build_prompt_ids(tokenizer, haystack: str, case: NeedleCase, seed: int = 0,
                     templates: Templates = Templates(), hay_ids: list[int] | None = None) -> list[int]:
    """Token ids of a chat prompt of ``case.length`` tokens with the needle at ``case.depth``.

    The needle goes in at the sentence boundary nearest its depth; distractor needles go at
    random other depths. Depth 0 is the start of the context, 1 its end (just before the question).
    ``hay_ids`` (from :func:`tokenize_haystack`) saves tokenising the haystack for every case.
    """
    return build_prompts(tokenizer, haystack, case, seed, templates, hay_ids)[0][0]


def build_prompts(tokenizer, haystack: str, case: NeedleCase, seed: int = 0, templates: Templates = Templates(),
                  hay_ids: list[int] | None = None, ask_all: bool = False) -> list[tuple[list[int], int]]:
    """:func:`build_prompt_ids` with the number of leading tokens that are context (template head,
    text, needles, separator: what a query-agnostic run compresses before the question), for
    ``case.key``; with ``ask_all``, one prompt per hidden key (the same context, the multi-query
    setting), ``case.key`` first."""
    def chat(context: str, key: str) -> list[int]:
        user = f"{context}\n\n{templates.question.format(key=key)}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        prefix = templates.answer_prefix.format(key=key)
        return ids + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])

    needles = [(case.depth, templates.needle.format(key=case.key, value=case.value))]
    rng = random.Random(f"{seed}-{case.length}-{case.depth}")
    needles += [(rng.random(), templates.needle.format(key=k, value=v)) for k, v in case.distractors]
    overhead = len(chat(" ".join(n for _, n in needles), case.key))
    budget = case.length - overhead
    start = case.sample * case.length
    if hay_ids is None:
        hay_ids = tokenize_haystack(tokenizer, haystack, start + max(budget, 0) + 1)
    if budget < 16:
        raise UncompError(f"length {case.length} is too short for the needle prompt ({overhead} tokens)")
    if len(hay_ids) < start + budget:
        where = f" from token {start} (--samples gives each prompt its own stretch of text)" if start else ""
        raise UncompError(f"the haystack has {len(hay_ids)} tokens; length {case.length} needs {budget}{where}")
    context = tokenizer.decode(hay_ids[start:start + budget]).lstrip()
    for depth, needle in sorted(needles, key=lambda n: -n[0]):  # insert deepest first: earlier offsets hold
        context = _insert_at_sentence(context, needle, depth)
    head = context_prompt(tokenizer, context)[0]
    prompts = []
    for key in [case.key, *(k for k, _ in case.distractors)] if ask_all else [case.key]:
        ids = chat(context, key)
        shared = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
        prompts.append((ids, shared))
    return prompts


def _insert_at_sentence(context: str, needle: str, depth: float) -> str:
    if depth >= 1:
        return f"{context.rstrip()} {needle}"
    target = int(len(context) * depth)
    if target <= 0:
        return f"{needle} {context}"
    cut = context.rfind(". ", 0, target)
    cut = cut + 2 if cut >= 0 else 0
    return f"{context[:cut]}{needle} {context[cut:]}"


def make_examples(tokenizer, haystack: str, lengths: list[int], depths: list[float], seed: int = 0,
                  distractors: int = 0, templates: Templates = Templates(),
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, samples: int = 1,
                  questions: int = 1) -> list[Example]:
    """The length × depth grid (``samples`` prompts per cell) as :class:`Example` s; the haystack is
    tokenised once for all of them.

    The task is ``needle``, or ``multikey`` with distractors. ``questions`` > 1 hides that many keys
    in each context and asks each one (task ``multiquery``: the examples of one context share it up
    to the question, so a query-agnostic run compresses it once for all of them; ``--distractors``
    does not combine with it). ``meta`` carries what scoring needs (key, needle sentence, answer
    prefix) besides the depth, so :func:`score_example` works from the example alone. Sample 0
    keeps the id ``<task>-<length>-<depth>``; later ones add ``-s<sample>``, and multi-query
    questions ``-q<n>``.
    """
    if questions < 1 or questions > len(KEYS) or (questions > 1 and distractors):
        raise UncompError(f"--questions must be 1 to {len(KEYS)}, and is not combined with --distractors")
    cases = make_cases(lengths, depths, seed=seed, distractors=max(distractors, questions - 1), samples=samples)
    hay_ids = tokenize_haystack(tokenizer, haystack, haystack_tokens_needed(lengths, samples))
    task = "multiquery" if questions > 1 else "multikey" if distractors else "needle"
    examples = []
    for case in cases:
        asked = [(case.key, case.value), *case.distractors]
        prompts = build_prompts(tokenizer, haystack, case, seed, templates, hay_ids, ask_all=questions > 1)
        for number, ((key, value), (ids, context_tokens)) in enumerate(zip(asked, prompts)):
            name = f"{task}-{case.length}-{case.depth:g}" + (f"-s{case.sample}" if case.sample else "")
            examples.append(Example(
                id=name + (f"-q{number}" if questions > 1 else ""),
                task=task,
                prompt_ids=tuple(ids),
                answers=(value,),
                metric=METRIC,
                max_new_tokens=max_new_tokens,
                length=case.length,
                meta={"depth": case.depth, "key": key,
                      "needle": templates.needle.format(key=key, value=value),
                      "answer_prefix": templates.answer_prefix.format(key=key),
                      "distractors": [k for k, _ in case.distractors], "sample": case.sample},
                context_tokens=context_tokens,
            ))
    return examples


def score(prediction: str, case: NeedleCase, templates: Templates = Templates()) -> dict:
    """Exact match (the first number in the answer is the needle's) and ROUGE-1 recall.

    ROUGE-1 recall, as the paper reports, compares the words of the needle sentence with those of
    the answer prefix plus the prediction, so an answer that names the wrong number still gets
    partial credit for the words around it.
    """
    return score_text(prediction, case.value, templates.needle.format(key=case.key, value=case.value),
                      templates.answer_prefix.format(key=case.key))


def score_example(prediction: str, example: Example) -> dict:
    """:func:`score` for an example from :func:`make_examples` (the ``needle`` metric)."""
    return score_text(prediction, example.answers[0], example.meta["needle"], example.meta.get("answer_prefix", ""))


def score_text(prediction: str, value: str, needle: str, answer_prefix: str) -> dict:
    """The scores of :func:`score`, given the formatted needle sentence and answer prefix."""
    digits = re.findall(r"\d+", prediction)
    exact = bool(digits) and digits[0] == value
    reference = re.findall(r"\w+", needle.lower())
    answer = set(re.findall(r"\w+", f"{answer_prefix} {prediction}".lower()))
    recall = sum(w in answer for w in reference) / len(reference) if reference else float(exact)
    return {"exact_match": float(exact), "rouge1_recall": round(recall, 4)}
