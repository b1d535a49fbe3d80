"""Whole words for a compressed context: a head keeps all of a word's tokens or none of them.

A tokenizer cuts a number into digits and a rare name into pieces; a re-reading scores each piece
on its own, so a head may keep six digits of a seven-digit number, and the answer comes out one
digit short (the most common miss at 5 %, docs/results.md). Scoring each token by the best of its
word's tokens keeps a word whole wherever any of it is kept, at the cost of the words' other
pieces — few, because most words are one token. (A word's tokens then tie, so a cut-off that
falls inside one still splits it: the digits of a number can sit at the cut-off of the tokens
every head keeps; docs/results.md, "Whole words".)
"""

from __future__ import annotations

import torch

#: Tokens one word holds at most; a longer run starts a new word. Text written without spaces
#: (Chinese, Japanese, a long hexadecimal string) would otherwise be one word a sentence long.
#: 12 holds a space and an 11-digit number.
MAX_WORD_TOKENS = 12


def word_ids(tokenizer, ids: list[int]) -> torch.Tensor:
    """Each token's word number [N], rising. A token continues the word before it when its text
    starts with a letter or digit and the token before ends in one, or is a lone space (SmolLM2
    writes " 7007071" as " ", "7", "0", ...), and the word holds fewer than
    :data:`MAX_WORD_TOKENS`. Anything else — a leading space, punctuation, a newline — starts a
    new word."""
    texts = {token: tokenizer.decode([token]) for token in set(ids)}
    words, word, length, before = [], 0, 0, ""
    for token in ids:
        text = texts[token]
        if not (text[:1].isalnum() and (before[-1:].isalnum() or before == " ") and length < MAX_WORD_TOKENS):
            word, length = word + 1, 0
        words.append(word)
        length += 1
        before = text
    return torch.tensor(words, dtype=torch.long)


def pool_over_words(scores: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``scores`` [..., N] with each token's replaced by the most of its word's (``words`` [N])."""
    if words.numel() == 0:
        return scores
    index = words.to(scores.device).expand_as(scores)
    best = torch.full(scores.shape[:-1] + (int(words.max()) + 1,), -float("inf"), dtype=scores.dtype,
                      device=scores.device).scatter_reduce(-1, index, scores, "amax")
    return best.gather(-1, index)
