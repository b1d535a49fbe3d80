"""A profile with the official code's shape (five stages, two KV-head groups) for models whose
entropies mean nothing (random weights).

Speed depends only on a profile's structure (how many tokens each layer keeps, how budgets are
spread), not on which head lands in which group, so ``uncomp bench --model-config`` measures the
profile methods on random models with this profile instead of a calibration.
"""

from __future__ import annotations

import torch

from uncomp_cli.profile.calibrate import group_budget_shares, group_sizes, stage_keep_fractions
from uncomp_cli.profile.file import ModelShape, Profile, fingerprint_fields, model_fingerprint

#: The official code's prefill schedule has five stages (here as shares: keep 100 / 84 / 69 / 53 / 37.5 %).
REFERENCE_STAGES = 5
REFERENCE_GROUPS = 2


def reference_profile(config, name: str = "reference") -> Profile:
    """Five stages and two groups as in the official code, for models whose entropies mean nothing.

    Layers are split into ``REFERENCE_STAGES`` consecutive stages of equal size (keep fractions of
    :func:`~uncomp_cli.profile.calibrate.stage_keep_fractions`); in every layer the first half of the KV
    heads form the low-entropy group and the rest the high one, with the calibrated shares. The
    entropies stored are placeholders consistent with that (falling by layer, higher for group 1).
    """
    shape = ModelShape.from_config(config)
    layers, heads, kv_heads = shape.num_layers, shape.num_heads, shape.num_kv_heads
    stages = min(REFERENCE_STAGES, layers)
    groups = min(REFERENCE_GROUPS, kv_heads)
    layer_stage = torch.arange(layers) * stages // layers
    sizes = group_sizes(kv_heads, groups)
    kv_group = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes)).expand(layers, kv_heads).clone()
    kv_entropy = (0.9 - 0.05 * layer_stage[:, None] + 0.02 * kv_group).float()  # [L, H_kv]
    head_entropy = kv_entropy.repeat_interleave(shape.heads_per_kv_head, dim=-1)  # [L, H]
    votes = torch.nn.functional.one_hot(kv_group, groups).to(torch.int64)
    profile = Profile(
        model=name, model_fingerprint=model_fingerprint(config), model_config=fingerprint_fields(config),
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=shape.head_dim,
        entropy_rank_k=max(1, shape.head_dim // 4), entropy_source="query", kv_aggregation="mean",
        grouping="reference", seq_len=0, samples=1, calibration_data="none: reference structure",
        calibration_data_sha256="", stage_threshold=0.0, groups=groups,
        layer_entropy=head_entropy.mean(-1), head_entropy=head_entropy, head_entropy_std=torch.zeros_like(head_entropy),
        kv_head_entropy=kv_entropy, kv_head_entropy_std=torch.zeros_like(kv_entropy),
        sample_head_entropy=head_entropy[None].clone(), layer_stage=layer_stage,
        stage_keep_fraction=stage_keep_fractions(stages), kv_head_group=kv_group, kv_head_votes=votes,
        group_budget_share=group_budget_shares(groups, sizes),
    )
    profile.validate("reference profile")
    return profile
