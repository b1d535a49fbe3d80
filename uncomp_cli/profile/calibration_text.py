"""Calibration text: reading ``--data`` sources, the built-in source, and cutting token windows.

Sources (:func:`read_texts`): plain-text files, folders (every file inside, recursively, sorted;
hidden files skipped), glob patterns (``'essays/*.txt'``, expanded here so quoting works), JSONL
files (one object per line with a string ``text`` field) and ``-`` for stdin. Text must be UTF-8;
anything else is refused with the file's name.

Built-in source (:func:`builtin_texts`): the docstrings of the Python standard library's top-level
modules, read with :mod:`ast` from the installed interpreter's source files (nothing is imported or
downloaded, and no text ships with uncomp). It is technical English prose with some code, stable
for a given Python version; its hash goes into the profile. ``docs/calibration.md`` compares it
with essays.

Windows (:func:`token_windows`): the texts are tokenised, joined (EOS between documents when the
tokenizer has one) into one stream, and ``samples`` non-overlapping windows of ``seq_len`` tokens
are taken evenly spaced over it. Each window starts with the tokens the tokenizer adds to any
input (e.g. BOS), exactly as the model sees a prompt.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from uncomp_cli.errors import UncompError

logger = logging.getLogger(__name__)

#: Documents shorter than this (characters) are skipped by the built-in source.
MIN_DOCSTRING_CHARS = 80
_GLOB_CHARS = set("*?[")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class CalibrationText:
    """Documents read from the calibration sources, with a description and a content hash."""

    documents: tuple[str, ...]
    description: str

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for document in self.documents:
            digest.update(document.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.documents)


@dataclass(frozen=True)
class CalibrationWindows:
    """Token windows ready for the model. ``input_ids``: ``[samples, seq_len]`` int64."""

    input_ids: torch.Tensor
    description: str
    sha256: str

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


# ---------------------------------------------------------------------------------------- reading
def read_texts(sources: Sequence[str], stdin: IO[bytes] | None = None) -> CalibrationText:
    """Read every source into documents. Raises :class:`UncompError` naming the offending source.

    sources: paths, folders, glob patterns or ``-`` (stdin, read once).
    """
    if not sources:
        raise UncompError("no calibration data given")
    documents: list[str] = []
    files: list[Path] = []
    used_stdin = False
    for source in sources:
        if source == "-":
            if used_stdin:
                continue
            used_stdin = True
            stream = stdin if stdin is not None else sys.stdin.buffer
            documents.append(_decode(stream.read(), "stdin"))
            continue
        for path in _expand(source):
            files.append(path)
            documents.extend(_read_file(path))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UncompError(f"the calibration data ({', '.join(sources)}) contains no text")
    return CalibrationText(tuple(documents), _describe(files, used_stdin, sum(len(d) for d in documents)))


def _expand(source: str) -> list[Path]:
    if any(c in _GLOB_CHARS for c in source) and not Path(source).exists():
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise UncompError(f"no files match {source!r}")
        return files
    path = Path(source)
    if not path.exists():
        raise UncompError(f"calibration data not found: {source}")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UncompError(f"folder {source} contains no files")
        return files
    return [path]


def _read_file(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UncompError(f"cannot read {path}: {exc.strerror or exc}") from None
    text = _decode(raw, str(path))
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return _jsonl_texts(text, path)
    return [text]


def _decode(raw: bytes, name: str) -> str:
    if b"\x00" in raw[:8192]:
        raise UncompError(f"{name} is not text (binary data); calibration needs UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UncompError(f"{name} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _jsonl_texts(text: str, path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            raise UncompError(f"{path} line {number}: not valid JSON") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise UncompError(f"{path} line {number}: no string field 'text'")
        texts.append(value)
    return texts


def _describe(files: list[Path], used_stdin: bool, chars: int) -> str:
    parts = []
    if files:
        parents = {str(f.parent) for f in files}
        where = f" in {parents.pop()}" if len(parents) == 1 else ""
        parts.append(f"{len(files)} file{'s' if len(files) != 1 else ''}{where}" if len(files) > 1 else str(files[0]))
    if used_stdin:
        parts.append("stdin")
    return f"{' + '.join(parts)} ({chars:,} characters)"


# ---------------------------------------------------------------------------------------- built-in
def builtin_source_root() -> Path:
    """The folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_builtin_documents(root: Path | None = None) -> Iterator[str]:
    """Docstrings (module, class, function) of the standard library's top-level ``*.py`` files.

    Deterministic: files in sorted order, definitions in source order. Nothing is imported.
    """
    root = root or builtin_source_root()
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    yield doc


def builtin_texts(min_tokens: int, tokenizer: Any | None = None) -> CalibrationText:
    """Enough built-in documents for at least ``min_tokens`` tokens (a quarter more, for spacing).

    With a tokenizer, tokens are counted exactly; without, about 4 characters make a token.
    """
    wanted = int(max(1, min_tokens) * 1.25)
    documents: list[str] = []
    tokens = chars = 0
    for doc in iter_builtin_documents():
        documents.append(doc)
        chars += len(doc)
        tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(doc) // 4
        if tokens >= wanted:
            break
    if not documents:
        raise UncompError(f"no Python standard library sources found under {builtin_source_root()}; pass --data")
    version = ".".join(str(v) for v in sys.version_info[:3])
    return CalibrationText(
        tuple(documents), f"built-in: Python {version} standard library docstrings ({chars:,} characters)"
    )


# ---------------------------------------------------------------------------------------- windows
def token_windows(text: CalibrationText, tokenizer: Any, samples: int, seq_len: int) -> CalibrationWindows:
    """Cut ``samples`` windows of ``seq_len`` tokens, evenly spaced over the tokenised text.

    Raises :class:`UncompError` when the text is too short, saying how many tokens are needed.
    Returns windows whose ``input_ids`` are ``[samples, seq_len]`` int64.
    """
    check_window_settings(samples, seq_len)
    prefix = _special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise UncompError(f"--seq-len {seq_len} leaves no room after the tokenizer's {len(prefix)} special tokens")
    stream = _token_stream(text.documents, tokenizer)
    available = len(stream) // body
    if available < samples:
        needed = samples * body
        raise UncompError(
            f"not enough calibration text: {samples} samples × {seq_len} tokens "
            f"need {needed:,} tokens of text, "
            f"found {len(stream):,} ({available} window{'s' if available != 1 else ''}); "
            "add text or lower --samples/--seq-len"
        )
    starts = _evenly_spaced(available, samples)
    rows = [prefix + stream[i * body : (i + 1) * body] for i in starts]
    return CalibrationWindows(torch.tensor(rows, dtype=torch.int64), text.description, text.sha256)


def check_window_settings(samples: int, seq_len: int) -> None:
    """Raise :class:`UncompError` unless ``samples ≥ 1`` and ``seq_len ≥ 2``."""
    if samples < 1:
        raise UncompError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise UncompError(f"--seq-len must be at least 2 tokens (got {seq_len})")


def _evenly_spaced(available: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    return [round(i * (available - 1) / (count - 1)) for i in range(count)]


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text by default (BOS for Llama-2; nothing for SmolLM2)."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    if without and with_special[len(with_special) - len(without) :] == without:
        return with_special[: len(with_special) - len(without)]
    return []


def _token_stream(documents: Iterable[str], tokenizer: Any) -> list[int]:
    separator = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    stream: list[int] = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if stream and separator:
            stream.extend(separator)
        stream.extend(ids)
    return stream
