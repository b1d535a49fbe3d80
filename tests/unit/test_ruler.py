"""RULER-style tasks: sized to the target, answers really in the prompt, deterministic for a seed."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from tiny import tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import ruler
from uncomp_cli.eval.metrics import METRICS
from uncomp_cli.haystack import load_haystack

# The tiny tokenizer is nearly character-level, so the word-list tasks need more tokens than a real one.
LENGTHS = {"niah_single": 700, "niah_multikey": 700, "niah_multivalue": 700, "niah_multiquery": 700,
           "vt": 1500, "cwe": 2000, "fwe": 1000}
# Needle and variable tracking cut the filler at a token; the word lists grow a whole item at a time.
SLACK = {"cwe": 32, "fwe": 32}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return {task: ruler.make_examples(tok, [task], [n], 1, seed=3)[0] for task, n in LENGTHS.items()}


def test_every_task_is_built(examples):
    assert set(examples) == set(ruler.TASKS)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompt_fits_the_target_length_and_holds_every_answer(tok, examples, task):
    example = examples[task]
    target = LENGTHS[task]
    assert target - SLACK.get(task, 8) <= len(example.prompt_ids) <= target
    assert example.id == f"{task}-{target}-0" and example.length == target
    assert example.metric == "ruler_all" and example.max_new_tokens == ruler.MAX_NEW_TOKENS[task]
    text = tok.decode(example.prompt_ids)
    assert example.answers and all(answer in text for answer in example.answers)
    # the answers are in the context, not only in the question: a perfect reply scores 1, an empty one 0
    assert METRICS["ruler_all"](", ".join(example.answers), example)["score"] == 1.0
    assert METRICS["ruler_all"]("", example)["score"] == 0.0


def test_prompts_end_with_the_answer_prefix_after_the_generation_prompt(tok, examples):
    assert tok.decode(examples["niah_single"].prompt_ids).endswith(
        "<|assistant|>The special magic number for " + examples["niah_single"].meta["keys"][0]
        + " mentioned in the provided text is")
    assert tok.decode(examples["cwe"].prompt_ids).endswith("<|assistant|>" + ruler.CWE_PREFIX.lstrip())


@pytest.mark.parametrize("task,needles,answers,asked", [
    ("niah_single", 1, 1, 1), ("niah_multikey", 4, 1, 1), ("niah_multivalue", 4, 4, 1), ("niah_multiquery", 4, 4, 4),
])
def test_needle_tasks_hide_the_right_needles(tok, examples, task, needles, answers, asked):
    example = examples[task]
    text = tok.decode(example.prompt_ids)
    found = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d{7})\.", text)
    assert len(found) == needles
    assert len(example.answers) == answers and len(example.meta["keys"]) == asked
    assert sorted(v for k, v in found if k in example.meta["keys"]) == sorted(example.answers)
    question = text[text.rindex("What "):]
    assert all(key in question for key in example.meta["keys"])
    if needles > asked:  # distractor keys are not asked about
        assert not any(k in question for k, _ in found if k not in example.meta["keys"])


def test_needles_use_the_haystack_when_given(tok, haystack_dir):
    hay = load_haystack(haystack_dir)
    example = ruler.make_examples(tok, ["niah_single"], [800], 1, seed=1, haystack=hay)[0]
    text = tok.decode(example.prompt_ids)
    assert example.meta["haystack"] == "essay" and ruler.NOISE not in text
    assert 792 <= len(example.prompt_ids) <= 800 and example.answers[0] in text


def test_variable_tracking_chain_is_in_order(tok, examples):
    example = examples["vt"]
    text = tok.decode(example.prompt_ids)
    text = text[text.rindex("Memorize and track"):]  # after the solved example
    names, value = example.answers, example.meta["value"]
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    positions = [text.index(s) for s in statements]
    assert positions == sorted(positions) and len(names) == 5
    assert f"5 variables are assigned the value {value}, they are:" in text


def test_common_words_are_the_most_common(tok, examples):
    example = examples["cwe"]
    text = tok.decode(example.prompt_ids)
    listing = text[text.rindex("Memorize the ones"):text.rindex("Question:")]
    counts = Counter(re.findall(r"\d+\. (\w+)", listing))
    assert {w for w, _ in counts.most_common(10)} == set(example.answers)
    assert min(counts[w] for w in example.answers) > max(c for w, c in counts.items() if w not in example.answers)


def test_frequent_words_are_ranks_two_to_four(tok, examples):
    example = examples["fwe"]
    text = tok.decode(example.prompt_ids)
    counts = Counter(text[text.index("coded words. ") + 13:text.rindex("Question:")].split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == list(example.answers)
    assert counts[ranked[3]] > counts[ranked[4]]


def test_same_seed_same_examples_other_seed_other_examples(tok):
    tasks, lengths = ["niah_multikey", "vt", "fwe"], [1500, 1800]
    first = ruler.make_examples(tok, tasks, lengths, 2, seed=7)
    assert first == ruler.make_examples(tok, tasks, lengths, 2, seed=7)
    assert [e.id for e in first] == [f"{t}-{n}-{i}" for t in tasks for n in lengths for i in range(2)]
    other = ruler.make_examples(tok, tasks, lengths, 2, seed=8)
    assert all(a.prompt_ids != b.prompt_ids and a.answers != b.answers for a, b in zip(first, other))
    assert first[0].answers != first[1].answers  # samples differ too


def test_prompts_without_a_chat_template_are_raw_text(tok):
    raw = tiny_tokenizer()
    raw.chat_template = None
    example = ruler.make_examples(raw, ["niah_single"], [500], 1)[0]
    text = raw.decode(example.prompt_ids)
    assert "<|user|>" not in text and text.endswith("provided text? The special magic number for "
                                                   + example.meta["keys"][0] + " mentioned in the provided text is")
    assert len(example.prompt_ids) <= 500


def test_bad_requests_are_user_errors(tok):
    with pytest.raises(UncompError, match="unknown RULER task 'qa_1'; known: niah_single"):
        ruler.make_examples(tok, ["qa_1"], [1000], 1)
    with pytest.raises(UncompError, match="length 200 is too short for RULER task 'cwe'"):
        ruler.make_examples(tok, ["cwe"], [200], 1)
    with pytest.raises(UncompError, match="too short for RULER task 'niah_single'"):
        ruler.make_examples(tok, ["niah_single"], [60], 1)
    with pytest.raises(UncompError, match="positive"):
        ruler.make_examples(tok, ["vt"], [0], 1)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_the_context_ends_where_the_question_starts(tok, examples, task):
    """What a query-agnostic run compresses first: every needle, chain and list, none of the question."""
    example = examples[task]
    assert 0 < example.context_tokens < len(example.prompt_ids)
    context = tok.decode(example.prompt_ids[:example.context_tokens])
    question = tok.decode(example.prompt_ids[example.context_tokens:])
    if task.startswith("niah") or task == "vt":
        assert all(answer in context for answer in example.answers)
    marker = "What" if task.startswith("niah") else "Question:"
    assert marker in question.split("<|assistant|>")[0] and "<|assistant|>" in question
    assert context.count(marker) == (1 if task in ("vt", "cwe") else 0)  # the solved example's question, if any


def test_raw_prompts_split_too(tok):
    raw = tiny_tokenizer()
    raw.chat_template = None
    example = ruler.make_examples(raw, ["vt"], [1500], 1)[0]
    assert "Question:" in raw.decode(example.prompt_ids[example.context_tokens:])
    assert all(name in raw.decode(example.prompt_ids[:example.context_tokens]) for name in example.answers)
