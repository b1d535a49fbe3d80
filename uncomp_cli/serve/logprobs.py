"""Log probabilities of generated tokens, in the shapes of OpenAI's API.

One function per step and row, :func:`token_logprobs`: from the logits ``[V]`` the token was picked
from, the chosen token's log probability and the ``k`` most likely alternatives, as chat's entry
``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}``. The
whole answer's value is :func:`chat_logprobs` of the entries (``{"content": [...], "refusal": None}``)
or, for ``/v1/completions``, :func:`completion_logprobs` (the legacy lists ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``; :class:`CompletionLogprobs` chunk by chunk).

Log probabilities are of the model's own distribution (a log-softmax of the raw logits), before
temperature and top-p, as vLLM reports them by default; a greedy and a sampled request report the
same numbers. A token's ``bytes`` are its exact bytes (a byte-level BPE token may hold part of a
multi-byte character); its ``token`` text is those bytes as UTF-8, with the bytes of an incomplete
character written as ``\\xNN`` escapes (what DeepSeek's API does), since JSON strings cannot carry
them.
"""

from __future__ import annotations

import codecs
import functools
import re

import torch

#: OpenAI's value for a token too unlikely to say (JSON has no -inf).
FLOOR = -9999.0

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level token may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    table = _byte_decoder()
    if _byte_level(tokenizer) and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if match := _BYTE_TOKEN.fullmatch(piece):  # SentencePiece's byte fallback
        return bytes([int(match.group(1), 16)])
    if "▁" in piece:  # SentencePiece marks a space with U+2581
        return piece.replace("▁", " ").encode()
    return tokenizer.decode([token_id]).encode()


def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": max(logprob, FLOOR),
            "bytes": list(raw)}


def token_logprobs(logits: torch.Tensor, token_id: int, k: int, tokenizer) -> dict:
    """Chat's logprobs entry for one generated token.

    logits: [V], the step's scores the token was picked from (any float dtype, any device).
    token_id: the token picked. k: how many of the most likely tokens to list (0–20), most likely
    first. -> ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}] * k}``
    """
    logprobs = torch.log_softmax(logits.detach().float().flatten(), dim=-1)
    chosen = float(logprobs[token_id])
    entry = _entry(tokenizer, token_id, chosen)
    top: list[dict] = []
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        top = [_entry(tokenizer, i, v) for v, i in zip(values.tolist(), ids.tolist())]
    return entry | {"top_logprobs": top}


def chat_logprobs(entries: list[dict]) -> dict:
    """A chat choice's ``logprobs`` from the entries of its tokens."""
    return {"content": entries, "refusal": None}


class CompletionLogprobs:
    """A completion choice's legacy ``logprobs``, made from the entries of its tokens as they come
    (a stream's chunks in turn; a whole answer at once).

    ``top_logprobs`` maps each alternative's text to its log probability and always holds the
    chosen token too (so up to ``k + 1`` items, as OpenAI's completions API does); ``text_offset``
    is the character of the answer where each token's text starts (a token that only completes a
    character started before it shares that character's offset).
    """

    def __init__(self) -> None:
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, entries: list[dict]) -> dict:
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(self._decoder.decode(bytes(entry["bytes"])))
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} | {e["token"]: e["logprob"]}
                                 for e in entries],
                "text_offset": offsets}


def completion_logprobs(entries: list[dict]) -> dict:
    """A whole completion's legacy ``logprobs`` (see :class:`CompletionLogprobs`)."""
    return CompletionLogprobs()(entries)
