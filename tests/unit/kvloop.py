"""A small manual prefill + greedy decode loop with explicit positions, for the cache tests.

Kept here (not in uncomp_cli.engine.generation) so the compression tests do not depend on the generation
loop being written alongside them.
"""

from __future__ import annotations

import torch


def left_padded(lengths: list[int], seed: int = 0, vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with 0. -> ids, mask: [B, max(lengths)]."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


@torch.no_grad()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, cache, steps: int = 6
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill then ``steps`` greedy steps. -> logits [steps + 1, B, V], tokens [B, steps + 1]."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    logits = [out.logits[:, -1]]
    next_pos = mask.sum(-1, keepdim=True)
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        logits.append(out.logits[:, -1])
        next_pos = next_pos + 1
    stacked = torch.stack(logits)
    return stacked, stacked.argmax(-1).T


def assert_each_row_as_alone(model, policy, ids: torch.Tensor, mask: torch.Tensor, batch_logits: torch.Tensor,
                             batch_tokens: torch.Tensor, steps: int) -> None:
    """Each row of a left-padded batch run (``batch_logits``/``batch_tokens`` from :func:`greedy`)
    gives what it gives when ``policy`` runs it alone."""
    for row, n in enumerate(mask.sum(-1).tolist()):
        alone_ids, alone_mask = ids[row:row + 1, -n:], mask[row:row + 1, -n:]
        with policy.attach(model, alone_mask) as cache:
            logits, tokens = greedy(model, alone_ids, alone_mask, cache, steps=steps)
        assert torch.equal(batch_tokens[row], tokens[0])
        torch.testing.assert_close(batch_logits[:, row], logits[:, 0], atol=1e-4, rtol=0)
