"""Metrics on hand-made predictions with values worked out by hand."""

from __future__ import annotations

import pytest

from uncomp_cli.eval.examples import Example
from uncomp_cli.eval.metrics import METRICS, lcs_length, normalize_answer


def ex(answers, metric, **meta) -> Example:
    return Example("t-0", "t", (1, 2, 3), tuple(answers), metric, 16, 100, meta)


def score(metric, prediction, answers, **meta) -> float:
    result = METRICS[metric](prediction, ex(answers, metric, **meta))
    assert next(iter(result)) == "score" and 0.0 <= result["score"] <= 1.0
    return result["score"]


def test_every_metric_returns_score_first_in_range():
    for name, fn in METRICS.items():
        result = fn("The answer is Paragraph 3, 12 code", ex(["Paragraph 3"], name, all_classes=["x"], key="Oslo"))
        assert list(result)[0] == "score", name
        assert 0.0 <= result["score"] <= 1.0, name


def test_needle_exact_match_and_recall():
    meta = {"key": "Oslo", "depth": 0.5}
    right = METRICS["needle"](" 1234567.", ex(["1234567"], "needle", **meta))
    assert right == {"score": 1.0, "exact_match": 1.0, "rouge1_recall": 1.0}
    # the first number decides the exact match, even when the right one follows
    late = METRICS["needle"](" 7654321 then 1234567.", ex(["1234567"], "needle", **meta))
    assert late["score"] == 0.0 and late["rouge1_recall"] == 1.0
    wrong = METRICS["needle"](" 7654321.", ex(["1234567"], "needle", **meta))
    assert wrong["score"] == 0.0 and 0.5 < wrong["rouge1_recall"] < 1.0


def test_needle_uses_the_sentence_carried_in_meta():
    meta = {"needle": "The pass code for Oslo is 4242.", "answer_prefix": "The pass code for Oslo is"}
    assert METRICS["needle"](" 4242", ex(["4242"], "needle", **meta))["rouge1_recall"] == 1.0
    assert METRICS["needle"](" 4242", ex(["4242"], "needle"))["score"] == 1.0  # no sentence: the number alone


def test_ruler_all_counts_the_fraction_found_case_insensitively():
    assert score("ruler_all", "Values: 111, 333", ["111", "222", "333", "444"]) == 0.5
    assert score("ruler_all", "ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0
    assert score("ruler_all", "nothing", ["111"]) == 0.0


def test_ruler_part_takes_the_best_reference():
    assert score("ruler_part", "it was Paris", ["London", "paris"]) == 1.0
    assert score("ruler_part", "it was Rome", ["London", "paris"]) == 0.0


def test_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Eiffel-Tower, in a  city!") == "eiffeltower in city"


def test_qa_f1_of_partial_overlap():
    # prediction tokens: barack obama president (3); reference: barack obama (2); overlap 2
    # P = 2/3, R = 1, F1 = 0.8
    assert score("qa_f1", "The President Barack Obama.", ["Barack Obama"]) == pytest.approx(0.8)
    assert score("qa_f1", "Paris", ["London"]) == 0.0
    assert score("qa_f1", "An apple", ["the Apple!"]) == 1.0


def test_longbench_scores_take_the_best_answer():
    assert score("qa_f1", "Barack Obama", ["George Bush", "Obama", "Barack Obama"]) == 1.0
    assert score("qa_f1", "Barack Obama", ["George Bush", "Obama"]) == pytest.approx(2 / 3)


def test_qa_f1_zh_counts_characters():
    # prediction 北京市 (3 chars) vs reference 北京 (2): overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert score("qa_f1_zh", "北京市。", ["北京"]) == pytest.approx(0.8)


def test_lcs_and_rouge_l_of_a_known_lcs():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0
    # reference: the cat sat on the mat (6); prediction: the cat lay on a mat (6); LCS the cat on mat = 4
    # P = R = 4/6, F = 2/3
    assert score("rouge_l", "The cat lay on a mat.", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # order matters for ROUGE-L, unlike F1: reversed words share an LCS of 1
    assert score("rouge_l", "c b a", ["a b c"]) == pytest.approx(1 / 3)
    assert score("rouge_l", "", ["a b c"]) == 0.0


def test_rouge_l_zh():
    assert score("rouge_l_zh", "会议讨论了预算", ["会议讨论预算"]) == pytest.approx(2 * 6 / (7 + 6))


def test_classification_picks_the_class_mentioned():
    classes = ["Bird", "Bird species", "Location", "Number"]
    assert score("classification", "Location", ["Location"], all_classes=classes) == 1.0
    assert score("classification", "Number", ["Location"], all_classes=classes) == 0.0
    # naming two classes halves the credit
    assert score("classification", "Location or Number", ["Location"], all_classes=classes) == 0.5
    # "Bird" inside the right answer "Bird species" is not counted as a second class
    assert score("classification", "Bird species", ["Bird species"], all_classes=classes) == 1.0


def test_classification_and_fewshot_tasks_read_only_the_first_line():
    classes = ["Location", "Number"]
    assert score("classification", "\nLocation\nNumber", ["Location"], all_classes=classes, first_line_only=True) == 1.0
    assert score("classification", "\nLocation\nNumber", ["Location"], all_classes=classes) == 0.5


def test_retrieval_and_count_share_credit_between_numbers():
    assert score("retrieval", "Paragraph 12", ["Paragraph 12"]) == 1.0
    assert score("retrieval", "Paragraph 12 or Paragraph 3", ["Paragraph 12"]) == 0.5
    assert score("retrieval", "none", ["Paragraph 12"]) == 0.0
    assert score("retrieval_zh", "段落5", ["段落5"]) == 1.0
    assert score("count", "There are 7 unique, not 8, 7.", ["7"]) == pytest.approx(2 / 3)


def test_code_sim_compares_the_first_code_line():
    assert score("code_sim", "```python\n# comment\nx = foo(1)\ny = 2", ["x = foo(1)"]) == 1.0
    partial = score("code_sim", "x = bar(1)", ["x = foo(1)"])
    assert partial == pytest.approx(0.7)  # 7 of 10 characters match each way: 2*7/20
