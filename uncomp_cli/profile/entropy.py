"""Truncated matrix entropy of attention states (UNComp, arXiv 2410.03090; method note §2).

For one head, X is the matrix of its states over a calibration window (N tokens × d):

1. centre over tokens:                  r_i = x_i − mean(x)
2. scale every row to unit length:      z_i = r_i / ‖r_i‖
3. covariance with trace one:           Σ = (1/N) Σ_i z_i z_iᵀ,  Σ ← Σ / tr(Σ) + 1e-10·I   (float64)
4. eigenvalues σ_1 ≥ … ≥ σ_d of Σ
5. truncated entropy:                   H_k = − Σ_{i ≤ k} σ_i ln σ_i   (the kept part is not renormalised)

Everything in uncomp reports entropies on the official code's scale, ``H_k / ln d`` (see
:func:`normalized_truncated_entropy`); exp(H_k) is the paper's effective rank.

The functions here are pure tensor code: no model, no I/O.
"""

from __future__ import annotations

import math

import torch

from uncomp_cli.errors import UncompError

#: Added to the diagonal of the trace-one covariance, as in the official code.
COVARIANCE_EPSILON = 1e-10

#: Default k as a fraction of the head size: the official code keeps 32 of 128 eigenvalues.
DEFAULT_RANK_FRACTION = 0.25

ENTROPY_SOURCES = ("query", "key")


def default_rank_k(head_dim: int) -> int:
    """The default number of eigenvalues kept: ``head_dim / 4`` (32 of 128, 16 of 64), at least 1."""
    return max(1, int(round(head_dim * DEFAULT_RANK_FRACTION)))


def check_rank_k(rank_k: int, head_dim: int) -> int:
    """Return ``rank_k`` if it is between 1 and ``head_dim``; otherwise raise :class:`UncompError`."""
    if rank_k < 1:
        raise UncompError(f"--rank-k must be at least 1 (got {rank_k})")
    if rank_k > head_dim:
        raise UncompError(f"--rank-k {rank_k} is larger than the head size {head_dim}; use 1 to {head_dim}")
    return rank_k


def covariance_spectrum(states: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the trace-one covariance of unit-length centred rows, largest first.

    states: ``[..., N, d]`` (any float dtype; computed in float64).
    Returns ``[..., d]`` float64, sorted descending, summing to 1 + d·1e-10.
    """
    if states.ndim < 2:
        raise UncompError(f"states must have at least 2 dimensions [..., tokens, head_dim], got {tuple(states.shape)}")
    x = states.detach().to(torch.float64)
    centred = x - x.mean(dim=-2, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    covariance = unit.transpose(-1, -2) @ unit / x.shape[-2]
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)
    d = x.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    normalised = covariance / trace[..., None, None].clamp_min(1e-300) + COVARIANCE_EPSILON * eye
    eigenvalues = torch.linalg.eigvalsh(normalised)  # ascending
    return eigenvalues.flip(-1).clamp_min(0.0)


def entropy_of_spectrum(eigenvalues: torch.Tensor, rank_k: int) -> torch.Tensor:
    """``H_k = − Σ_{i ≤ k} σ_i ln σ_i`` over the ``rank_k`` largest eigenvalues.

    eigenvalues: ``[..., d]`` sorted descending. Returns ``[...]`` (nats).
    """
    top = eigenvalues[..., :rank_k]
    return -torch.special.xlogy(top, top).sum(-1)


def truncated_matrix_entropy(states: torch.Tensor, rank_k: int) -> torch.Tensor:
    """Truncated matrix entropy ``H_k`` in nats, one value per leading index.

    states: ``[..., N, d]``, e.g. query states ``[batch, heads, tokens, head_dim]``.
    Returns ``[...]`` float64, e.g. ``[batch, heads]``.
    """
    check_rank_k(rank_k, states.shape[-1])
    return entropy_of_spectrum(covariance_spectrum(states), rank_k)


def normalized_truncated_entropy(states: torch.Tensor, rank_k: int) -> torch.Tensor:
    """``H_k / ln d``: the scale the official code reports and every uncomp profile stores.

    states: ``[..., N, d]``. Returns ``[...]`` float64. Uniform eigenvalues give ``k / d``; for k ≥ 3
    the largest possible value is ``ln k / ln d`` (k equal eigenvalues ``1/k``, the rest zero).
    """
    return truncated_matrix_entropy(states, rank_k) / math.log(states.shape[-1])
