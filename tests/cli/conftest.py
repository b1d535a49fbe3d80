"""Fixtures the command tests share."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli.app import app


@pytest.fixture(scope="session")
def tiny_profile(tiny_model_dir, tmp_path_factory):
    """A profile calibrated on the tiny model (2 windows of 64 tokens of the built-in source)."""
    path = tmp_path_factory.mktemp("profiles") / "tiny.safetensors"
    result = CliRunner().invoke(app, ["calibrate", "-m", str(tiny_model_dir), "--samples", "2", "--seq-len", "64",
                                      "--out", str(path)])
    assert result.exit_code == 0, result.stderr
    return path
