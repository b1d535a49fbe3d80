"""Documents' prefixes on disk, shared by every server that reads the folder (``--context-dir``).

A server keeps a document it prefilled in memory, at full precision and before any selection
(:class:`~uncomp_cli.serve.prefill.PrefixStore`). With a context directory it also writes it there
as a ``.uncomp`` file, so another replica (or this one after a restart) that misses in memory loads
it instead of prefilling the document again; the folder may be local disk, NFS or an object-store
mount. One file serves every method and budget, because selection happens after the question.

Files are safetensors (nothing is unpickled), written atomically, named by a digest of the model's
fingerprints (config and weights), its dtype and the document's tokens; the same fields are in the
file's metadata and checked on load with the token count, so a file of another model, a damaged
one or a foreign one is logged, removed and skipped, never served. The folder is kept under a byte
limit: the least recently used files (by modification time, touched on every hit) go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from uncomp_cli.contexts.file import export_layers, file_metadata, layer_tensors, weights_fingerprint
from uncomp_cli.engine.cache import GroupedKVLayer
from uncomp_cli.engine.plan import LayerPlan
from uncomp_cli.files import atomic_write
from uncomp_cli.profile.file import model_fingerprint

log = logging.getLogger("uncomp.serve")

PREFIX_FORMAT = "uncomp-prefix"
PREFIX_VERSION = 1
SUFFIX = ".uncomp"


class ContextDirectory:
    """Prefixes of one model in ``path``, at most ``limit_bytes`` of files in all."""

    def __init__(self, path: str | os.PathLike[str], limit_bytes: int, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self.device = device
        self.identity = {"format": PREFIX_FORMAT, "format_version": str(PREFIX_VERSION),
                         "model_fingerprint": model_fingerprint(model.config),
                         "weights_fingerprint": weights_fingerprint(model),
                         "dtype": str(dtype).removeprefix("torch.")}
        self.misses = 0  # lookups that found no file

    def file_for(self, document: str) -> Path:
        """Where the prefix of the document whose token hash is ``document`` lives."""
        name = hashlib.sha256(json.dumps(self.identity | {"document": document}, sort_keys=True).encode())
        return self.path / f"{name.hexdigest()[:40]}{SUFFIX}"

    def load(self, document: str):
        """The stored prefix of ``document`` (a :class:`~uncomp_cli.serve.prefill.Prefix`), or None."""
        from uncomp_cli.serve.prefill import Prefix

        path = self.file_for(document)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            tensors = load_bytes(raw)
            metadata = file_metadata(raw)
            for field, value in self.identity.items():
                if metadata.get(field) != value:
                    raise ValueError(f"its {field} is {metadata.get(field)!r}, not {value!r}")
            if metadata.get("document") != document:
                raise ValueError("it holds another document")
            layers = [_restore(index, spec, tensors, self.device)
                      for index, spec in enumerate(json.loads(metadata["layers"]))]
            tokens = int(metadata["tokens"])
            if any(layer.groups[0].length() != tokens for layer in layers):
                raise ValueError("its layers do not hold the document's tokens")
        except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("context directory: skipping %s (%s: %s)", path.name, type(exc).__name__, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        return Prefix(layers, tokens)

    def save(self, document: str, prefix) -> Path:
        """Write ``prefix`` for ``document`` atomically, then drop the least recently used files
        beyond the limit (never the one just written)."""
        specs, tensors = export_layers(prefix.layers)
        metadata = self.identity | {"document": document, "tokens": str(prefix.tokens), "layers": json.dumps(specs)}
        data = save_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
        path = atomic_write(self.file_for(document), data)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> None:
        files = []
        for path in self.path.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # another replica may be evicting too
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.limit_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob(f"*{SUFFIX}") if p.exists())


def _restore(index: int, spec: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> GroupedKVLayer:
    if not spec.get("deferred"):
        raise ValueError(f"layer {index} is not a whole document")
    own = {name: tensor.to(device) for name, tensor in layer_tensors(tensors, index).items()}
    return GroupedKVLayer.restore(LayerPlan(tuple(spec["budgets"]), defer_selection=True), spec, own)
