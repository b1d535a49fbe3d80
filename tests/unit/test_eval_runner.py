"""The evaluation runner: files and their aggregates, resuming, folder naming, errors (the grid: test_grid)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.eval import metrics as metrics_module
from uncomp_cli.eval import runner
from uncomp_cli.eval.examples import Example
from uncomp_cli.eval.runner import EvalSettings, run_eval

SELECTION = {"window": 8, "kernel": 3}


@pytest.fixture(scope="module")
def loaded():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    return SimpleNamespace(model=model, tokenizer=tokenizer, name="tiny-llama", device=torch.device("cpu"),
                           dtype=torch.float32, source=SimpleNamespace(kind="test", location="tiny-llama"))


@pytest.fixture(autouse=True)
def test_metric(monkeypatch):
    """A metric whose scores vary with the prediction, so means can be checked against the rows."""

    def metric(prediction: str, example: Example) -> dict:
        return {"score": float(example.answers[0] in prediction), "chars": float(len(prediction) % 7)}

    monkeypatch.setitem(metrics_module.METRICS, "test_metric", metric)


def make_examples(tokenizer, lengths=(60, 90), depths=(0.0, 1.0)) -> list[Example]:
    examples = []
    for length in lengths:
        for depth in depths:
            words = "the quick brown fox jumps over the lazy dog, hello world " * 20
            ids = tokenizer(words, add_special_tokens=False)["input_ids"][: length - (7 if depth else 3)]
            examples.append(Example(id=f"t-{length}-{depth:g}", task="alpha" if depth else "beta",
                                    prompt_ids=tuple(ids), answers=("the",), metric="test_metric",
                                    max_new_tokens=4, length=length, meta={"depth": depth}))
    return examples


def read_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def settings(*methods: str, **changes) -> EvalSettings:
    """``methods`` as given (``snapkv@24``: snapkv at 24 tokens); no budgets of their own."""
    return EvalSettings(**{"suite": "test", "methods": methods, "budgets": (), **changes})


def test_settings_keep_the_order_given_and_name_runs_by_folder():
    runs = EvalSettings("test", methods=["uncomp", "full", "snapkv", "full"], budgets=["10%", "128"]).runs()
    assert [r.name for r in runs] == ["uncomp-10pct", "uncomp-128", "full", "snapkv-10pct", "snapkv-128"]
    with pytest.raises(UncompError, match="no runs"):
        EvalSettings("test", methods=["snapkv"], budgets=[]).runs()
    with pytest.raises(UncompError, match="^--batch-size must be at least 1, got 0$"):
        settings("full", batch_size=0).validate()
    with pytest.raises(UncompError, match="^--sinks applies to streamingllm, not full, snapkv$"):
        settings("full", "snapkv@24", method_options={"sinks": 4}).validate()


def test_files_parse_and_metrics_are_the_means_of_the_predictions(loaded, tmp_path):
    examples = make_examples(loaded.tokenizer)
    plan = EvalSettings("test", suite_settings={"a": 1}, methods=["full", "snapkv"], budgets=["24"],
                        method_options=SELECTION, out=tmp_path)
    result = run_eval(loaded, examples, plan)
    assert result.folder.parent == tmp_path and result.folder.name.startswith("test-tiny-llama-")
    config = json.loads((result.folder / "config.json").read_text())
    assert config["settings"] == {"a": 1} and config["examples"] == 4 and config["selection"] == SELECTION
    assert {"machine", "versions", "model", "created"} <= set(config)
    ratios = {}
    for run in result.runs:
        rows = read_rows(run.folder)
        metrics = json.loads((run.folder / "metrics.json").read_text())
        assert metrics == run.metrics and rows == run.predictions and not run.skipped
        assert [r["id"] for r in rows] == [e.id for e in examples]  # input order
        for key in ("score", "chars"):
            mean = sum(r["scores"][key] for r in rows) / len(rows)
            assert metrics["overall"][key] == pytest.approx(mean, abs=1e-6)
            alpha = [r["scores"][key] for r in rows if r["task"] == "alpha"]
            assert metrics["by_task"]["alpha"][key] == pytest.approx(sum(alpha) / len(alpha), abs=1e-6)
            long = [r["scores"][key] for r in rows if r["length"] == 90]
            assert metrics["by_length"]["90"][key] == pytest.approx(sum(long) / len(long), abs=1e-6)
            deep = [r["scores"][key] for r in rows if r["meta"]["depth"] == 1.0]
            assert metrics["by_depth"]["1"][key] == pytest.approx(sum(deep) / len(deep), abs=1e-6)
        assert metrics["overall"]["examples"] == 4 and metrics["by_depth"]["0"]["examples"] == 2
        assert all(r["prompt_tokens"] == len(e.prompt_ids) for r, e in zip(rows, examples))
        assert all(0 < r["new_tokens"] <= 4 for r in rows)
        ratios[run.run.name] = metrics["kv_bytes_vs_full"]
    assert ratios["full"] == 1.0 and ratios["snapkv-24"] < 0.5
    assert result.to_dict()["runs"][1]["overall"] == result.runs[1].metrics["overall"]


def test_finished_runs_are_read_back_not_rerun_and_new_runs_share_the_folder(loaded, tmp_path, monkeypatch):
    examples = make_examples(loaded.tokenizer, lengths=(60,), depths=(0.0,))
    first = run_eval(loaded, examples, settings("full", out=tmp_path, method_options=SELECTION))
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.folder.rglob("*") if p.is_file()}
    calls = []
    real = runner._generate_rows
    monkeypatch.setattr(runner, "_generate_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_eval(loaded, examples, settings("full", "snapkv@24", out=tmp_path, method_options=SELECTION))
    assert again.folder == first.folder
    assert [r.skipped for r in again.runs] == [True, False] and len(calls) == 1  # only snapkv generated
    assert again.runs[0].metrics == first.runs[0].metrics and again.runs[0].predictions == first.runs[0].predictions
    for path, (mtime, data) in files.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, data)


def test_an_interrupted_run_leaves_no_metrics_and_runs_again(loaded, tmp_path, monkeypatch):
    examples = make_examples(loaded.tokenizer, lengths=(60,))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(runner, "_generate_rows", interrupted)
        run_eval(loaded, examples, settings("full", out=tmp_path))
    (folder,) = tmp_path.iterdir()
    assert not (folder / "full").exists()
    result = run_eval(loaded, examples, settings("full", out=tmp_path))
    assert not result.runs[0].skipped and (folder / "full" / "metrics.json").is_file()


@pytest.mark.parametrize("change", [
    {"suite_settings": {"seed": 2}},
    {"method_options": {"window": 8, "kernel": 5}},
    {"batch_size": 2},
    {"suite": "other"},
    {"examples": "shorter"},
])
def test_a_different_setting_gets_a_different_folder(loaded, tmp_path, change):
    base = {"suite": "test", "suite_settings": {"seed": 1}, "method_options": SELECTION, "batch_size": 1}
    examples = make_examples(loaded.tokenizer, lengths=(60,), depths=(0.0,))
    first = run_eval(loaded, examples, settings("full", out=tmp_path, **base))
    if change.pop("examples", None):
        examples = make_examples(loaded.tokenizer, lengths=(50,), depths=(0.0,))
    second = run_eval(loaded, examples, settings("full", out=tmp_path, **(base | change)))
    assert second.folder != first.folder and not second.runs[0].skipped


def test_batches_keep_input_order_and_report_their_size(loaded, tmp_path):
    examples = make_examples(loaded.tokenizer)
    result = run_eval(loaded, examples, settings("snapkv@24", out=tmp_path, method_options=SELECTION, batch_size=3))
    rows = result.runs[0].predictions
    assert [r["id"] for r in rows] == [e.id for e in examples]
    assert sorted(r["batch_size"] for r in rows) == [1, 3, 3, 3]


def test_bad_input_fails_before_anything_is_written(loaded, tmp_path):
    examples = make_examples(loaded.tokenizer, lengths=(60,), depths=(0.0,))
    unknown = [Example("x", "t", (5, 6, 7), ("a",), "no_such_metric", 2, 3)]
    with pytest.raises(UncompError, match="unknown metric no_such_metric"):
        run_eval(loaded, unknown, settings("full", out=tmp_path))
    too_long = [Example("x", "t", (5,) * 2040, ("a",), "test_metric", 16, 2040)]
    with pytest.raises(UncompError, match="needs 2040 \\+ 16 tokens; tiny-llama has a context of 2048"):
        run_eval(loaded, too_long, settings("full", out=tmp_path))
    with pytest.raises(UncompError, match="not unique"):
        run_eval(loaded, examples * 2, settings("full", out=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_budget_that_does_not_fit_the_prompts_fails_before_any_run(loaded, tmp_path):
    examples = make_examples(loaded.tokenizer, lengths=(60,), depths=(0.0,))
    with pytest.raises(UncompError, match="^snapkv-6: budget 6 is below the 8-token observation window"):
        run_eval(loaded, examples, settings("full", "snapkv@6", out=tmp_path, method_options=SELECTION))
    assert list(tmp_path.iterdir()) == []
