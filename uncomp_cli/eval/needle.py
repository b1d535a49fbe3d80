"""Needle in a haystack: hide a 7-digit number in long text at a given depth and ask for it.

The haystack is any folder of text files the user supplies (the package ships none; the tests and
docs use the Paul Graham essays in ``../shared/data/haystack``). The prompt goes through the chat
template and ends with an answer prefix, so even a small model answers with the number itself.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from uncomp_cli.errors import UncompError

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ("Tokyo", "Lisbon", "Nairobi", "Quito", "Oslo", "Hanoi", "Perth", "Dakar", "Lima", "Riga")


def load_haystack(folder: str | Path) -> str:
    """All ``.txt`` files of ``folder`` (licence files excepted), sorted by name, joined."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UncompError(f"haystack folder not found: {folder}")
    files = [p for p in sorted(folder.glob("*.txt")) if not p.name.upper().startswith("LICENSE")]
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UncompError(f"haystack file {path} is not UTF-8 text") from None
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    if not text:
        raise UncompError(f"haystack folder {folder} has no text files")
    return re.sub(r"[ \t]+", " ", text)


@dataclass(frozen=True)
class NeedleCase:
    """One prompt of the grid: its target length, needle depth and the expected answer."""

    length: int
    depth: float
    key: str
    value: str
    distractors: tuple[tuple[str, str], ...] = ()


def make_cases(lengths: list[int], depths: list[float], seed: int = 0, distractors: int = 0) -> list[NeedleCase]:
    """A deterministic grid of cases; ``distractors`` other keys with their own numbers (multi-key)."""
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            keys = rng.sample(KEYS, 1 + distractors)
            values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
            cases.append(NeedleCase(length, depth, keys[0], values[0], tuple(zip(keys[1:], values[1:]))))
    return cases


def build_prompt_ids(tokenizer, haystack: str, case: NeedleCase, seed: int = 0) -> list[int]:
    """Token ids of a chat prompt of ``case.length`` tokens with the needle at ``case.depth``.

    The needle goes in at the sentence boundary nearest its depth; distractor needles go at
    random other depths. Depth 0 is the start of the context, 1 its end (just before the question).
    """
    def chat(context: str) -> list[int]:
        user = f"{context}\n\n{QUESTION.format(key=case.key)}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        return ids + tokenizer(ANSWER_PREFIX.format(key=case.key), add_special_tokens=False)["input_ids"]

    needles = [(case.depth, NEEDLE.format(key=case.key, value=case.value))]
    rng = random.Random(f"{seed}-{case.length}-{case.depth}")
    needles += [(rng.random(), NEEDLE.format(key=k, value=v)) for k, v in case.distractors]
    overhead = len(chat(" ".join(n for _, n in needles)))
    budget = case.length - overhead
    hay_ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    if budget < 16:
        raise UncompError(f"length {case.length} is too short for the needle prompt ({overhead} tokens)")
    if len(hay_ids) < budget:
        raise UncompError(f"the haystack has {len(hay_ids)} tokens; length {case.length} needs {budget}")
    context = tokenizer.decode(hay_ids[:budget])
    for depth, needle in sorted(needles, key=lambda n: -n[0]):  # insert deepest first: earlier offsets hold
        context = _insert_at_sentence(context, needle, depth)
    return chat(context)


def _insert_at_sentence(context: str, needle: str, depth: float) -> str:
    if depth >= 1:
        return f"{context.rstrip()} {needle}"
    target = int(len(context) * depth)
    if target <= 0:
        return f"{needle} {context}"
    cut = context.rfind(". ", 0, target)
    cut = cut + 2 if cut >= 0 else 0
    return f"{context[:cut]}{needle} {context[cut:]}"


def score(prediction: str, case: NeedleCase) -> dict:
    """Exact match (the first number in the answer is the needle's) and ROUGE-1 recall.

    ROUGE-1 recall, as the paper reports, compares the words of the needle sentence with those of
    the answer prefix plus the prediction, so an answer that names the wrong number still gets
    partial credit for the words around it.
    """
    digits = re.findall(r"\d+", prediction)
    exact = bool(digits) and digits[0] == case.value
    reference = re.findall(r"\w+", NEEDLE.format(key=case.key, value=case.value).lower())
    answer = set(re.findall(r"\w+", f"{ANSWER_PREFIX.format(key=case.key)} {prediction}".lower()))
    recall = sum(w in answer for w in reference) / len(reference)
    return {"exact_match": float(exact), "rouge1_recall": round(recall, 4)}
