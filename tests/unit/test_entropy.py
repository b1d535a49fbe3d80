"""Truncated matrix entropy against a NumPy transcription of the formula and known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uncomp_cli.errors import UncompError
from uncomp_cli.profile.entropy import (
    check_rank_k,
    covariance_spectrum,
    default_rank_k,
    normalized_truncated_entropy,
    truncated_matrix_entropy,
)


def numpy_entropy(x: np.ndarray, k: int) -> float:
    """Method note §2, line by line, for one head: x is [N, d]."""
    x = x.astype(np.float64)
    r = x - x.mean(axis=0, keepdims=True)
    z = r / np.linalg.norm(r, axis=1, keepdims=True)
    cov = z.T @ z / x.shape[0]
    cov = cov / np.trace(cov) + 1e-10 * np.eye(x.shape[1])
    sigma = np.sort(np.linalg.eigvalsh(cov))[::-1]
    top = sigma[:k]
    return float(-(top * np.log(top)).sum())


def basis_rows(weights: list[int]) -> torch.Tensor:
    """Rows ±e_i, each pair repeated weights[i] times: mean 0, unit rows, covariance diag(w / Σw)."""
    d = len(weights)
    rows = []
    for i, w in enumerate(weights):
        for _ in range(w):
            e = torch.zeros(d, dtype=torch.float64)
            e[i] = 1.0
            rows += [e, -e]
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_matches_numpy_transcription(k):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, 3, 50, 16, generator=generator) * torch.linspace(0.2, 3.0, 16)
    ours = truncated_matrix_entropy(states, k)
    assert ours.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            assert ours[b, h].item() == pytest.approx(numpy_entropy(states[b, h].numpy(), k), rel=1e-9, abs=1e-12)


def test_isotropic_data_gives_entropy_of_uniform_eigenvalues():
    d, k = 8, 3
    states = basis_rows([5] * d)
    spectrum = covariance_spectrum(states)
    assert torch.allclose(spectrum, torch.full((d,), 1 / d, dtype=torch.float64), atol=1e-9)
    assert truncated_matrix_entropy(states, k).item() == pytest.approx(k / d * math.log(d), abs=1e-8)
    assert normalized_truncated_entropy(states, k).item() == pytest.approx(k / d, abs=1e-8)


def test_known_spectrum_keeps_only_the_largest_k():
    weights = [6, 3, 1, 0]  # eigenvalues .6 .3 .1 0
    states = basis_rows(weights)[:, :3]  # the zero direction drops out; d = 3
    expected = [0.6, 0.3, 0.1]
    assert covariance_spectrum(states).tolist() == pytest.approx(expected, abs=1e-9)
    for k in (1, 2, 3):
        want = -sum(p * math.log(p) for p in expected[:k])
        assert truncated_matrix_entropy(states, k).item() == pytest.approx(want, abs=1e-8)


def test_rank_one_states_have_zero_entropy():
    states = basis_rows([4, 0, 0, 0])
    assert truncated_matrix_entropy(states, 4).item() == pytest.approx(0.0, abs=1e-8)


def test_invariant_to_global_scale_and_shift_but_not_to_shape():
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    base = truncated_matrix_entropy(states, 2).item()
    assert truncated_matrix_entropy(states * 7.5 + 3.0, 2).item() == pytest.approx(base, rel=1e-10)
    squashed = states * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    assert truncated_matrix_entropy(squashed, 2).item() != pytest.approx(base, rel=1e-3)


def test_spectrum_is_sorted_and_sums_to_one():
    states = torch.randn(3, 30, 6, generator=torch.Generator().manual_seed(2))
    spectrum = covariance_spectrum(states)
    assert spectrum.dtype == torch.float64
    assert torch.all(spectrum[..., :-1] >= spectrum[..., 1:])
    assert torch.allclose(spectrum.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-8)


def test_half_precision_input_is_computed_in_float64():
    states = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    full = truncated_matrix_entropy(states, 4)
    half = truncated_matrix_entropy(states.to(torch.bfloat16), 4)
    assert half.dtype == torch.float64
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_default_rank_k_is_a_quarter_of_the_head_size():
    assert default_rank_k(128) == 32
    assert default_rank_k(64) == 16
    assert default_rank_k(2) == 1


def test_rank_k_outside_the_head_size_is_refused():
    with pytest.raises(UncompError) as excinfo:
        check_rank_k(65, 64)
    assert str(excinfo.value) == "--rank-k 65 is larger than the head size 64; use 1 to 64"
    with pytest.raises(UncompError, match="at least 1"):
        truncated_matrix_entropy(torch.randn(10, 4), 0)
