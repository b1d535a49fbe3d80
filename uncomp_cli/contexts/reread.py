"""Re-read a context behind a repeat prompt and record what the re-reading attends to (KVzip's scorer).

After a prefill that keeps every token, the model repeats the context — whole by default, or in
chunks of :data:`REREAD_CHUNK` tokens (KVzip, arXiv 2505.23416, ``model/wrapper.py``): the first after
"Repeat the previous context exactly.", each later one after "Repeat the part of the previous
context exactly, starting with" and the previous chunk's last :data:`OVERLAP` tokens, each as a new
user turn. Every chunk sees the context and its own prompt and tokens only: after it the cache goes
back to the context alone (:func:`~uncomp_cli.engine.checkpoint.rollback`, no copy), so a chunk
attends to N + its own tokens, not to every chunk before it. A KV entry's score is the most
attention any re-reading query of its KV head paid it, over every chunk (recorded by the layer,
:func:`~uncomp_cli.engine.recording.attend_and_record`).

Two sizes, not to be confused: :data:`REREAD_CHUNK` is how much context one repeat prompt covers
(what a chunk sees); :data:`RECONSTRUCT_CHUNK` is how many of its tokens one forward pass feeds
(what bounds the probabilities a recording holds at once: [H_kv, rows, T]).
"""

from __future__ import annotations

import math

import torch
from transformers import Cache

from uncomp_cli.engine.checkpoint import checkpoint, rollback
from uncomp_cli.engine.steps import feed
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.models.prompting import question_ids
from uncomp_cli.policies.base import CachePolicy

#: What the model is asked before it re-reads the context's first chunk (KVzip's wording).
REPEAT_PROMPT = "Repeat the previous context exactly."
#: ... and before each later chunk, followed by the previous chunk's last :data:`OVERLAP` tokens.
REPEAT_PART_PROMPT = "Repeat the part of the previous context exactly, starting with"
#: Tokens of the previous chunk quoted in the next chunk's prompt (KVzip: 8).
OVERLAP = 8
#: Context tokens re-read behind one repeat prompt, at most; the context is cut into equal chunks no
#: longer than this, each attending to the context and itself only. None (the default): the whole
#: context behind one prompt. KVzip's 2,000-token chunks cost less (a 4k context: 3.3× a prefill
#: instead of 4.5×, with bfloat16 products) but answered 28 of 40 development questions where one
#: re-reading answered 31: a needle that straddles a chunk boundary loses digits (docs/results.md).
REREAD_CHUNK: int | None = None
#: Re-reading tokens fed per forward pass within a chunk: bounds the attention rows recorded at once
#: ([H_kv, rows, T] probabilities). Smaller is faster on a CPU while those stay in its caches: the
#: embedded model at 4k tokens re-read in 22 s with 128, 27 s with 256, 35 s with 512 or 1024.
RECONSTRUCT_CHUNK = 128


def reread_chunks(tokenizer, ids: list[int], tail: str, size: int) -> list[list[int]]:
    """The token ids of each re-reading: its repeat prompt (``tail``: the chat template's end of the
    user turn and start of the answer), then its part of ``ids``. Parts are as equal as they can be,
    each at most ``size`` tokens. Without a tokenizer (random models) a prompt is only the quoted
    tokens."""
    count = max(1, math.ceil(len(ids) / size))
    step = math.ceil(len(ids) / count)
    parts = [ids[start:start + step] for start in range(0, len(ids), step)]
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tokenizer is not None and tail else []
    chunks = []
    for index, part in enumerate(parts):
        if tokenizer is None:
            prompt = [] if index == 0 else parts[index - 1][-OVERLAP:]
        elif index == 0:
            prompt = question_ids(tokenizer, REPEAT_PROMPT, tail)
        else:
            quoted = list(tokenizer(REPEAT_PART_PROMPT, add_special_tokens=False)["input_ids"])
            prompt = quoted + parts[index - 1][-OVERLAP:] + tail_ids
        chunks.append(prompt + part)
    return chunks


def reread(loaded: LoadedModel, cache: Cache, policy: CachePolicy, ids: list[int], tail: str,
           size: int | None = None) -> list[torch.Tensor]:
    """Re-read the context (``ids``, template head included, held whole by ``cache``) in chunks of at
    most ``size`` tokens (default :data:`REREAD_CHUNK`: the whole context at once); return how much
    attention each layer's entries received, per layer [1, H_kv, N], and leave the cache holding the
    whole context again."""
    model, device = loaded.model, loaded.device
    context_tokens = len(ids)
    size = size or REREAD_CHUNK or max(context_tokens, 1)
    saved = checkpoint(cache)
    recorded: list[torch.Tensor] | None = None
    try:
        with policy.resume(model, cache), torch.inference_mode():
            for chunk in reread_chunks(loaded.tokenizer, ids, tail, size):
                total = context_tokens + len(chunk)
                for layer in cache.layers:
                    layer.start_recording()
                feed(model, cache, torch.tensor([chunk], device=device),
                     torch.ones(1, total, dtype=torch.long, device=device),
                     torch.arange(context_tokens, total, device=device)[None], chunk=RECONSTRUCT_CHUNK)
                seen = [layer.recorded for layer in cache.layers]
                recorded = seen if recorded is None else [torch.maximum(a, b) for a, b in zip(recorded, seen)]
                rollback(cache, saved)  # the chunk's tokens go; the next one sees the context alone
    finally:
        rollback(cache, saved)
    return recorded
