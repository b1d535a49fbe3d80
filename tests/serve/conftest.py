"""A server on a free port, in this process, over the tiny random model: the openai client talks to it."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serving import MODEL, start_server  # noqa: E402

from uncomp_cli.models.loading import load_model  # noqa: E402
from uncomp_cli.serve.server import ServeSettings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def running(tiny_loaded, tiny_profile):
    """SnapKV at 50 % by default; contexts of 64 tokens and more are reused."""
    settings = ServeSettings(method="snapkv", method_options={"budget": "50%", "window": 4, "kernel": 3},
                             max_batch=8, max_queue=32, reuse_min_tokens=64, served_model_name=MODEL)
    handle = start_server(tiny_loaded, settings, str(tiny_profile))
    yield handle
    handle.stop()


@pytest.fixture
def client(running):
    return running.client()
