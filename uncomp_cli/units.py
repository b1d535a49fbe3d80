"""Human numbers on the command line: lists (``a,b``), token lengths (``4k``), memory sizes (``8GiB``).

One parser per kind, shared by every command, so ``--lengths 4k`` means the same in eval and bench.
"""

from __future__ import annotations

import re

from uncomp_cli.errors import UncompError

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)\s*([kK]?)$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]+)$")
_MEMORY_UNITS = {
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}


def split_list(text: str, option: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]`` (order kept, repeats dropped); nothing at all, or an empty item
    (``a,,b``: a typo more often than not), is an error."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise UncompError(f"{option} is empty")
    if not all(items):
        raise UncompError(f"{option} must be a comma-separated list without empty items, got {text!r}")
    return list(dict.fromkeys(items))


def parse_length(text: str, option: str = "--lengths") -> int:
    """Tokens: ``4096``, ``4k`` (k = 1024) or ``1.5k``."""
    match = _LENGTH.match(str(text).strip())
    value = float(match[1]) * (1024 if match[2] else 1) if match else 0.0
    if not match or value < 1 or value != int(value):
        raise UncompError(f"{option}: {text!r} is not a length in tokens (write 512, 1k, 4k…)")
    return int(value)


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """Comma-separated lengths, shortest first, each once."""
    return sorted({parse_length(item, option) for item in split_list(text, option)})


def parse_batch_sizes(text: str, option: str = "--batch-sizes") -> list[int]:
    sizes = []
    for item in split_list(text, option):
        if not re.fullmatch(r"-?\d+", item) or int(item) < 1:
            raise UncompError(f"batch sizes must be whole numbers of at least 1, got {item!r}")
        sizes.append(int(item))
    return sizes


def parse_memory(text: str) -> int:
    """Bytes from ``8GiB``, ``512MiB`` or ``8G`` (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; kB/MB/GB/TB of
    1000). A bare number is refused: bytes are rarely meant."""
    match = _MEMORY.match(str(text).strip())
    unit = match[2].lower() if match else ""
    if not match or unit not in _MEMORY_UNITS:
        raise UncompError(f"invalid memory size {text!r}: use a number with a unit, such as 8GiB, 512MiB or 8G")
    value = int(float(match[1]) * _MEMORY_UNITS[unit])
    if value < 1:
        raise UncompError(f"memory size {text!r} must be more than 0")
    return value
