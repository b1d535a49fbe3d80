"""An experiment (issue 22, multi-query at 10 %): stand the evicted context in with a few summary entries.

The multi-query oracle showed that at 10 % the needles are in the cache and the answers still bind a
key to another key's value: what the cache lacks is the rest of the context. One thing the rest
does for every query is take attention mass, so that the kept tokens are weighed against a
background and not only against each other. Here each KV head of a compressed context gets
``count`` extra entries after its kept ones, one per contiguous run of the tokens it evicted (in
position order): the mean of their keys, the mean of their values, and an additive bias on its
attention logit so that it takes about the mass the run took:

* ``count`` bias: log of the run's length (each evicted token weighed as the mean key would be:
  a lower bound of its mass, by Jensen);
* ``lse`` bias: for the layer's last re-reading queries, the log of the run's total attention
  (logsumexp of the logits) minus the mean key's logit, averaged over those queries;
* ``zero``: the ``count`` bias with a zero value (the evicted context as pure dilution);
* ``nearest``: no summaries; each evicted value is averaged into the value of the kept token whose
  key is most like its own (cosine), as D2O and CaM merge (no bias).

Every one kept fewer multi-query answers than the plain selection, or as many (docs/results.md,
"Multi-query: standing in for the evicted context").

The entries are stored like kept tokens (they count in the cache's bytes); the bias rides on the
head group as ``summary_bias`` and is applied by a patched ``attend_group``. Nothing here is in the
library: it is installed by :func:`install` for a development run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uncomp_cli.engine import attend as attend_module
from uncomp_cli.engine import cache as cache_module
from uncomp_cli.engine.cache import GroupedKVLayer

#: (count, bias) while a summary variant compresses; None: plain selection.
SETTINGS: tuple[int, str] | None = None
_plain_select = GroupedKVLayer.select
_plain_decode = GroupedKVLayer._decode
_plain_attend = attend_module.attend_group
_groups_to_attend: list = []


def _select(self, scores, window, budgets=None):
    whole = self.groups[0]
    keys, values, queries = whole.keys, whole.values, self._window_queries
    _plain_select(self, scores, window, budgets)
    if SETTINGS is None:
        return
    count, bias_kind = SETTINGS
    if bias_kind == "nearest":
        _merge_nearest(self, keys, values)
        return
    n = keys.shape[2]
    rep = queries.shape[1] // keys.shape[1] if queries is not None else 1
    for group in self.groups:
        if group.length() >= n:
            continue
        kept = group.positions[0]  # [h, T] token indices (a context starts at position 0)
        evicted_mask = torch.ones(len(group.heads), n, dtype=torch.bool, device=keys.device)
        evicted_mask.scatter_(1, kept, False)
        evicted = evicted_mask.nonzero()[:, 1].view(len(group.heads), -1)  # [h, E] ascending
        head_index = torch.tensor(group.heads, device=keys.device)
        head_keys, head_values = keys[0, head_index], values[0, head_index]  # [h, N, d]
        new_keys, new_values, biases = [], [], []
        for run in torch.tensor_split(evicted, min(count, evicted.shape[1]), dim=1):  # [h, m]
            run_keys = head_keys.gather(1, run[..., None].expand(-1, -1, keys.shape[-1]))
            run_values = head_values.gather(1, run[..., None].expand(-1, -1, keys.shape[-1]))
            mean_key, mean_value = run_keys.mean(1), run_values.mean(1)  # [h, d]
            if bias_kind == "zero":  # the mass alone: the summary adds nothing to the output
                mean_value = torch.zeros_like(mean_value)
            if bias_kind in ("count", "zero") or queries is None:
                bias = torch.full((len(group.heads),), float(run.shape[1]), device=keys.device).log()
            else:
                q = queries[0].view(keys.shape[1], rep, -1, keys.shape[-1])[head_index].flatten(1, 2)  # [h, r, d]
                logits = torch.einsum("hrd,hmd->hrm", q.float(), run_keys.float()) * self._scaling
                mean_logit = torch.einsum("hrd,hd->hr", q.float(), mean_key.float()) * self._scaling
                bias = (logits.logsumexp(-1) - mean_logit).mean(-1)
            new_keys.append(mean_key)
            new_values.append(mean_value)
            biases.append(bias)
        summary_keys = torch.stack(new_keys, 1)[None].to(group.keys.dtype)  # [1, h, C, d]
        summary_values = torch.stack(new_values, 1)[None].to(group.values.dtype)
        c = summary_keys.shape[2]
        group.store(torch.cat([group.keys, summary_keys], 2), torch.cat([group.values, summary_values], 2),
                    torch.cat([group.valid, torch.ones(1, len(group.heads), c, dtype=torch.bool,
                                                       device=keys.device)], 2),
                    torch.cat([group.positions, evicted[:, -1:].expand(-1, c)[None]], 2))
        group.summary_bias = torch.cat([torch.zeros(1, len(group.heads), group.length() - c, device=keys.device),
                                        torch.stack(biases, 1)[None].float()], 2)


def _merge_nearest(layer, keys, values) -> None:
    """D2O/CaM-like merging, no bias: each evicted token's value is averaged into the value of the kept
    token whose key is most like its own (cosine), uniformly weighted."""
    n = keys.shape[2]
    for group in layer.groups:
        if group.length() >= n:
            continue
        head_index = torch.tensor(group.heads, device=keys.device)
        head_keys, head_values = keys[0, head_index].float(), values[0, head_index].float()  # [h, N, d]
        kept = group.positions[0]  # [h, T]
        evicted_mask = torch.ones(len(group.heads), n, dtype=torch.bool, device=keys.device)
        evicted_mask.scatter_(1, kept, False)
        unit = F.normalize(head_keys, dim=-1)
        kept_unit = unit.gather(1, kept[..., None].expand(-1, -1, unit.shape[-1]))  # [h, T, d]
        nearest = torch.einsum("hnd,htd->hnt", unit, kept_unit).argmax(-1)  # [h, N]
        sums = torch.zeros(len(group.heads), kept.shape[1], head_values.shape[-1], device=keys.device)
        counts = torch.zeros(len(group.heads), kept.shape[1], device=keys.device)
        weight = evicted_mask.float()
        sums.scatter_add_(1, nearest[..., None].expand(-1, -1, head_values.shape[-1]), head_values * weight[..., None])
        counts.scatter_add_(1, nearest, weight)
        merged = (group.values[0].float() + sums) / (1 + counts)[..., None]
        group.store(group.keys, merged[None].to(group.values.dtype), group.valid, group.positions)


def _decode(self, *args, **kwargs):
    _groups_to_attend[:] = list(self.groups)
    return _plain_decode(self, *args, **kwargs)


def _attend(query, keys, values, valid, scaling):
    group = _groups_to_attend.pop(0) if _groups_to_attend else None
    bias = getattr(group, "summary_bias", None)
    if bias is None:
        return _plain_attend(query, keys, values, valid, scaling)
    batch, q_heads, q_len, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    rep = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, rep * q_len, dim)
    full = torch.zeros(batch, kv_heads, total, device=keys.device)
    full[..., :bias.shape[-1]] = bias
    row_pos = torch.arange(total - q_len, total, device=keys.device)
    key_pos = torch.arange(total, device=keys.device)
    allowed = (key_pos[None, :] <= row_pos[:, None]).repeat(rep, 1)[None, None]  # [1, 1, rep·q, T]
    if valid is not None:
        allowed = allowed & valid[:, :, None, :]
    mask = full[:, :, None, :].expand(batch, kv_heads, rep * q_len, total).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask.to(query.dtype), scale=scaling)
    return out.reshape(batch, q_heads, q_len, dim)


def install() -> None:
    """Patch the grouped cache for summary variants (SETTINGS set per variant)."""
    GroupedKVLayer.select = _select
    GroupedKVLayer._decode = _decode
    cache_module.attend_group = _attend
