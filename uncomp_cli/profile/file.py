"""The calibration profile: what ``uncomp calibrate`` measures, saved as one safetensors file.

A :class:`Profile` holds per-layer and per-head entropies, the layer stages (hidden-state
compression at prefill) and the KV-head groups with their budget shares (KV compression). It is
self-describing: the model's shape and a fingerprint of its configuration, the entropy settings
and the calibration data travel in the file's string metadata, and :meth:`Profile.check_model`
refuses to apply a profile to a model it was not made for. The format is documented in
``docs/profile-format.md``; it never uses pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uncomp_cli.errors import ProfileError
from uncomp_cli.files import atomic_write

logger = logging.getLogger(__name__)

#: Written in every profile's metadata as ``format``; a safetensors file without it is not a profile.
PROFILE_FORMAT = "uncomp-profile"
#: Bumped whenever a reader of the previous version could misread a new file.
FORMAT_VERSION = 1

FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope",
)


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry a profile depends on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        config = _text_config(config)
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        )

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def fingerprint_fields(config: Any) -> dict[str, Any]:
    """The configuration fields a profile depends on, as plain JSON-able values."""
    config = _text_config(config)
    shape = ModelShape.from_config(config)
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = {
            "rope_theta": getattr(config, "rope_theta", None),
            "rope_scaling": getattr(config, "rope_scaling", None),
        }
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
    }


def model_fingerprint(config: Any) -> str:
    """sha256 (hex) of the configuration fields that matter: type, shapes, vocabulary size, RoPE."""
    canonical = json.dumps(fingerprint_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# name -> (dtype, shape from the profile's dimensions). The one list both save and load follow.
def _tensor_specs(p: Profile) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    L, H, Hkv, G = p.num_layers, p.num_heads, p.num_kv_heads, p.groups
    return {
        "layer_entropy": (torch.float32, (L,)),
        "head_entropy": (torch.float32, (L, H)),
        "head_entropy_std": (torch.float32, (L, H)),
        "kv_head_entropy": (torch.float32, (L, Hkv)),
        "kv_head_entropy_std": (torch.float32, (L, Hkv)),
        "sample_head_entropy": (torch.float32, (p.samples, L, H)),
        "layer_stage": (torch.int64, (L,)),
        "stage_keep_fraction": (torch.float32, (p.num_stages,)),
        "kv_head_group": (torch.int64, (L, Hkv)),
        "kv_head_votes": (torch.int64, (L, Hkv, G)),
        "group_budget_share": (torch.float32, (G,)),
    }


TENSOR_NAMES = (
    "layer_entropy",
    "head_entropy",
    "head_entropy_std",
    "kv_head_entropy",
    "kv_head_entropy_std",
    "sample_head_entropy",
    "layer_stage",
    "stage_keep_fraction",
    "kv_head_group",
    "kv_head_votes",
    "group_budget_share",
)

# metadata key -> parser. Every value is stored as a string.
_METADATA: dict[str, Callable[[str], Any]] = {
    "model": str,
    "model_fingerprint": str,
    "model_config": json.loads,
    "num_layers": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "entropy_rank_k": int,
    "entropy_source": str,
    "entropy_scale": str,
    "kv_aggregation": str,
    "grouping": str,
    "seq_len": int,
    "samples": int,
    "calibration_data": str,
    "calibration_data_sha256": str,
    "stage_threshold": float,
    "groups": int,
    "uncomp_version": str,
    "created": str,
}


@dataclass
class Profile:
    """Entropies, layer stages and KV-head groups of one model (shapes in brackets).

    Entropies are ``H_k / ln(head_dim)`` (see :mod:`uncomp_cli.profile.entropy`), averaged over samples.
    L = layers, H = query heads, H_kv = KV heads, S = calibration samples, G = groups.
    """

    # what it was made for
    model: str
    model_fingerprint: str
    model_config: dict[str, Any]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # how it was made
    entropy_rank_k: int
    entropy_source: str  # "query" | "key"
    kv_aggregation: str  # "mean" | "max": query heads -> their KV head
    grouping: str  # how per-sample ranks became groups: "vote"
    seq_len: int
    samples: int
    calibration_data: str
    calibration_data_sha256: str
    stage_threshold: float
    groups: int
    # measurements
    layer_entropy: torch.Tensor  # [L]
    head_entropy: torch.Tensor  # [L, H]
    head_entropy_std: torch.Tensor  # [L, H]
    kv_head_entropy: torch.Tensor  # [L, H_kv]
    kv_head_entropy_std: torch.Tensor  # [L, H_kv]
    sample_head_entropy: torch.Tensor  # [S, L, H]
    # decisions
    layer_stage: torch.Tensor  # [L] int64, 0 = first stage, non-decreasing
    stage_keep_fraction: torch.Tensor  # [num_stages] fraction of the prompt each stage's layers keep
    kv_head_group: torch.Tensor  # [L, H_kv] int64, 0 = lowest entropy
    kv_head_votes: torch.Tensor  # [L, H_kv, G] int64, samples that ranked the head into each group
    group_budget_share: torch.Tensor  # [G] multiple of the average budget, mean 1 over KV heads
    entropy_scale: str = "H_k / ln(head_dim)"
    uncomp_version: str = ""
    created: str = ""

    # ------------------------------------------------------------------ derived
    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def num_stages(self) -> int:
        return int(self.stage_keep_fraction.numel())

    def layer_keep_fraction(self) -> torch.Tensor:
        """Fraction of the prompt each layer keeps during prefill. Returns ``[L]`` float32."""
        return self.stage_keep_fraction[self.layer_stage]

    def kv_head_share(self) -> torch.Tensor:
        """Each KV head's multiple of the average budget. Returns ``[L, H_kv]`` float32."""
        return self.group_budget_share[self.kv_head_group]

    def kv_head_budgets(self, avg_budget: float, prompt_len: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Spread an average per-KV-head budget (tokens) over the heads by their group shares.

        prompt_len: the number of tokens a layer holds — one int, or ``[L]`` when layers keep
        different numbers of tokens (hidden-state compression). Budgets are rounded and clipped to
        ``[1, prompt_len]``. Returns ``[L, H_kv]`` int64.
        """
        if avg_budget <= 0:
            raise ProfileError(f"the average KV budget must be positive (got {avg_budget})")
        limit = torch.as_tensor(prompt_len, dtype=torch.int64).reshape(-1, 1)
        if limit.shape[0] not in (1, self.num_layers) or bool((limit < 1).any()):
            raise ProfileError(f"prompt_len must be positive, one value or one per layer ({self.num_layers})")
        budgets = torch.round(self.kv_head_share().double() * float(avg_budget)).to(torch.int64)
        return torch.minimum(budgets.clamp_min(1), limit.expand(self.num_layers, 1))

    # ------------------------------------------------------------------ validation
    def check_model(self, config: Any, model_name: str | None = None, *, strict: bool = True) -> None:
        """Raise :class:`ProfileError` unless this profile was made for a model shaped like ``config``.

        A different layer/head geometry is always an error. Same geometry but a different
        configuration fingerprint (e.g. another RoPE base or vocabulary) is an error when
        ``strict``, otherwise a logged warning.
        """
        shape = ModelShape.from_config(config)
        mine = self.shape
        named = f" ({model_name})" if model_name else ""
        if shape != mine:
            if (shape.num_layers, shape.num_kv_heads) != (mine.num_layers, mine.num_kv_heads):
                raise ProfileError(
                    f"profile is for {mine.num_layers} layers × {mine.num_kv_heads} KV heads ({self.model}); "
                    f"this model{named} has {shape.num_layers} × {shape.num_kv_heads}"
                )
            raise ProfileError(
                f"profile is for {mine.num_heads} query heads of size {mine.head_dim} ({self.model}); "
                f"this model{named} has {shape.num_heads} of size {shape.head_dim}"
            )
        if model_fingerprint(config) == self.model_fingerprint:
            return
        theirs = fingerprint_fields(config)
        differing = [k for k in FINGERPRINT_FIELDS if self.model_config.get(k) != theirs.get(k)]
        detail = ", ".join(f"{k} {self.model_config.get(k)!r} vs {theirs.get(k)!r}" for k in differing[:3])
        message = (
            f"profile was calibrated on {self.model}, whose configuration differs from this model{named}'s"
            f" ({detail or 'fingerprint differs'}); recalibrate with `uncomp calibrate`"
        )
        if strict:
            raise ProfileError(message)
        logger.warning(message)

    def validate(self, source: str = "profile") -> None:
        """Raise :class:`ProfileError` if tensors disagree with the declared shapes or with each other."""
        for name, (dtype, shape) in _tensor_specs(self).items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ProfileError(f"{source}: tensor '{name}' has shape {got}, expected {list(shape)}")
            if tensor.dtype != dtype:
                raise ProfileError(f"{source}: tensor '{name}' has dtype {tensor.dtype}, expected {dtype}")
        stages = self.layer_stage
        if self.num_layers and (
            int(stages[0]) != 0 or bool((stages.diff() < 0).any()) or int(stages.max()) >= self.num_stages
        ):
            raise ProfileError(
                f"{source}: layer stages must start at 0, never decrease and stay below {self.num_stages}"
            )
        if bool(((self.kv_head_group < 0) | (self.kv_head_group >= self.groups)).any()):
            raise ProfileError(f"{source}: KV-head groups must lie in 0…{self.groups - 1}")
        if self.num_heads % max(self.num_kv_heads, 1) or self.num_kv_heads < 1:
            raise ProfileError(
                f"{source}: {self.num_heads} query heads do not divide into {self.num_kv_heads} KV heads"
            )

    # ------------------------------------------------------------------ serialisation
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in TENSOR_NAMES}

    def metadata(self) -> dict[str, str]:
        meta = {"format": PROFILE_FORMAT, "format_version": str(FORMAT_VERSION)}
        for key in _METADATA:
            value = getattr(self, key)
            meta[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        return meta

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    Either the complete new file is at ``path`` afterwards or whatever was there before is
    untouched; no temporary file is left behind. Raises :class:`ProfileError` on I/O problems.
    """
    from safetensors.torch import save

    path = Path(path)
    profile.validate(str(path))
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ProfileError(f"cannot write {path}: folder {directory} does not exist")
    if path.is_dir():
        raise ProfileError(f"cannot write {path}: it is a folder")
    data = save(profile.tensors(), metadata=profile.metadata())
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise ProfileError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile written by :func:`save_profile`.

    Raises :class:`ProfileError` (one line) when the file is missing, not safetensors, truncated or
    corrupt, a safetensors file that is not a profile, of a newer format, or inconsistent.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ProfileError(f"profile not found: {path}")
    if path.is_dir():
        raise ProfileError(f"{path} is a folder, not a profile file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            names = set(handle.keys())
            if meta.get("format") != PROFILE_FORMAT:
                raise ProfileError(
                    f"{path} is a safetensors file but not an uncomp profile (no '{PROFILE_FORMAT}' metadata)"
                )
            _check_version(path, meta.get("format_version"))
            missing = [name for name in TENSOR_NAMES if name not in names]
            if missing:
                raise ProfileError(f"{path}: profile is missing tensor '{missing[0]}' (corrupt or incomplete file)")
            tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    except ProfileError:
        raise
    except Exception as exc:  # safetensors raises its own error type, or OSError, on bad bytes
        logger.debug("safetensors could not read %s: %s", path, exc)
        raise ProfileError(f"{path} is not a readable safetensors file (truncated or corrupt)") from None
    fields: dict[str, Any] = {}
    for key, parse in _METADATA.items():
        if key not in meta:
            raise ProfileError(f"{path}: profile metadata '{key}' is missing (corrupt or incomplete file)")
        try:
            fields[key] = parse(meta[key])
        except ValueError:
            raise ProfileError(f"{path}: profile metadata '{key}' has an invalid value {meta[key]!r}") from None
    profile = Profile(**fields, **tensors)
    profile.validate(str(path))
    return profile


def _check_version(path: Path, version: str | None) -> None:
    try:
        number = int(version or "")
    except ValueError:
        raise ProfileError(f"{path}: profile format_version {version!r} is not a number") from None
    if number > FORMAT_VERSION:
        raise ProfileError(
            f"{path} has profile format version {number}; this uncomp reads up to {FORMAT_VERSION} — upgrade uncomp"
        )
    if number < 1:
        raise ProfileError(f"{path}: profile format_version {number} is invalid")
