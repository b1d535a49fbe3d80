"""Scores for one prediction against an :class:`~uncomp_cli.eval.examples.Example`.

Every function in :data:`METRICS` returns a dict whose first key is ``"score"`` (in [0, 1], the
headline the runner averages) plus any extras worth reporting. Definitions follow the benchmarks
they come from so that numbers stay comparable; where we cannot (no jieba, no ``rouge`` package)
docs/eval-tasks.md says what differs.

- ``needle``: the needle test's exact match and ROUGE-1 recall (:func:`uncomp_cli.eval.needle.score`).
- ``ruler_all`` / ``ruler_part``: RULER's string_match_all / string_match_part.
- LongBench (``qa_f1``, ``qa_f1_zh``, ``rouge_l``, ``rouge_l_zh``, ``classification``,
  ``retrieval``, ``retrieval_zh``, ``count``, ``code_sim``): the score is the best over the
  example's answers, as LongBench's ``scorer`` takes it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher

from uncomp_cli.eval import needle
from uncomp_cli.eval.examples import Example

# ---------------------------------------------------------------- needle and RULER


def needle_score(prediction: str, example: Example) -> dict[str, float]:
    """Exact match of the first number and ROUGE-1 recall of the needle sentence.

    ``answers[0]`` is the needle's number. The sentence and answer prefix come from ``meta``
    (``needle``/``answer_prefix`` as :func:`uncomp_cli.eval.needle.make_examples` writes them, or
    ``key`` with the default templates); with neither, only the number's own word counts.
    """
    value, meta = example.answers[0], example.meta
    if "needle" in meta:
        result = needle.score_example(prediction, example)
    elif "key" in meta:
        result = needle.score(prediction, needle.NeedleCase(example.length, float(meta.get("depth", 0.0)),
                                                            meta["key"], value))
    else:
        result = needle.score_text(prediction, value, value, "")
    return {"score": result["exact_match"], **result}


def ruler_all(prediction: str, example: Example) -> dict[str, float]:
    """RULER's string_match_all: the fraction of references found (case-insensitive) in the prediction."""
    pred = prediction.lower()
    found = sum(ref.lower() in pred for ref in example.answers)
    return {"score": found / len(example.answers) if example.answers else 0.0}


def ruler_part(prediction: str, example: Example) -> dict[str, float]:
    """RULER's string_match_part: 1 if any reference is found (case-insensitive), used for its QA tasks."""
    pred = prediction.lower()
    return {"score": float(any(ref.lower() in pred for ref in example.answers))}


# ---------------------------------------------------------------- LongBench: text normalisation

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = _EN_PUNCT | set(_CN_PUNCTUATION)
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def normalize_answer(text: str) -> str:
    """LongBench's (SQuAD's) English normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _zh_tokens(text: str) -> list[str]:
    """Chinese text as tokens without jieba: each CJK character, each run of other characters.

    Punctuation and spaces are dropped and text lowercased, as LongBench's normalize_zh_answer does.
    """
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCT)
    return re.findall(rf"[{_CJK}]|[^\s{_CJK}]+", text)


def _f1(prediction: list[str], reference: list[str]) -> float:
    """Token-multiset F1, as LongBench's f1_score."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l(prediction: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 = 2PR/(P+R) with P = LCS/len(prediction), R = LCS/len(reference)."""
    if not prediction or not reference:
        return 0.0
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- LongBench: per-answer scores


def qa_f1(prediction: str, answer: str, example: Example | None = None) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str, example: Example | None = None) -> float:
    return _f1(_zh_tokens(prediction), _zh_tokens(answer))


def rouge_l(prediction: str, answer: str, example: Example | None = None) -> float:
    """Over lowercased word tokens (``\\w+``), so punctuation and case do not count."""
    return _rouge_l(re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", answer.lower()))


def rouge_l_zh(prediction: str, answer: str, example: Example | None = None) -> float:
    return _rouge_l(_zh_tokens(prediction), _zh_tokens(answer))


def classification(prediction: str, answer: str, example: Example | None = None) -> float:
    """LongBench's classification_score: the classes named in the prediction must include the answer.

    Classes that are only a part of the answer's name ("Bird" inside "Bird species") are ignored;
    naming several classes splits the credit between them.
    """
    classes = (example.meta.get("all_classes") if example else None) or []
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not (c in answer and c != answer)]
    return 1.0 / len(named) if answer in named else 0.0


def _passage_number_score(prediction: str, answer: str, pattern: str) -> float:
    """Of all the numbers in the prediction, the fraction that are the right passage number."""
    wanted = re.findall(pattern, answer)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def retrieval(prediction: str, answer: str, example: Example | None = None) -> float:
    return _passage_number_score(prediction, answer, r"Paragraph (\d+)")


def retrieval_zh(prediction: str, answer: str, example: Example | None = None) -> float:
    return _passage_number_score(prediction, answer, r"段落(\d+)")


def count(prediction: str, answer: str, example: Example | None = None) -> float:
    """Of all the numbers in the prediction, the fraction equal to the count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(answer) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim(prediction: str, answer: str, example: Example | None = None) -> float:
    """Similarity of the first code line of the prediction to the reference line.

    The first line that is not a comment or a code fence (no `` ` ``, ``#``, ``//``), compared with
    ``difflib.SequenceMatcher(...).ratio()`` rounded to whole percent. That is exactly what
    LongBench's ``fuzz.ratio`` computes in its own environment: fuzzywuzzy falls back to difflib when
    python-Levenshtein is absent, and LongBench's requirements do not install it.
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(100 * SequenceMatcher(None, line, answer).ratio()) / 100


def _best_of_answers(per_answer: Callable[[str, str, Example | None], float]) -> Callable[[str, Example], dict]:
    """Wrap a per-answer LongBench score: first line only where LongBench cuts it, best over answers."""

    def metric(prediction: str, example: Example) -> dict[str, float]:
        if example.meta.get("first_line_only"):  # trec, triviaqa, samsum, lsht: few-shot tasks ramble on
            prediction = prediction.lstrip("\n").split("\n")[0]
        best = max((per_answer(prediction, answer, example) for answer in example.answers), default=0.0)
        return {"score": float(best)}

    metric.__name__ = per_answer.__name__
    metric.__doc__ = per_answer.__doc__
    return metric


METRICS: dict[str, Callable[[str, Example], dict[str, float]]] = {
    "needle": needle_score,
    "ruler_all": ruler_all,
    "ruler_part": ruler_part,
    "qa_f1": _best_of_answers(qa_f1),
    "qa_f1_zh": _best_of_answers(qa_f1_zh),
    "rouge_l": _best_of_answers(rouge_l),
    "rouge_l_zh": _best_of_answers(rouge_l_zh),
    "classification": _best_of_answers(classification),
    "retrieval": _best_of_answers(retrieval),
    "retrieval_zh": _best_of_answers(retrieval_zh),
    "count": _best_of_answers(count),
    "code_sim": _best_of_answers(code_sim),
}
