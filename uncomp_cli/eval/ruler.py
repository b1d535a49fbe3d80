"""RULER-style synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654), generated locally.

Prompts follow NVIDIA/RULER's templates (``scripts/data/synthetic/constants.py``) and task
settings (``scripts/synthetic.yaml``); nothing is downloaded. Each prompt goes through the
model's chat template (RULER's ``base`` template when the tokenizer has none) and ends with
RULER's answer prefix, and is sized to the requested number of *prompt* tokens (RULER's length
also counts the tokens to generate). docs/eval-tasks.md lists every task and what differs.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import needle
from uncomp_cli.eval.examples import Example
from uncomp_cli.models.prompting import context_prompt

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

#: RULER generates 128 tokens for every niah task; the answers here are 7-digit numbers, so 32
#: (one number) or 64 (four numbers and the commas between them) leave room without wasting decode time.
MAX_NEW_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
                  "vt": 30, "cwe": 120, "fwe": 50}
#: RULER scores all these tasks with string_match_all (string_match_part is for its QA tasks only).
METRIC = {task: "ruler_all" for task in TASKS}

# (keys in the haystack, values per key, keys asked) as RULER's niah_single_2, niah_multikey_1,
# niah_multivalue and niah_multiquery.
_NIAH = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
         "niah_multiquery": (4, 1, 4)}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# RULER's needle keys are adjective-noun pairs drawn from wonderwords' lists; a short list of our own.
_ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "damp", "eager", "fancy",
               "fragile", "gentle", "giant", "hollow", "humble", "icy", "jolly", "lively", "loud", "lucky",
               "misty", "noisy", "odd", "polite", "proud", "quiet", "rapid", "rusty", "shiny", "silent",
               "sleepy", "sticky", "tender", "tidy", "vivid", "wild")
_NOUNS = ("anchor", "badger", "basket", "beacon", "candle", "canyon", "castle", "comet", "cousin", "dolphin",
          "engine", "falcon", "feather", "garden", "harbor", "helmet", "island", "jacket", "kettle", "lantern",
          "meadow", "mirror", "needle", "orchard", "parrot", "pebble", "pillow", "planet", "rabbit", "ribbon",
          "saddle", "shovel", "tunnel", "violin", "walrus", "window")
_DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER's 40 evenly spaced insertion depths, in percent
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_MIN_FILL = 32  # the least haystack, in tokens, that a needle or variable-tracking prompt must have


def make_examples(tokenizer, tasks, lengths, samples: int, seed: int = 0, haystack: str | None = None) -> list[Example]:
    """``samples`` prompts per task and length, in that order; the same arguments give the same examples.

    ``haystack`` (e.g. :func:`uncomp_cli.haystack.load_haystack`) fills the needle tasks, repeated
    if it is too short; without it they use RULER's noise sentences. Variable tracking always uses
    the noise, as RULER does.
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UncompError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(TASKS)}")
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise UncompError(f"RULER lengths must be positive token counts, got {lengths}")
    if samples < 1:
        raise UncompError(f"--samples must be at least 1, got {samples}")
    longest = max(lengths)
    fillers: dict[str, list[int]] = {}

    def filler(kind: str) -> list[int]:
        if kind not in fillers:
            text = haystack if kind == "essay" else "\n".join([NOISE] * 64)
            fillers[kind] = _tokens_at_least(tokenizer, text, longest)
        return fillers[kind]

    examples = []
    for task in tasks:
        for length in lengths:
            for index in range(samples):
                rng = random.Random(f"ruler-{seed}-{task}-{length}-{index}")
                if task in _NIAH:
                    kind = "essay" if haystack else "noise"
                    prompt, answers, meta = _niah(tokenizer, task, length, rng, filler(kind))
                    meta["haystack"] = kind
                elif task == "vt":
                    prompt, answers, meta = _vt(tokenizer, length, rng, filler("noise"))
                elif task == "cwe":
                    prompt, answers, meta = _cwe(tokenizer, length, rng)
                else:
                    prompt, answers, meta = _fwe(tokenizer, length, rng)
                examples.append(Example(id=f"{task}-{length}-{index}", task=task, prompt_ids=tuple(prompt.ids),
                                        answers=tuple(answers), metric=METRIC[task],
                                        max_new_tokens=MAX_NEW_TOKENS[task], length=length, meta=meta,
                                        context_tokens=prompt.context_tokens))
    return examples


# ---------------------------------------------------------------- the tasks


def _niah(tokenizer, task: str, length: int, rng: random.Random, hay_ids: list[int]):
    """Needles ``One of the special magic numbers for <key> is: <value>.`` at RULER's depths."""
    num_keys, num_values, num_queries = _NIAH[task]
    keys = _keys(rng, num_keys)
    numbers = iter(rng.sample(range(1_000_000, 10_000_000), num_keys * num_values))
    values = [[str(next(numbers)) for _ in range(num_values)] for _ in keys]
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.sample(_DEPTHS, len(needles)))
    asked = rng.sample(range(num_keys), num_queries)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template, prefix, kind = NIAH_TEMPLATE, NIAH_PREFIX, "numbers"
    if len(answers) == 1:  # RULER's singular wording for a single answer
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix, kind = prefix.replace("are", "is"), "number"
    user_text = template.replace("{type_needle_v}", kind).replace("{query}", query)
    prefix = prefix.format(type_needle_v=kind, query=query)

    def build(n: int) -> Prompt:
        context = _insert(tokenizer.decode(hay_ids[:n]), list(zip(depths, needles)))
        return _chat(tokenizer, user_text.replace("{context}", context), prefix)

    prompt = _fit(build, length, _MIN_FILL, task)
    return prompt, answers, {"keys": queries, "depths": [d / 100 for d in depths]}


def _vt(tokenizer, length: int, rng: random.Random, noise_ids: list[int], hops: int = 4):
    """One chain ``VAR A = 12345``, ``VAR B = VAR A`` … of ``hops`` links, in order, in the noise.

    As RULER, one solved example (a short chain in a few noise lines) comes first.
    """
    names = _var_names(rng, 2 * (hops + 1))
    shot_names, names = names[: hops + 1], names[hops + 1:]
    shot_value, value = (str(v) for v in rng.sample(range(10000, 100000), 2))
    shot_context = _insert("\n".join([NOISE] * 5), list(zip(sorted(rng.sample(_DEPTHS, hops + 1)),
                                                            _chain(shot_names, shot_value))))
    shot = (VT_TEMPLATE.format(context=shot_context, query=shot_value)
            + VT_PREFIX.format(num_v=hops + 1, query=shot_value) + " ".join(shot_names))
    depths = sorted(rng.sample(_DEPTHS, hops + 1))
    statements = _chain(names, value)
    prefix = VT_PREFIX.format(num_v=hops + 1, query=value)

    def build(n: int) -> Prompt:
        context = _insert(tokenizer.decode(noise_ids[:n]), list(zip(depths, statements)))
        return _chat(tokenizer, f"{shot}\n{VT_TEMPLATE.format(context=context, query=value)}", prefix)

    prompt = _fit(build, length, _MIN_FILL, "vt")
    return prompt, names, {"value": value, "hops": hops, "depths": [d / 100 for d in depths]}


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _cwe(tokenizer, length: int, rng: random.Random, num_common: int = 10):
    """A numbered list in which 10 words repeat often and the rest rarely; one solved example first.

    RULER's counts: 30 and 3 repeats (6 and 1 below 4096 tokens), the example with 40 words.
    """
    short = length < 4096
    common_repeats, rare_repeats = (6, 1) if short else (30, 3)
    shot_words, shot_repeats = (20, (3, 1)) if short else (40, (10, 3))
    state = rng.getstate()

    def build(n: int) -> Prompt:
        rng.setstate(state)  # the same words for every n: only the list's length changes
        words = _pseudo_words(rng)
        common = [next(words) for _ in range(num_common)]
        shot_list, shot_answer = _word_list(rng, [next(words) for _ in range(shot_words)], num_common, *shot_repeats)
        shot = (CWE_TEMPLATE.format(context=shot_list) + CWE_PREFIX + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)))
        rare = [next(words) for _ in range(n - num_common)]
        context, _ = _word_list(rng, common + rare, num_common, common_repeats, rare_repeats)
        return _chat(tokenizer, f"{shot}\n{CWE_TEMPLATE.format(context=context)}", CWE_PREFIX)

    prompt = _fit(build, length, num_common + 1, "cwe")
    rng.setstate(state)
    words = _pseudo_words(rng)
    answers = [next(words) for _ in range(num_common)]
    return prompt, answers, {"common_repeats": common_repeats, "rare_repeats": rare_repeats}


def _word_list(rng: random.Random, words: list[str], num_common: int, common_repeats: int, rare_repeats: int):
    common, rare = words[:num_common], words[num_common:]
    items = common * common_repeats + rare * rare_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def _fwe(tokenizer, length: int, rng: random.Random, alpha: float = 2.0):
    """Coded 6-letter words drawn with Zipf frequencies (zeta, alpha 2); the 2nd–4th most frequent are the answer.

    The most frequent "word" is ``...``, noise the prompt says to ignore; the vocabulary has
    length / 50 words, as RULER.
    """
    vocab_size = max(length // 50, 10)
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    zeta = math.pi**2 / 6 if alpha == 2.0 else sum(k**-alpha for k in range(1, 100_000))
    state = rng.getstate()

    def build(n: int) -> Prompt:
        rng.setstate(state)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k**-alpha / zeta))]
        rng.shuffle(words)
        return _chat(tokenizer, FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX)

    prompt = _fit(build, length, 100, "fwe")  # from 100 words on, ranks 2-5 have distinct counts
    return prompt, vocab[1:4], {"alpha": alpha, "vocab_size": vocab_size}


# ---------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class Prompt:
    """A task's token ids, and how many of them come before its question (the context a
    query-agnostic run compresses first; every template puts the question after its last newline)."""

    ids: list[int]
    context_tokens: int


def _chat(tokenizer, user: str, prefix: str) -> Prompt:
    """User message through the chat template, generation prompt, then the answer prefix.

    Without a chat template the text goes raw (RULER's ``base`` template) with the prefix appended.
    """
    if not getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer(user + prefix, add_special_tokens=True)["input_ids"])
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        ids += tokenizer(prefix.lstrip(), add_special_tokens=False)["input_ids"]
    head = context_prompt(tokenizer, user[:user.rindex("\n")])[0]
    shared = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
    return Prompt(ids, shared)


def _fit(build: Callable[[int], Prompt], target: int, least: int, task: str) -> Prompt:
    """The prompt of the largest size ``n >= least`` whose ids fit ``target`` tokens.

    Prompt length grows about linearly with ``n`` (haystack tokens, words), so a secant step
    lands near the target in a few tokenisations; bisection takes over when it stalls.
    """
    best = build(least)
    if len(best.ids) > target:
        raise UncompError(f"length {target} is too short for RULER task {task!r}: its smallest prompt has "
                          f"{len(best.ids)} tokens")
    lo, lo_len, hi = least, len(best.ids), None
    probe = build(2 * least)
    slope = max((len(probe.ids) - lo_len) / least, 1e-3)
    if len(probe.ids) <= target:
        lo, lo_len, best = 2 * least, len(probe.ids), probe
    else:
        hi = 2 * least
    bisect = False
    for _ in range(64):
        if lo_len == target or (hi is not None and hi - lo <= 1):
            break
        n = lo + max(1, int((target - lo_len) / slope))
        if hi is not None:
            n = (lo + hi) // 2 if bisect else min(max(n, lo + 1), hi - 1)
        width = None if hi is None else hi - lo
        prompt = build(n)
        if len(prompt.ids) > lo_len:
            slope = (len(prompt.ids) - lo_len) / (n - lo)
        if len(prompt.ids) <= target:
            lo, lo_len, best = n, len(prompt.ids), prompt
        else:
            hi = n
        bisect = width is not None and hi - lo > width // 2
    return best


def _insert(context: str, items: list[tuple[int, str]]) -> str:
    """Insert sentences at the sentence boundaries nearest their depths (percent); ties keep their order."""
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", context)] + [len(context)]
    placed = sorted(((min(starts, key=lambda s: abs(s - len(context) * depth / 100)), i, text)
                     for i, (depth, text) in enumerate(items)))
    pieces, last = [], 0
    for start, _, text in placed:
        pieces.append(context[last:start])
        if start == len(context):
            pieces.append(("" if not context or context[-1].isspace() else " ") + text)
        else:
            pieces.append(text + " ")
        last = start
    pieces.append(context[last:])
    return "".join(pieces)


def _tokens_at_least(tokenizer, text: str, count: int) -> list[int]:
    """Token ids of ``text``, repeated as often as needed to have ``count`` tokens (RULER repeats its essays)."""
    ids = needle.tokenize_haystack(tokenizer, text, count)
    if len(ids) < count:
        repeats = count // max(len(ids), 1) + 2
        ids = needle.tokenize_haystack(tokenizer, "\n\n".join([text.strip()] * repeats), count)
    return ids


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), count)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _var_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _pseudo_words(rng: random.Random) -> Iterator[str]:
    """Distinct pronounceable three-syllable words ("bakolu"), an endless stream: RULER's word lists
    are not shipped here. A stream, so the first words do not depend on how many are drawn."""
    size, seen = len(_SYLLABLES), set()
    while True:
        i = rng.randrange(size**3)
        if i not in seen:
            seen.add(i)
            yield "".join(_SYLLABLES[i // size**k % size] for k in range(3))
