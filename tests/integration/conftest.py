"""Integration tests run the embedded default model; its conversion is shared by the whole session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("uncomp-embedded-cache")


@pytest.fixture(autouse=True)
def _shared_conversion_cache(embedded_cache, monkeypatch):
    # Overrides the per-test cache of tests/conftest.py: convert the GGUF once per session, not per test.
    monkeypatch.setenv("UNCOMP_CACHE", str(embedded_cache))


@pytest.fixture(scope="session")
def embedded(embedded_cache):
    import os

    from uncomp_cli.models.loading import load_model

    previous = os.environ.get("UNCOMP_CACHE")
    os.environ["UNCOMP_CACHE"] = str(embedded_cache)
    try:
        return load_model(None, device="cpu")
    finally:
        if previous is None:
            os.environ.pop("UNCOMP_CACHE", None)
        else:
            os.environ["UNCOMP_CACHE"] = previous
