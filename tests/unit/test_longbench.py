"""LongBench files: templates filled, middle truncation within max_length, errors that name file and line."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import longbench
from uncomp_cli.eval.metrics import METRICS


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def record(i=0, **fields):
    base = {"input": f"Who wrote book {i}?", "context": f"Passage {i}: the book was written by Ann.",
            "answers": ["Ann"], "length": 9, "dataset": "hotpotqa", "language": "en", "all_classes": None,
            "_id": f"id{i}"}
    return {**base, **fields}


def write(folder, name, records):
    folder.mkdir(exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_template_filled_and_chat_applied(tmp_path, tok):
    write(tmp_path, "hotpotqa", [record(0), record(1)])
    examples = longbench.load_examples(tmp_path, tok, max_length=2000)
    assert [e.id for e in examples] == ["hotpotqa-id0", "hotpotqa-id1"]
    first = examples[0]
    text = tok.decode(first.prompt_ids)
    expected = longbench.PROMPTS["hotpotqa"].format(context=record(0)["context"], input=record(0)["input"])
    assert text == f"<|user|>{expected}</s><|assistant|>"
    assert first.answers == ("Ann",) and first.metric == "qa_f1" and first.max_new_tokens == 32
    assert first.length == 2000 and first.meta["truncated"] is False and first.meta["dataset"] == "hotpotqa"


def test_few_shot_and_code_tasks_stay_raw(tmp_path, tok):
    classes = ["Location", "Number"]
    write(tmp_path, "trec", [record(0, input="Question: Where is Oslo?\nType:", context="Question: x\nType: Number",
                                    answers=["Location"], all_classes=classes, dataset="trec")])
    write(tmp_path, "lcc", [record(0, context="def f():\n", answers=["    return 1"], dataset="lcc")])
    trec, lcc = longbench.load_examples(tmp_path, tok, tasks=["trec", "lcc"])
    assert "<|user|>" not in tok.decode(trec.prompt_ids)
    assert tok.decode(lcc.prompt_ids) == "Please complete the code given below. \ndef f():\nNext line of code:\n"
    assert trec.meta["all_classes"] == classes and trec.meta["first_line_only"]
    # the metric reads the classes from meta and only the first line of the reply
    assert METRICS[trec.metric]("Location\nNumber", trec)["score"] == 1.0
    assert METRICS[lcc.metric]("    return 1\n", lcc)["score"] == 1.0


def test_middle_truncation_keeps_head_and_tail_within_max_length(tmp_path, tok):
    middle = " ".join(f"filler{i}" for i in range(400))
    context = f"HEADSTART {middle} TAILEND"
    write(tmp_path, "hotpotqa", [record(0, context=context)])
    full = longbench.load_examples(tmp_path, tok, max_length=100_000)[0]
    cut = longbench.load_examples(tmp_path, tok, max_length=300)[0]
    assert len(full.prompt_ids) > 1000 and not full.meta["truncated"]
    assert 295 <= len(cut.prompt_ids) <= 300 and cut.meta["truncated"]
    text = tok.decode(cut.prompt_ids)
    assert text.startswith("<|user|>Answer the question based on the given passages.")
    assert text.endswith(f"Question: {record(0)['input']}\nAnswer:</s><|assistant|>")
    assert "filler200 " not in text and "HEADSTART" in text  # the middle goes, the head stays
    # the tail of the context survives only if the question is short enough; here it is
    assert "TAILEND" in text


def test_context_length_leaves_room_for_the_answer(tmp_path, tok):
    write(tmp_path, "gov_report", [record(0, context="word " * 3000, answers=["summary"])])
    example = longbench.load_examples(tmp_path, tok, max_length=100_000, context_length=1024)[0]
    assert example.max_new_tokens == 512 and example.length == 512
    assert len(example.prompt_ids) <= 1024 - 512


def test_limit_and_task_selection(tmp_path, tok):
    write(tmp_path, "hotpotqa", [record(i) for i in range(5)])
    write(tmp_path, "musique", [record(i) for i in range(3)])
    assert len(longbench.load_examples(tmp_path, tok)) == 8
    picked = longbench.load_examples(tmp_path, tok, tasks=["musique"], limit=2)
    assert [e.id for e in picked] == ["musique-id0", "musique-id1"]


def test_longbench_e_files_use_their_dataset(tmp_path, tok):
    write(tmp_path, "hotpotqa_e", [record(0)])
    example = longbench.load_examples(tmp_path, tok)[0]
    assert example.task == "hotpotqa_e" and example.metric == "qa_f1" and example.id == "hotpotqa_e-id0"


@pytest.mark.parametrize("lines,message", [
    ([record(0), "{not json"], r"hotpotqa.jsonl line 2: invalid JSON"),
    ([record(0), record(1), {k: v for k, v in record(2).items() if k != "answers"}],
     r"hotpotqa.jsonl line 3: missing field 'answers'"),
    ([record(0, answers="Ann")], r"hotpotqa.jsonl line 1: field 'answers' must be a non-empty list"),
    ([record(0), record(0)], r"hotpotqa.jsonl line 2: duplicate _id 'id0'"),
    (["[1, 2]"], r"hotpotqa.jsonl line 1: expected a JSON object"),
    ([""], r"hotpotqa.jsonl has no examples"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, tok, lines, message):
    write(tmp_path, "hotpotqa", lines)
    with pytest.raises(UncompError, match=message):
        longbench.load_examples(tmp_path, tok)


def test_classification_needs_its_classes(tmp_path, tok):
    write(tmp_path, "trec", [record(0, all_classes=None)])
    with pytest.raises(UncompError, match="trec.jsonl line 1: trec needs 'all_classes'"):
        longbench.load_examples(tmp_path, tok)


def test_bad_folders_and_tasks(tmp_path, tok):
    with pytest.raises(UncompError, match="LongBench folder not found"):
        longbench.load_examples(tmp_path / "missing", tok)
    with pytest.raises(UncompError, match="no .jsonl files in"):
        longbench.load_examples(tmp_path, tok)
    write(tmp_path, "mystery", [record(0)])
    with pytest.raises(UncompError, match="unknown LongBench task 'mystery'; known: narrativeqa, qasper"):
        longbench.load_examples(tmp_path, tok)
    with pytest.raises(UncompError, match="no musique.jsonl in"):
        longbench.load_examples(tmp_path, tok, tasks=["musique"])
    with pytest.raises(UncompError, match="unknown LongBench task 'hotpot'"):
        longbench.load_examples(tmp_path, tok, tasks=["hotpot"])
    (tmp_path / "hotpotqa.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UncompError, match="hotpotqa.jsonl is not UTF-8"):
        longbench.load_examples(tmp_path, tok, tasks=["hotpotqa"])


def test_every_task_has_a_prompt_length_and_metric():
    assert set(longbench.PROMPTS) == set(longbench.MAX_NEW_TOKENS) == set(longbench.METRIC)
    assert set(longbench.METRIC.values()) <= set(METRICS)
    assert all("{context}" in p for p in longbench.PROMPTS.values())
