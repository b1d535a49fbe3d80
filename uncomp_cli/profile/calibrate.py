"""Calibration: measure every head's truncated matrix entropy and turn it into a :class:`Profile`.

Capture. The model runs ordinary forward passes with a custom attention function registered
through transformers' ``AttentionInterface``. Attention modules call it with the query states
*after* RoPE (``[batch, heads, tokens, head_dim]``); it computes that layer's entropies at once,
then runs SDPA as usual. So no more than one layer's queries exist at a time, and the model's own
code (projections, RoPE, GQA layout) is used unchanged. The previous attention implementation is
restored in ``finally``.

Decisions (method note §3–4):

* stages — walk the layers; a layer whose entropy is more than ``stage_threshold`` below the
  previous layer's starts a new stage. Stage s keeps ``stage_keep_fractions(S)[s]`` of the prompt.
* KV-head groups — query-head entropies are aggregated per KV head (mean by default), ranked in
  every layer of every sample into G groups (0 = lowest entropy), and the per-sample ranks vote:
  heads are ordered by their mean group label (ties: mean entropy) and split into G groups again.
* budget shares — linear in the group index, normalised so the mean over KV heads is 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import torch

from uncomp_cli import __version__
from uncomp_cli.defaults import DEFAULT_GROUPS, DEFAULT_STAGE_THRESHOLD
from uncomp_cli.errors import UncompError
from uncomp_cli.profile.calibration_text import (
    CalibrationText,
    CalibrationWindows,
    builtin_texts,
    check_window_settings,
    token_windows,
)
from uncomp_cli.profile.entropy import ENTROPY_SOURCES, check_rank_k, default_rank_k, normalized_truncated_entropy
from uncomp_cli.profile.file import ModelShape, Profile, fingerprint_fields, model_fingerprint

logger = logging.getLogger(__name__)

# Defaults (uncomp_cli/defaults.py, torch-free for --help): two groups per layer (low and high
# entropy, as the official code); ε = 0.02 on the ``H_k / ln d`` scale (mean over a layer's query
# heads) gives 2–3 stages on the embedded SmolLM2-135M with either calibration source
# (sweep in docs/calibration.md).
#: Keep fractions take the official schedule's steps as shares of the prompt: 4096/3456/2816/2176/1536
#: of 4096 tokens (the official code keeps those absolute counts, so the two agree near 4k only): one step
#: of 640/4096 per stage, down to at most 1536/4096.
KEEP_STEP = 640 / 4096
KEEP_FLOOR = 1536 / 4096
#: Highest/lowest budget share is 2 for two groups (official 384 vs 768) and tends to 5 with many
#: groups (official eight groups: 129 … 640): share spread δ = SHARE_SPREAD · (G − 1) / G.
SHARE_SPREAD = 2 / 3
KV_AGGREGATIONS = ("mean", "max")
ATTENTION_NAME = "uncomp_calibration"

ProgressCallback = Callable[[int, int], None]


# ------------------------------------------------------------------------------------- pure rules
def layer_stages(layer_entropy: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split layers into stages at entropy drops larger than ``threshold``.

    layer_entropy: ``[L]``. Returns (stage per layer ``[L]`` int64, keep fraction per stage ``[S]``
    float32). Layer 0 is in stage 0, which keeps everything.
    """
    if not threshold >= 0:
        raise UncompError(f"--stage-threshold must be zero or positive (got {threshold})")
    values = layer_entropy.double().tolist()
    stages = [0] * len(values)
    for layer in range(1, len(values)):
        dropped = values[layer] - values[layer - 1] < -threshold
        stages[layer] = stages[layer - 1] + int(dropped)
    count = (stages[-1] + 1) if stages else 1
    return torch.tensor(stages, dtype=torch.int64), stage_keep_fractions(count)


def stage_keep_fractions(num_stages: int) -> torch.Tensor:
    """Fraction of the prompt kept by each stage: ``1 − s · step``.

    The step is 640/4096 (five stages give 1, .84, .69, .53, .375: the official code's token
    counts at a 4096-token prompt, as shares of any prompt; docs/calibration.md);
    with more than five stages it shrinks so that the last stage keeps 1536/4096 = 0.375.
    Returns ``[num_stages]`` float32.
    """
    if num_stages < 1:
        raise UncompError("there must be at least one stage")
    step = KEEP_STEP if num_stages == 1 else min(KEEP_STEP, (1 - KEEP_FLOOR) / (num_stages - 1))
    return torch.tensor([1 - s * step for s in range(num_stages)], dtype=torch.float32)


def group_sizes(num_heads: int, groups: int) -> list[int]:
    """Heads per group, as even as possible; the lower-entropy groups take the remainder."""
    base, extra = divmod(num_heads, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def group_budget_shares(groups: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Each group's multiple of the average budget; higher group (entropy) ⇒ larger share.

    Linear in the group index, ``1 ± δ`` at the ends with ``δ = 2/3 · (G − 1)/G``, then rescaled so
    the mean over heads (groups weighted by ``sizes``) is exactly 1. Returns ``[G]`` float32.
    """
    if groups < 1:
        raise UncompError(f"--groups must be at least 1 (got {groups})")
    if groups == 1:
        return torch.ones(1)
    spread = SHARE_SPREAD * (groups - 1) / groups
    raw = torch.tensor([1 + spread * (2 * g / (groups - 1) - 1) for g in range(groups)], dtype=torch.float64)
    weights = torch.tensor(sizes if sizes is not None else [1] * groups, dtype=torch.float64)
    return (raw * weights.sum() / (raw * weights).sum()).float()


def aggregate_kv_heads(head_values: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Combine the query heads that share a KV head (transformers' ``repeat_kv`` layout).

    head_values: ``[..., H]`` with query head h reading KV head ``h // (H / H_kv)``.
    Returns ``[..., H_kv]``.
    """
    if how not in KV_AGGREGATIONS:
        raise UncompError(f"unknown KV-head aggregation {how!r}; choose one of {', '.join(KV_AGGREGATIONS)}")
    heads = head_values.shape[-1]
    if num_kv_heads < 1 or heads % num_kv_heads:
        raise UncompError(f"{heads} query heads cannot be shared by {num_kv_heads} KV heads")
    grouped = head_values.reshape(*head_values.shape[:-1], num_kv_heads, heads // num_kv_heads)
    return grouped.mean(-1) if how == "mean" else grouped.amax(-1)


def rank_labels(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Each head's group label by rank within its row (0 = lowest). ``[..., H]`` → ``[..., H]`` int64."""
    return _labels_from_order(values.argsort(dim=-1, stable=True), groups)


def _labels_from_order(order: torch.Tensor, groups: int) -> torch.Tensor:
    """order ``[..., H]`` lists heads from lowest to highest; returns each head's group label."""
    sizes = group_sizes(order.shape[-1], groups)
    label_of_rank = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))
    labels = torch.empty_like(order)
    labels.scatter_(-1, order, label_of_rank.expand_as(order).contiguous())
    return labels


def kv_head_groups(sample_kv_entropy: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign KV heads to groups by per-sample rank votes (the official code's "head type search").

    sample_kv_entropy: ``[S, L, H_kv]``. Every sample ranks the heads of every layer into
    ``groups`` groups; a head's votes count how often it landed in each. Heads are then ordered by
    their mean label (ties broken by mean entropy) and split into groups of :func:`group_sizes`.
    Returns (group ``[L, H_kv]`` int64, votes ``[L, H_kv, G]`` int64).
    """
    heads = sample_kv_entropy.shape[-1]
    if not 1 <= groups <= heads:
        raise UncompError(f"--groups {groups} is not possible with {heads} KV heads per layer; use 1 to {heads}")
    labels = rank_labels(sample_kv_entropy, groups)  # [S, L, H_kv]
    votes = torch.nn.functional.one_hot(labels, groups).sum(0).to(torch.int64)  # [L, H_kv, G]
    mean_label = labels.double().mean(0)  # [L, H_kv]
    by_entropy = sample_kv_entropy.double().mean(0).argsort(dim=-1, stable=True)
    by_label_then_entropy = by_entropy.gather(-1, mean_label.gather(-1, by_entropy).argsort(dim=-1, stable=True))
    return _labels_from_order(by_label_then_entropy, groups), votes


# ------------------------------------------------------------------------------------- capture
class EntropyRecorder:
    """An attention function that records each layer's head entropies, then runs SDPA.

    ``values[layer]`` holds ``[heads]`` (query heads, or KV heads for ``source="key"``) for the
    current forward pass, averaged over the batch.
    """

    def __init__(self, shape: ModelShape, source: str, rank_k: int, on_layer: Callable[[], None] | None = None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self._attend = sdpa_attention_forward
        self.source = source
        self.rank_k = rank_k
        self.on_layer = on_layer
        heads = shape.num_heads if source == "query" else shape.num_kv_heads
        self.values = torch.full((shape.num_layers, heads), math.nan, dtype=torch.float64)

    def reset(self) -> None:
        self.values.fill_(math.nan)

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        states = query if self.source == "query" else key  # [B, heads, N, d], RoPE applied
        self.values[module.layer_idx] = normalized_truncated_entropy(states, self.rank_k).mean(0).cpu()
        if self.on_layer is not None:
            self.on_layer()
        if kwargs.get("softcap") is not None:  # SDPA cannot soft-cap (Gemma 2): the model's own eager attention
            return _eager_attention(module, query, key, value, attention_mask, **kwargs)
        return self._attend(module, query, key, value, attention_mask, **kwargs)


def _eager_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention function (which soft-caps), given the boolean mask SDPA was
    to get as the additive mask eager attention adds (None from SDPA's mask means plain causal)."""
    import sys

    eager = sys.modules[type(module).__module__].eager_attention_forward
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive.expand(query.shape[0], 1, q_len, kv_len), **kwargs)


@contextmanager
def recording_attention(model: torch.nn.Module, recorder: EntropyRecorder) -> Iterator[None]:
    """Route the model's attention through ``recorder`` inside the block; restore it afterwards."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, recorder)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        # registrations are process-wide: leave a plain SDPA behind, not a reference to the recorder
        AttentionInterface.register(ATTENTION_NAME, sdpa_attention_forward)


# ------------------------------------------------------------------------------------- calibrate
def calibrate(
    model: torch.nn.Module,
    windows: CalibrationWindows,
    *,
    model_name: str,
    groups: int | None = None,
    stage_threshold: float = DEFAULT_STAGE_THRESHOLD,
    rank_k: int | None = None,
    source: str = "query",
    kv_aggregation: str = "mean",
    progress: ProgressCallback | None = None,
) -> Profile:
    """Run the model over the calibration windows and build its profile.

    windows.input_ids: ``[samples, seq_len]``; one window per forward pass (batch 1), so memory
    holds the model, one forward's activations and one layer's states at a time.
    groups: KV-head groups per layer (default 2, or fewer if the model has fewer KV heads).
    rank_k: eigenvalues kept (default ``head_dim / 4``). progress: ``(done, total)`` layer passes.
    """
    shape = ModelShape.from_config(model.config)
    groups, rank_k = resolve_settings(
        shape,
        groups=groups,
        rank_k=rank_k,
        source=source,
        kv_aggregation=kv_aggregation,
        stage_threshold=stage_threshold,
    )
    sample_values = _measure(model, windows.input_ids, shape, source, rank_k, progress)  # [S, L, heads]
    if source == "query":
        sample_heads = sample_values
        sample_kv = aggregate_kv_heads(sample_values, shape.num_kv_heads, kv_aggregation)
    else:  # key states belong to KV heads; every query head reports its KV head's value
        sample_kv = sample_values
        sample_heads = sample_values.repeat_interleave(shape.heads_per_kv_head, dim=-1)

    head_entropy = sample_heads.mean(0)
    layer_entropy = head_entropy.mean(-1)
    layer_stage, keep = layer_stages(layer_entropy, stage_threshold)
    kv_group, votes = kv_head_groups(sample_kv, groups)
    return Profile(
        model=model_name,
        model_fingerprint=model_fingerprint(model.config),
        model_config=fingerprint_fields(model.config),
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        entropy_rank_k=rank_k,
        entropy_source=source,
        kv_aggregation=kv_aggregation,
        grouping="vote",
        seq_len=windows.seq_len,
        samples=windows.samples,
        calibration_data=windows.description,
        calibration_data_sha256=windows.sha256,
        stage_threshold=float(stage_threshold),
        groups=groups,
        layer_entropy=layer_entropy.float(),
        head_entropy=head_entropy.float(),
        head_entropy_std=sample_heads.std(0, correction=0).float(),
        kv_head_entropy=sample_kv.mean(0).float(),
        kv_head_entropy_std=sample_kv.std(0, correction=0).float(),
        sample_head_entropy=sample_heads.float(),
        layer_stage=layer_stage,
        stage_keep_fraction=keep,
        kv_head_group=kv_group,
        kv_head_votes=votes,
        group_budget_share=group_budget_shares(groups, group_sizes(shape.num_kv_heads, groups)),
        uncomp_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def check_settings(*, samples: int, seq_len: int, groups: int | None, stage_threshold: float,
                   rank_k: int | None, source: str, kv_aggregation: str) -> None:
    """Every calibration setting that can be checked without a model, each error naming its option."""
    check_window_settings(samples, seq_len)
    _check_choices(source, kv_aggregation, stage_threshold)
    if rank_k is not None and rank_k < 1:
        raise UncompError(f"--rank-k must be at least 1 (got {rank_k})")
    if groups is not None and groups < 1:
        raise UncompError(f"--groups must be at least 1 (got {groups})")


def calibration_windows(
    loaded: Any,
    text: CalibrationText | None = None,
    *,
    samples: int = 8,
    seq_len: int = 2048,
    groups: int | None = None,
    stage_threshold: float = DEFAULT_STAGE_THRESHOLD,
    rank_k: int | None = None,
    source: str = "query",
    kv_aggregation: str = "mean",
) -> CalibrationWindows:
    """Check the settings against a :class:`~uncomp_cli.models.loading.LoadedModel` and cut ``text``
    (read with :func:`~uncomp_cli.profile.calibration_text.read_texts`; default: the built-in
    source) into ``samples`` windows of ``seq_len`` tokens: everything that can fail before measuring."""
    check_settings(samples=samples, seq_len=seq_len, groups=groups, stage_threshold=stage_threshold,
                   rank_k=rank_k, source=source, kv_aggregation=kv_aggregation)
    resolve_settings(ModelShape.from_config(loaded.model.config), groups=groups, rank_k=rank_k, source=source,
                     kv_aggregation=kv_aggregation, stage_threshold=stage_threshold)
    if text is None:
        text = builtin_texts(samples * seq_len, loaded.tokenizer)
    return token_windows(text, loaded.tokenizer, samples, seq_len)


def calibrate_loaded(loaded: Any, text: CalibrationText | None = None, *, progress: ProgressCallback | None = None,
                     **settings: Any) -> Profile:
    """Calibrate a loaded model on ``text`` (``settings`` as for :func:`calibration_windows`): what
    ``uncomp calibrate`` runs, and what the profile store runs when a model has no profile yet."""
    windows = calibration_windows(loaded, text, **settings)
    return calibrate(loaded.model, windows, model_name=loaded.name, progress=progress,
                     **{k: v for k, v in settings.items() if k not in ("samples", "seq_len")})


def _check_choices(source: str, kv_aggregation: str, stage_threshold: float) -> None:
    if source not in ENTROPY_SOURCES:
        raise UncompError(f"--source must be one of {', '.join(ENTROPY_SOURCES)} (got {source!r})")
    if kv_aggregation not in KV_AGGREGATIONS:
        raise UncompError(f"--kv-aggregation must be one of {', '.join(KV_AGGREGATIONS)} (got {kv_aggregation!r})")
    if not stage_threshold >= 0:
        raise UncompError(f"--stage-threshold must be zero or positive (got {stage_threshold})")


def resolve_settings(
    shape: ModelShape,
    *,
    groups: int | None,
    rank_k: int | None,
    source: str,
    kv_aggregation: str,
    stage_threshold: float,
) -> tuple[int, int]:
    """Check calibration settings against the model's shape; return (groups, rank_k) with defaults filled in.

    Raises :class:`UncompError` (one line, naming the CLI option) for anything the model cannot take.
    """
    _check_choices(source, kv_aggregation, stage_threshold)
    rank_k = check_rank_k(rank_k if rank_k is not None else default_rank_k(shape.head_dim), shape.head_dim)
    groups = groups if groups is not None else min(DEFAULT_GROUPS, shape.num_kv_heads)
    if not 1 <= groups <= shape.num_kv_heads:
        heads = shape.num_kv_heads
        raise UncompError(f"--groups {groups} is not possible with {heads} KV heads per layer; use 1 to {heads}")
    return groups, rank_k


def _measure(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    shape: ModelShape,
    source: str,
    rank_k: int,
    progress: ProgressCallback | None,
) -> torch.Tensor:
    """Entropies of every sample, layer and head. input_ids ``[S, N]`` → ``[S, L, heads]`` float64."""
    total = input_ids.shape[0] * shape.num_layers
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    recorder = EntropyRecorder(shape, source, rank_k, on_layer=tick)
    device = next(model.parameters()).device
    results = []
    with recording_attention(model, recorder), torch.inference_mode():
        for window in input_ids:
            recorder.reset()
            model(input_ids=window[None].to(device), use_cache=False, logits_to_keep=1)
            if torch.isnan(recorder.values).any():
                raise UncompError(
                    f"{type(model).__name__} does not route attention through transformers' "
                    "AttentionInterface; calibration cannot capture its query states"
                )
            results.append(recorder.values.clone())
            logger.debug("calibrated sample %d/%d", len(results), input_ids.shape[0])
    return torch.stack(results)
