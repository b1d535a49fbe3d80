"""The attention computations of the grouped cache, apart from what it stores.

* :func:`causal_attention` — a prompt's causal self-attention on SDPA's fused path (row by row
  for a left-padded batch);
* :func:`attend_group` — new queries over one head group's stored tokens (decoding);
* :func:`rule_attention` — the same with the mask taken from token positions, for sliding-window
  layers and attention soft-capping, which SDPA cannot serve as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """Causal self-attention over a prompt. query: [B, H_q, N, d]; keys/values: [B, H_kv, N, d];
    valid: [B, N] (False for left padding) or None. Returns [B, H_q, N, d].

    A left-padded batch attends row by row over each row's real tokens, with SDPA's fused causal
    path: one [B, N, N] mask would send SDPA down its unfused path, which on a CPU prefilled a
    padded batch of 12 prompts of 2k tokens at 5.0 s per prompt against 4.3 s row by row and 3.5 s
    alone (``scripts/bench_batched_prefill.py``). A padding position attends to itself only (its
    output is never read by a real token).
    """
    gqa = query.shape[1] != keys.shape[1]
    if valid is None:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=query.shape[2] > 1, scale=scaling,
                                              enable_gqa=gqa)
    n = query.shape[2]
    starts = n - valid.sum(-1)
    if not bool((valid == (torch.arange(n, device=valid.device)[None] >= starts[:, None])).all()):
        return _masked_causal_attention(query, keys, values, valid, scaling)  # not left padding
    out = values.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # padding: itself
    out = out.clone() if out.data_ptr() == values.data_ptr() else out
    for row, start in enumerate(starts.tolist()):
        if start < n:
            out[row:row + 1, :, start:] = F.scaled_dot_product_attention(
                query[row:row + 1, :, start:], keys[row:row + 1, :, start:], values[row:row + 1, :, start:],
                is_causal=n - start > 1, scale=scaling, enable_gqa=gqa)
    return out


def _masked_causal_attention(query, keys, values, valid, scaling) -> torch.Tensor:
    n = query.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    itself = torch.eye(n, dtype=torch.bool, device=query.device)
    mask = (causal[None, None] & valid[:, None, None, :]) | itself[None, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != keys.shape[1])


def attend_group(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of new queries over one group's stored tokens, the new ones last.

    query: [B, h·rep, q, d] (query heads of the group's h KV heads); keys/values: [B, h, T, d];
    valid: [B, h, T] or None. The query heads sharing a KV head are folded into rows
    ([B, h, rep·q, d]), so K/V are never expanded. Returns [B, h·rep, q, d].
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    rep = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, rep * q_len, dim)
    mask = None
    if q_len > 1 or valid is not None:
        row_pos = torch.arange(total - q_len, total, device=keys.device)  # position of each new query
        key_pos = torch.arange(total, device=keys.device)
        causal = (key_pos[None, :] <= row_pos[:, None]).repeat(rep, 1)  # [rep·q, T]
        mask = causal[None, None]
        if valid is not None:
            # A query always sees itself, so a padding row cannot end up with nothing to attend to.
            itself = (key_pos[None, :] == row_pos[:, None]).repeat(rep, 1)
            mask = (mask & valid[:, :, None, :]) | itself[None, None]
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, q_heads, q_len, dim)


#: Queries per block in :func:`rule_attention`: bounds its [B, h, rows, T] scores.
RULE_BLOCK = 512


def rule_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_positions: torch.Tensor,
                   key_positions: torch.Tensor, key_valid: torch.Tensor | None, scaling: float,
                   sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention whose mask comes from token positions, for the layers SDPA cannot serve as they are:
    sliding-window layers (Gemma 2/3, Phi-3, Mistral: a query at position p sees keys at positions
    p − W < k ≤ p) and attention soft-capping (Gemma 2: ``tanh(s / c) · c`` on the scores).

    query: [B, h·rep, q, d]; keys/values: [B, h, T, d]; query_positions: [B, q]; key_positions and
    key_valid: [B, h, T]. Computed in float32 whatever the model's dtype, as SDPA does internally
    (scores rounded to bfloat16 first made a tiny bfloat16 Gemma 3 choose other tokens than its
    ``DynamicCache`` run: tests/unit/test_precision.py), a block of queries at a time. A padding
    query, which sees nothing, attends to everything instead (its output is never read).
    Returns [B, h·rep, q, d].
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    rep = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, rep * q_len, dim)
    rows = query_positions[:, None, :].expand(batch, rep, q_len).reshape(batch, 1, rep * q_len)
    out = torch.empty_like(folded)
    keys_t, values_f = keys.transpose(2, 3).float(), values.float()  # scores in float32, as SDPA's are
    for start in range(0, rep * q_len, RULE_BLOCK):
        block = slice(start, start + RULE_BLOCK)
        scores = torch.matmul(folded[:, :, block].float(), keys_t) * scaling  # [B, h, r, T]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos, k_pos = rows[:, :, block, None], key_positions[:, :, None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        if key_valid is not None:
            allowed &= key_valid[:, :, None, :]
        allowed |= ~allowed.any(-1, keepdim=True)  # padding queries: anything finite, never read
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out[:, :, block] = torch.matmul(torch.softmax(scores, dim=-1), values_f).to(out.dtype)
    return out.reshape(batch, q_heads, q_len, dim)
