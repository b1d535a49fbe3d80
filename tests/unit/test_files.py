"""Atomic writes: the file appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from uncomp_cli.files import atomic_open, atomic_write


def test_atomic_writes_get_the_permissions_of_an_ordinary_new_file(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.json", "{}")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644 and path.read_text() == "{}"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
