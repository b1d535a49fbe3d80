"""The embedded default model end to end (installed in CI, so these run there)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli.app import app
from uncomp_cli.engine.generation import GenerationSettings, generate

pytestmark = pytest.mark.slow


def test_capital_of_france_is_paris(embedded):
    result = generate(embedded, "What is the capital of France?", GenerationSettings(max_new_tokens=20))
    assert "Paris" in result.text
    assert result.model == "smollm2-135m"


def test_cli_json_on_the_default_model():
    result = CliRunner().invoke(app, ["generate", "What is the capital of France?", "--max-new-tokens", "4",
                                      "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"].startswith("The capital of France") and data["model"] == "smollm2-135m"
    # Stopped by the limit, so the last new token was never fed: 30 layers x 3 KV heads x 64 dims
    # x 2 (K and V) x 4 bytes for each token seen.
    assert data["new_tokens"] == 4
    assert data["full_kv_cache_bytes"] == 30 * 3 * 64 * 2 * 4 * (data["prompt_tokens"] + 3)


def test_uncomp_answers_a_short_question_with_its_default_budget():
    """10 % of a 37-token question is under the observation window: the prompt is kept whole (with a
    note on stderr) instead of the exit 2 a new user used to meet first."""
    result = CliRunner().invoke(app, ["generate", "--method", "uncomp", "--max-new-tokens", "12", "--json",
                                      "What is the capital of France?"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert "Paris" in data["text"]
    assert data["kv_budget_tokens"] == data["prompt_tokens"] and "note: budget 10%" in result.stderr
