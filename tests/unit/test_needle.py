"""Needle prompts: length, needle placement, multi-key distractors, scoring."""

from __future__ import annotations

import pytest
from tiny import tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import needle


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_target_length_and_the_needle_at_its_depth(tok, haystack_dir, depth):
    hay = needle.load_haystack(haystack_dir)
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
    text = tok.decode(needle.build_prompt_ids(tok, needle.load_haystack(haystack_dir), case))
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
        needle.load_haystack(tmp_path / "missing")
    with pytest.raises(UncompError, match="has no text files"):
        needle.load_haystack(tmp_path)
    (tmp_path / "a.txt").write_text("short text. " * 5)
    with pytest.raises(UncompError, match="the haystack has"):
        needle.build_prompt_ids(tok, needle.load_haystack(tmp_path), needle.make_cases([5000], [0.5])[0])
