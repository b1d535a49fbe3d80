"""Long filler text from a folder of ``.txt`` files (e.g. Paul Graham essays) for needles and benchmarks.

Shared by the eval suites and ``uncomp bench --haystack``; the package ships no haystack itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from uncomp_cli.errors import UncompError


def load_haystack(folder: str | Path) -> str:
    """All ``.txt`` files of ``folder`` (licence files excepted), sorted by name, joined."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UncompError(f"haystack folder not found: {folder}")
    files = [p for p in sorted(folder.glob("*.txt")) if not p.name.upper().startswith("LICENSE")]
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UncompError(f"haystack file {path} is not UTF-8 text") from None
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    if not text:
        raise UncompError(f"haystack folder {folder} has no text files")
    return re.sub(r"[ \t]+", " ", text)
