"""Needle prompts: length, needle placement, multi-key distractors, scoring."""

from __future__ import annotations

import re

import pytest
from tiny import tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import needle
from uncomp_cli.haystack import load_haystack


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_target_length_and_the_needle_at_its_depth(tok, haystack_dir, depth):
    hay = load_haystack(haystack_dir)
    case = needle.make_cases([600], [depth], seed=1)[0]
    ids = needle.build_prompt_ids(tok, hay, case)
    assert abs(len(ids) - 600) <= 8  # re-tokenising at the needle's edges may shift a few tokens
    text = tok.decode(ids)
    sentence = needle.NEEDLE.format(key=case.key, value=case.value)
    assert text.count(sentence) == 1
    position = text.index(sentence) / text.index(needle.QUESTION.format(key=case.key))
    assert abs(position - depth) < 0.1
    assert text.endswith(needle.ANSWER_PREFIX.format(key=case.key))


def test_distractors_carry_other_keys_and_numbers(tok, haystack_dir):
    case = needle.make_cases([800], [0.5], seed=2, distractors=3)[0]
    text = tok.decode(needle.build_prompt_ids(tok, load_haystack(haystack_dir), case))
    keys = {k for k, _ in case.distractors}
    assert len(keys) == 3 and case.key not in keys
    for key, value in case.distractors:
        assert needle.NEEDLE.format(key=key, value=value) in text


def test_cases_are_deterministic_for_a_seed():
    assert needle.make_cases([1000, 2000], [0, 1], seed=5) == needle.make_cases([1000, 2000], [0, 1], seed=5)
    assert needle.make_cases([1000], [0], seed=5) != needle.make_cases([1000], [0], seed=6)


def test_scoring():
    case = needle.NeedleCase(1000, 0.5, "Oslo", "1234567")
    assert needle.score(" 1234567.", case) == {"exact_match": 1.0, "rouge1_recall": 1.0}
    wrong = needle.score(" 1234568.", case)
    assert wrong["exact_match"] == 0.0 and 0.5 < wrong["rouge1_recall"] < 1.0
    assert needle.score(" 12345 and 1234567", case)["exact_match"] == 0.0


def test_bad_haystacks_are_user_errors(tmp_path, tok):
    with pytest.raises(UncompError, match="haystack folder not found"):
        load_haystack(tmp_path / "missing")
    with pytest.raises(UncompError, match="has no text files"):
        load_haystack(tmp_path)
    (tmp_path / "a.txt").write_text("short text. " * 5)
    with pytest.raises(UncompError, match="the haystack has"):
        needle.build_prompt_ids(tok, load_haystack(tmp_path), needle.make_cases([5000], [0.5])[0])


def test_examples_share_one_haystack_tokenisation_and_score_from_the_example_alone(tok, haystack_dir):
    hay = load_haystack(haystack_dir)
    examples = needle.make_examples(tok, hay, [300, 500], [0.0, 1.0], seed=3)
    assert [e.id for e in examples] == ["needle-300-0", "needle-300-1", "needle-500-0", "needle-500-1"]
    cases = needle.make_cases([300, 500], [0.0, 1.0], seed=3)
    for example, case in zip(examples, cases):
        assert list(example.prompt_ids) == needle.build_prompt_ids(tok, hay, case, seed=3)
        assert example.answers == (case.value,) and example.metric == needle.METRIC
        assert example.meta["depth"] == case.depth and example.length == case.length
        assert needle.score_example(f" {case.value}.", example) == needle.score(f" {case.value}.", case)
        assert needle.score_example(" 42", example) == needle.score(" 42", case)
    multikey = needle.make_examples(tok, hay, [400], [0.5], seed=3, distractors=2)
    assert multikey[0].task == "multikey" and len(multikey[0].meta["distractors"]) == 2


def test_custom_templates_reach_the_prompt_and_the_score(tok, haystack_dir):
    templates = needle.make_templates(needle="The code of {key} is {value}.", question="Which code has {key}?")
    assert templates.answer_prefix == ""  # the default prefix would speak of a magic number
    example = needle.make_examples(tok, load_haystack(haystack_dir), [400], [0.5], templates=templates)[0]
    text = tok.decode(example.prompt_ids)
    key, value = example.meta["key"], example.answers[0]
    assert f"The code of {key} is {value}." in text and f"Which code has {key}?" in text
    assert needle.score_example(f"The code of {key} is {value}", example) == {"exact_match": 1.0,
                                                                              "rouge1_recall": 1.0}


@pytest.mark.parametrize("options, message", [
    ({"needle": "The number is 7."}, "must contain {value}"),
    ({"question": "What is {value}?"}, "may use only {key}"),
    ({"needle": "{key} {value} {other}"}, "may use only {key}, {value}"),
    ({"needle": "{value"}, "--needle-template"),
])
def test_bad_templates_are_user_errors(options, message):
    with pytest.raises(UncompError, match=re.escape(message)):
        needle.make_templates(**options)


def test_too_many_distractors_is_a_user_error():
    with pytest.raises(UncompError, match="--distractors must be between 0 and 9"):
        needle.make_cases([1000], [0.5], distractors=len(needle.KEYS))


def test_a_tokenised_prefix_of_the_haystack_matches_the_whole_texts_tokens(tok, haystack_dir):
    hay = load_haystack(haystack_dir)
    whole = tok(hay, add_special_tokens=False)["input_ids"]
    for count in (100, 3000):
        assert needle.tokenize_haystack(tok, hay, count) == whole[:count]


def test_samples_are_prompts_of_their_own_and_one_sample_is_the_plain_grid(tok, haystack_dir):
    hay = load_haystack(haystack_dir)
    plain = needle.make_examples(tok, hay, [300], [0.0, 1.0], seed=4)
    sampled = needle.make_examples(tok, hay, [300], [0.0, 1.0], seed=4, samples=3)
    assert plain == needle.make_examples(tok, hay, [300], [0.0, 1.0], seed=4, samples=1)
    assert [e.id for e in sampled] == ["needle-300-0", "needle-300-0-s1", "needle-300-0-s2",
                                       "needle-300-1", "needle-300-1-s1", "needle-300-1-s2"]
    assert [e.meta["sample"] for e in sampled] == [0, 1, 2] * 2
    # Each sample has its own number and its own stretch of the haystack around the needle.
    assert len({e.answers[0] for e in sampled}) == 6
    contexts = [tok.decode(e.prompt_ids).split(e.meta["needle"])[1][:80] for e in sampled[:3]]
    assert len(set(contexts)) == 3
    for example in sampled:
        assert abs(len(example.prompt_ids) - 300) <= 8 and example.meta["needle"] in tok.decode(example.prompt_ids)


def test_samples_past_the_end_of_the_haystack_are_a_user_error(tmp_path, tok):
    (tmp_path / "a.txt").write_text("A sentence of the haystack. " * 120)
    hay = load_haystack(tmp_path)
    needle.make_examples(tok, hay, [300], [0.5], samples=1)
    too_short = r"the haystack has \d+ tokens; length 300 needs \d+ from token \d+ \(--samples"
    with pytest.raises(UncompError, match=too_short):
        needle.make_examples(tok, hay, [300], [0.5], samples=50)
    with pytest.raises(UncompError, match="--samples must be at least 1"):
        needle.make_cases([300], [0.5], samples=0)
