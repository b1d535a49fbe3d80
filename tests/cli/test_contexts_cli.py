"""``uncomp compress`` and ``uncomp generate --context…``: one compression, many questions, files."""

from __future__ import annotations

import json

from generate_cli import as_json, run
from typer.testing import CliRunner

from uncomp_cli.cli.app import app

CONTEXT = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))


def compress(*args):
    return CliRunner().invoke(app, ["compress", *map(str, args)])


def json_lines(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_each_question_is_one_json_line_on_one_compressed_context(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    questions = tmp_path / "q.txt"
    questions.write_text("Which box holds item 30?\n\nName an item.\n")
    lines = json_lines(run("-m", tiny_model_dir, "--context-file", doc, "Where is item 12?", "-q", "Any other?",
                           "--questions-file", questions, "--method", "snapkv", "--budget", 24, "--window", 4,
                           "--kernel", 3, "--max-new-tokens", 4, "--json"))
    assert [line["question"] for line in lines] == ["Where is item 12?", "Any other?", "Which box holds item 30?",
                                                    "Name an item."]
    assert len({line["context_kv_cache_bytes"] for line in lines}) == 1  # one compression served them all
    assert all(line["method"] == "snapkv" and line["context_tokens"] < line["prompt_tokens"] for line in lines)


def test_a_saved_context_answers_like_compressing_it_again(tiny_model_dir, tmp_path):
    doc, out = tmp_path / "doc.txt", tmp_path / "doc.uncomp"
    doc.write_text(CONTEXT)
    options = ["--method", "snapkv", "--budget", 24, "--window", 4, "--kernel", 3]
    summary = compress("-m", tiny_model_dir, "--context-file", doc, "--out", out, *options, "--json")
    assert summary.exit_code == 0, summary.stderr
    data = json.loads(summary.stdout)
    assert data["kv_cache_bytes"] < data["full_kv_cache_bytes"] and out.is_file()
    direct = as_json(run("-m", tiny_model_dir, "--context-file", doc, "Where is item 12?", *options,
                         "--max-new-tokens", 5, "--json"))
    reused = as_json(run("-m", tiny_model_dir, "--context", out, "Where is item 12?", "--max-new-tokens", 5,
                         "--json"))
    assert reused["text"] == direct["text"] and reused["kv_cache_bytes"] == direct["kv_cache_bytes"]
    assert reused["context_prefill_seconds"] == 0  # nothing was prefilled again


def test_a_gate_scored_context_is_made_once_and_saved(tiny_model_dir, tmp_path):
    """--context-scorer gate trains the model's gate on first use, caches it and answers alike."""
    from uncomp_cli.models.loading import cache_root

    doc, out = tmp_path / "doc.txt", tmp_path / "doc.uncomp"
    doc.write_text(CONTEXT)
    options = ["--method", "snapkv", "--budget", 24, "--window", 4, "--kernel", 3, "--context-scorer", "gate"]
    summary = compress("-m", tiny_model_dir, "--context-file", doc, "--out", out, *options, "--json")
    assert summary.exit_code == 0, summary.stderr
    assert json.loads(summary.stdout)["context_scorer"] == "gate"
    assert len(list((cache_root() / "gates").glob("*.safetensors"))) == 1
    direct = as_json(run("-m", tiny_model_dir, "--context-file", doc, "Where is item 12?", *options,
                         "--max-new-tokens", 5, "--json"))
    reused = as_json(run("-m", tiny_model_dir, "--context", out, "Where is item 12?", "--max-new-tokens", 5,
                         "--json"))
    assert reused["text"] == direct["text"] and reused["kv_cache_bytes"] == direct["kv_cache_bytes"]


def test_an_8_bit_context_file_answers_as_the_context_rounded_in_memory(tiny_model_dir, tmp_path):
    doc, out = tmp_path / "doc.txt", tmp_path / "doc.uncomp"
    doc.write_text(CONTEXT)
    options = ["--method", "snapkv", "--budget", 24, "--window", 4, "--kernel", 3, "--kv-bits", 8]
    summary = compress("-m", tiny_model_dir, "--context-file", doc, "--out", out, *options, "--json")
    assert summary.exit_code == 0, summary.stderr
    written = json.loads(summary.stdout)
    plain = json.loads(compress("-m", tiny_model_dir, "--context-file", doc, "--out", tmp_path / "plain.uncomp",
                                *options[:-2], "--json").stdout)
    assert written["kv_bits"] == 8 and written["kv_cache_bytes"] < 0.5 * plain["kv_cache_bytes"]
    direct = as_json(run("-m", tiny_model_dir, "--context-file", doc, "Where is item 12?", *options,
                         "--max-new-tokens", 5, "--json"))
    reused = as_json(run("-m", tiny_model_dir, "--context", out, "Where is item 12?", "--max-new-tokens", 5,
                         "--json"))
    assert reused["text"] == direct["text"] and reused["kv_cache_bytes"] == direct["kv_cache_bytes"]
    refused = compress("-m", tiny_model_dir, "--context-file", doc, "--out", tmp_path / "f.uncomp", "--method",
                       "full", "--kv-bits", 8)
    assert refused.exit_code == 2 and "--kv-bits rounds a compressed cache" in refused.stderr
    assert not (tmp_path / "f.uncomp").exists()


def test_context_errors_are_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.uncomp"
    bad.write_text("not a context")
    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    for args, message in [
        (["--context", bad, "q?"], "is not a compressed context file"),
        (["--context", bad, "q?", "--method", "snapkv"], "a compressed context file brings its own method"),
        (["-q", "q?", "hello"], "--question, --questions-file, --answer-prefix, --context-scorer and --kv-bits are "
                                "for a context"),
        (["--kv-bits", 8, "hello"], "--context-scorer and --kv-bits are for a context"),
        (["--context-file", doc, "q?", "--kv-bits", 4], "--kv-bits must be 8 (or left out), got 4"),
        (["--context", bad, "q?", "--kv-bits", 8], "keeps the bits it was compressed with"),
        (["--context-file", doc], "no question for the context"),
        (["--context-file", doc, "q?", "--context-scorer", "magic"], "--context-scorer must be one of window, "
                                                                     "reconstruct, gate, got 'magic'"),
        (["--context-file", doc, "--context", bad, "q?"], "either with --context or with --context-file"),
    ]:
        result = run("-m", tiny_model_dir, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr and result.stdout == ""
    out = tmp_path / "nowhere" / "doc.uncomp"
    result = compress("-m", tiny_model_dir, "--context-file", doc, "--out", out, "--method", "full")
    assert result.exit_code == 2 and "does not exist" in result.stderr and not out.parent.exists()


def test_jsonl_lines_take_a_context_with_questions_beside_plain_prompts(tiny_model_dir, tmp_path):
    lines = [{"id": "a", "prompt": "hello there"},
             {"id": "doc", "context": CONTEXT, "questions": ["Where is item 12?", "Name an item."]},
             {"prompt": "bye"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = json_lines(run("-m", tiny_model_dir, "--input", source, "--max-new-tokens", 3, "--method", "snapkv",
                             "--budget", 24, "--window", 4, "--kernel", 3))
    assert [(r["id"], r.get("question_index")) for r in results] == [("a", None), ("doc", 0), ("doc", 1), (3, None)]
    assert results[1]["context_kv_cache_bytes"] == results[2]["context_kv_cache_bytes"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": CONTEXT, "questions": []}) + "\n")
    result = run("-m", tiny_model_dir, "--input", bad)
    assert result.exit_code == 2 and "line 1: 'questions' must be a list of non-empty strings" in result.stderr
