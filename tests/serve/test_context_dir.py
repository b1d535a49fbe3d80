"""--context-dir: documents' prefixes shared through a folder by servers (replicas) of one model."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from serving import MODEL, start_server

from uncomp_cli.serve.context_dir import SUFFIX, ContextDirectory
from uncomp_cli.serve.server import ServeSettings

DOCUMENT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 10)


def settings(folder: Path) -> ServeSettings:
    return ServeSettings(method="snapkv", method_options={"budget": "50%", "window": 4, "kernel": 3},
                         reuse_min_tokens=64, served_model_name=MODEL, context_dir=str(folder))


def ask(running, question: str, document: str = DOCUMENT, method: str | None = None):
    extra = {"uncomp": {"method": method}} if method else None
    return running.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": document + "\n\n" + question}], max_tokens=6,
        temperature=0, extra_body=extra)


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}"))


def wait_for_files(folder: Path, count: int) -> list[Path]:
    """The folder's files once ``count`` are there (a server writes them in the background)."""
    for _ in range(600):
        if len(found := files(folder)) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} files never appeared in {folder}: {files(folder)}")


@pytest.fixture
def two_servers(tiny_loaded, tiny_profile, tmp_path):
    """Two servers of one model sharing a context folder, as two replicas would."""
    folder = tmp_path / "contexts"
    first = start_server(tiny_loaded, settings(folder), str(tiny_profile))
    second = start_server(tiny_loaded, settings(folder), str(tiny_profile))
    yield folder, first, second
    first.stop()
    second.stop()


def test_a_document_prefilled_by_one_server_is_loaded_by_another(two_servers):
    folder, first, second = two_servers
    made = ask(first, "What does the fox do?")
    assert made.model_extra["uncomp"]["context_reused"] is False
    wait_for_files(folder, 1)
    loaded = ask(second, "What does the fox do?")
    assert loaded.model_extra["uncomp"]["context_reused"] is True
    assert loaded.model_extra["uncomp"]["context_from"] == "directory"
    assert loaded.choices[0].message.content == made.choices[0].message.content  # same tokens, same answer
    again = ask(second, "And the dog?")
    assert again.model_extra["uncomp"]["context_from"] == "memory"  # now held by the second server too
    assert len(files(folder)) == 1  # one file per document, whatever the question or method
    full = ask(second, "What does the fox do?", method="full")
    assert full.model_extra["uncomp"]["context_reused"] is True


def test_a_damaged_file_is_skipped_removed_and_never_served(two_servers, caplog):
    folder, first, second = two_servers
    reference = ask(first, "What does the fox do?").choices[0].message.content
    path = wait_for_files(folder, 1)[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="uncomp.serve"):
        answer = ask(second, "What does the fox do?")
    assert answer.model_extra["uncomp"]["context_reused"] is False
    assert answer.choices[0].message.content == reference
    assert any("skipping" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
    assert not path.exists() or path.read_bytes() != raw[: len(raw) // 2]  # removed (or written anew)


def _metadata(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


def test_a_file_of_other_weights_is_refused(tiny_loaded, tmp_path, caplog):
    from uncomp_cli.serve.prefill import PrefixStore

    folder = tmp_path / "contexts"
    directory = ContextDirectory(folder, 1 << 30, tiny_loaded.model, tiny_loaded.dtype, tiny_loaded.device)
    prefix = _prefix(tiny_loaded)
    path = directory.save("doc", prefix)
    metadata = _metadata(path)
    path.write_bytes(save_bytes(load_bytes(path.read_bytes()), metadata=metadata | {"weights_fingerprint": "f" * 64}))
    with caplog.at_level(logging.WARNING, logger="uncomp.serve"):
        assert PrefixStore(1 << 30, directory).get("doc") is None
    assert "weights_fingerprint" in caplog.text and not path.exists()


def _prefix(loaded, tokens: int = 40):
    """A document's prefix as a server keeps it: every layer deferred, holding every token."""
    import torch

    from uncomp_cli.policies.registry import make_policy
    from uncomp_cli.serve.prefill import Prefix, PrefixStore, document_key, start_feed

    store = PrefixStore(1 << 30)
    ids = list(range(5, 5 + tokens + 4))
    feed = start_feed(loaded.model, make_policy("snapkv", budget="50%"), ids, 16, ids[:tokens], store)
    with torch.inference_mode():
        while feed.advance() is None:
            pass
    prefix = store.get(document_key(ids[:tokens]))
    assert isinstance(prefix, Prefix) and prefix.tokens == tokens
    return prefix


def test_a_saved_prefix_loads_back_tensor_for_tensor(tiny_loaded, tmp_path):
    import torch

    directory = ContextDirectory(tmp_path, 1 << 30, tiny_loaded.model, tiny_loaded.dtype, tiny_loaded.device)
    prefix = _prefix(tiny_loaded)
    directory.save("doc", prefix)
    back = directory.load("doc")
    assert back.tokens == prefix.tokens and len(back.layers) == len(prefix.layers)
    for original, restored in zip(prefix.layers, back.layers):
        assert restored.holds_whole_context()
        for name in ("keys", "values", "valid", "positions"):
            assert torch.equal(getattr(original.groups[0], name), getattr(restored.groups[0], name))
        assert torch.equal(original._window_queries, restored._window_queries)
        assert (original.seen, original._scaling) == (restored.seen, restored._scaling)
    assert directory.load("another") is None and directory.misses == 1


def test_the_folder_keeps_under_its_limit_dropping_the_least_recently_used(tiny_loaded, tmp_path):
    import os

    directory = ContextDirectory(tmp_path, 1 << 30, tiny_loaded.model, tiny_loaded.dtype, tiny_loaded.device)
    prefix = _prefix(tiny_loaded)
    size = directory.save("a", prefix).stat().st_size
    directory.limit_bytes = int(2.5 * size)
    directory.save("b", prefix)
    os.utime(directory.file_for("a"), (1, 1))
    os.utime(directory.file_for("b"), (2, 2))
    assert directory.load("a") is not None  # a hit makes "a" the most recent
    directory.save("c", prefix)
    assert directory.file_for("a").exists() and directory.file_for("c").exists()
    assert not directory.file_for("b").exists()
    assert directory.nbytes() <= directory.limit_bytes
