"""Attention that also records how much the new queries attend to the tokens held before them.

A context's re-reading (:mod:`uncomp_cli.contexts.reread`) scores each KV entry by the most
attention any re-reading query of its KV head pays it. The model's attention and the recording
need the same probabilities, so on the common path (no padding, no sliding window, no
soft-capping) they come from one computation: the logits, one softmax, then the output and the
maximum over query rows. Computing the recording apart (the layer's SDPA, then
:func:`~uncomp_cli.engine.selection.window_attention` over every held key, a copy of the kept
columns, the max) cost about three times the layer's attention alone on a CPU; this costs two.

The two products may run in bfloat16 (:func:`recording_dtype`, off by default), the softmax and
the maxima in float32: a re-reading's hidden states only serve its scores, and a float32 model on
a CPU with bfloat16 instructions (AVX512-BF16) computes the products 2-3 times faster (SmolLM2's shapes, 4k
tokens, one layer and forward pass of 256 tokens: 42 ms against 62 ms in float32). Maxima stored in
bfloat16 would be cheaper still (32 ms) but tie and reorder: on the test model they kept 90 % of
the tokens float32 keeps and changed the answers; with float32 maxima, 99.5 % and the same answers
(``tests/unit/test_contexts.py``).

Shape letters: B batch, H_q query heads, H_kv KV heads, q new tokens, T tokens held after the new
ones are appended, N the first tokens recorded (the context), d head dim.
"""

from __future__ import annotations

import torch

from uncomp_cli.engine.attend import attend_group, rule_attention
from uncomp_cli.engine.groups import HeadGroup
from uncomp_cli.engine.selection import window_attention

#: Run a float32 model's recording products in bfloat16 on CPUs with bfloat16 instructions. Off:
#: with KVzip's chunks it lost 3 of 40 development answers (docs/results.md), and the two were not
#: measured apart; ``scripts/context_selection_dev.py --reread chunked-bfloat16`` turns both on.
BFLOAT16_PRODUCTS = False


def recording_dtype(tensor: torch.Tensor) -> torch.dtype:
    """What a recording attends in: the model's own dtype, or bfloat16 for a float32 model on a CPU
    with bfloat16 matrix instructions when :data:`BFLOAT16_PRODUCTS` is set."""
    if BFLOAT16_PRODUCTS and tensor.dtype == torch.float32 and tensor.device.type == "cpu" \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return tensor.dtype


def attend_and_record(query: torch.Tensor, group: HeadGroup, positions: torch.Tensor, new_valid: torch.Tensor | None,
                      scaling: float, recorded: int, sliding_window: int | None = None,
                      softcap: float | None = None, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new queries over ``group`` (every KV head, the q new tokens appended last)
    and how much they paid each of its first ``recorded`` tokens.

    query: [B, H_q, q, d]; positions: [B, q] of the new tokens; new_valid: [B, q] bool or None (all
    real); ``dtype``: what the products and softmax run in (None: :func:`recording_dtype`). Returns
    the output [B, H_q, q, d] in the query's dtype and float32 [B, H_kv, N]: per KV head, the largest
    probability any query row of its query heads gave each token (invalid query rows count 0).
    Padding, sliding windows and soft-capping take the two-pass path, in float32.
    """
    keys, values = group.keys, group.values
    batch, q_heads, q_len, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    rep = q_heads // kv_heads
    key_valid = None if group.all_valid else group.valid
    if key_valid is not None or new_valid is not None or sliding_window is not None or softcap is not None:
        if sliding_window is None and softcap is None:
            out = attend_group(query, keys, values, key_valid, scaling)
        else:
            out = rule_attention(query, keys, values, positions, group.positions, key_valid, scaling, sliding_window,
                                 softcap)
        probs = window_attention(query, keys, key_valid, scaling, new_valid)  # [B, H_q, q, T]
        seen = probs[..., :recorded].reshape(batch, kv_heads, rep * q_len, recorded)
        return out, seen.amax(dim=2)
    dtype = dtype or recording_dtype(query)
    folded = (query * scaling).to(dtype).reshape(batch, kv_heads, rep * q_len, dim)  # a KV head's query heads: rows
    logits = torch.matmul(folded, keys.to(dtype).transpose(-1, -2)).float()  # [B, H_kv, rep·q, T]
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=keys.device).triu(1).repeat(rep, 1)
    logits[..., total - q_len:].masked_fill_(future, float("-inf"))  # each new token sees up to itself
    probs = torch.softmax(logits, dim=-1)  # float32: recorded maxima in bfloat16 would tie and reorder
    del logits
    out = torch.matmul(probs.to(dtype), values.to(dtype)).reshape(batch, q_heads, q_len, dim).to(query.dtype)
    return out, probs[..., :recorded].amax(dim=2)
