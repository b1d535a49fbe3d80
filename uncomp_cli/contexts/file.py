"""Compressed context files: a :class:`CompressedContext` on disk, to answer questions in a later process.

safetensors (tensors plus a string→string metadata map; nothing is ever unpickled), written
atomically. Self-describing and versioned: the format and its version; the model's fingerprints
(config and weights) and dtype, checked on load; the method, its settings and the profile's
fingerprint; the context's token count and the template tail; per layer its counters and per head
group the KV heads, the budget and the kept keys, values, validity and original positions
(docs/context-format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from transformers import DynamicCache

from uncomp_cli.contexts.compress import CompressedContext
from uncomp_cli.engine.cache import GroupedKVCache, GroupedKVLayer
from uncomp_cli.engine.plan import CachePlan, LayerPlan
from uncomp_cli.errors import UncompError
from uncomp_cli.files import atomic_write
from uncomp_cli.profile.file import model_fingerprint

CONTEXT_FORMAT = "uncomp-context"
#: Version 2: some head groups hold 8-bit keys and values (``--kv-bits 8``); a file without them is
#: still written as version 1, which older versions read.
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's name, shape and first 256 values: two checkpoints of one
    architecture (a fine-tune, another seed) differ here although their configs agree."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        head = parameter.detach().reshape(-1)[:256].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def profile_fingerprint(policy) -> str | None:
    if not policy.needs_profile or policy.profile is None:
        return None
    return hashlib.sha256(json.dumps(policy.profile.metadata(), sort_keys=True).encode()).hexdigest()


def save_context(context: CompressedContext, loaded, path: str | os.PathLike[str]) -> Path:
    """Write ``context`` (compressed on ``loaded``) to ``path`` atomically."""
    grouped = isinstance(context.cache, GroupedKVCache)
    if grouped:
        layers, tensors = export_layers(context.cache.layers)
    else:
        layers, tensors = [{} for _ in context.cache.layers], {}
        for index, layer in enumerate(context.cache.layers):
            tensors[f"layers.{index}.keys"], tensors[f"layers.{index}.values"] = layer.keys, layer.values
    settings = context.policy.describe()
    rounded = any(group.get("bits") for layer in layers for group in layer.get("groups", []))
    metadata = {
        "format": CONTEXT_FORMAT,
        "format_version": str(FORMAT_VERSION) if rounded else "1",
        "model": loaded.name,
        "model_fingerprint": model_fingerprint(loaded.model.config),
        "weights_fingerprint": weights_fingerprint(loaded.model),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "method": context.policy.name,
        "settings": json.dumps({k: settings[k] for k in context.policy.option_names()}),
        "profile_fingerprint": profile_fingerprint(context.policy) or "",
        "context_tokens": str(context.context_tokens),
        "tail": context.tail,
        "cache": "grouped" if grouped else "full",
        "layers": json.dumps(layers),
        "stats": json.dumps(context.stats),
    }
    data = save_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(path, data)


def export_layers(layers: list) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Grouped layers as a file holds them: each one's spec, and its tensors named ``layers.<i>.<name>``."""
    specs, tensors = [], {}
    for index, layer in enumerate(layers):
        spec, held = layer.export()
        tensors |= {f"layers.{index}.{name}": tensor for name, tensor in held.items()}
        specs.append(spec)
    return specs, tensors


def layer_tensors(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s tensors of a file, by their names within the layer."""
    prefix = f"layers.{index}."
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def load_context(loaded, path: str | os.PathLike[str]) -> CompressedContext:
    """Read a context file saved for ``loaded``; any mismatch or damage is one :class:`UncompError`."""
    from uncomp_cli.policies.registry import make_policy

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UncompError(f"context file not found: {path}") from None
    except IsADirectoryError:
        raise UncompError(f"{path} is a folder, not a compressed context file") from None
    try:
        tensors = load_bytes(raw)
        metadata = file_metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UncompError(f"{path} is not a compressed context file (not readable safetensors: {exc})") from None
    _check(path, metadata, loaded)
    try:
        policy = make_policy(metadata["method"], **json.loads(metadata["settings"]))
        layers = json.loads(metadata["layers"])
        device = loaded.device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        if metadata["cache"] == "full":
            cache = DynamicCache(config=loaded.model.config)
            for index, _ in enumerate(layers):
                cache.update(tensors[f"layers.{index}.keys"], tensors[f"layers.{index}.values"], index)
        else:
            cache = _grouped_cache(policy, layers, tensors, json.loads(metadata["stats"]), loaded.dtype)
        context_tokens = int(metadata["context_tokens"])
    except (KeyError, ValueError, TypeError) as exc:
        raise UncompError(f"{path} is damaged: {type(exc).__name__} {exc}") from None
    if len(cache.layers) != loaded.model.config.num_hidden_layers:
        raise UncompError(f"{path} has {len(cache.layers)} layers; the model has "
                          f"{loaded.model.config.num_hidden_layers}")
    return CompressedContext(cache, policy, context_tokens, metadata["tail"], 0.0, json.loads(metadata["stats"]))


def file_metadata(raw: bytes) -> dict[str, str]:
    """The header's metadata, read without loading tensors (safetensors: 8-byte length, JSON header)."""
    if len(raw) < 8:
        raise ValueError("too short")
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length].decode("utf-8"))
    return header.get("__metadata__") or {}


def _check(path: Path, metadata: dict[str, str], loaded) -> None:
    kind = metadata.get("format")
    if kind == "uncomp-profile":
        raise UncompError(f"{path} is a calibration profile, not a compressed context (pass it with --profile)")
    if kind != CONTEXT_FORMAT:
        raise UncompError(f"{path} is not a compressed context file (no '{CONTEXT_FORMAT}' format in its metadata)")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UncompError(f"{path} is context format version {version}; this uncomp reads versions "
                          f"{' and '.join(READABLE_VERSIONS)} "
                          "(compress the context again)")
    if metadata.get("model_fingerprint") != model_fingerprint(loaded.model.config):
        raise UncompError(f"{path} was compressed with {metadata.get('model', 'another model')}, not with "
                          f"{loaded.name} (its shapes differ)")
    dtype = str(loaded.dtype).removeprefix("torch.")
    if metadata.get("dtype") != dtype:
        raise UncompError(f"{path} holds {metadata.get('dtype')} keys and values; the model runs in {dtype} "
                          f"(pass --dtype {metadata.get('dtype')})")
    if metadata.get("weights_fingerprint") != weights_fingerprint(loaded.model):
        raise UncompError(f"{path} was compressed with other weights than {loaded.name}'s "
                          f"({metadata.get('model', 'unknown')}); compress the context again with this model")


def _grouped_cache(policy, layers: list[dict], tensors: dict[str, torch.Tensor], stats: dict,
                   dtype: torch.dtype) -> GroupedKVCache:
    """The cache a file holds: each layer restored with the budgets it saved and the policy's
    scorer and eviction (what decoding needs; the prefill's choices are already made)."""
    restored = []
    for index, spec in enumerate(layers):
        plan = LayerPlan(tuple(spec["budgets"]), policy.scorer, policy.decode_evict)
        restored.append(GroupedKVLayer.restore(plan, spec, layer_tensors(tensors, index), dtype))
    return GroupedKVCache(CachePlan(tuple(layer.plan for layer in restored), stats=stats), restored)
