"""Log probabilities in OpenAI's shapes: a log-softmax of the step's logits, the k most likely first,
exact bytes (a byte-level token may hold part of a character), the legacy completions lists."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_tokenizer

from uncomp_cli.serve.logprobs import FLOOR, chat_logprobs, completion_logprobs, token_bytes, token_logprobs


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def logits(tokenizer):
    return torch.randn(len(tokenizer), generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_the_chosen_token_and_the_k_most_likely_with_their_log_softmax(tokenizer, logits, k):
    expected = torch.log_softmax(logits, -1)
    chosen = 7
    entry = token_logprobs(logits, chosen, k, tokenizer)
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["logprob"] == pytest.approx(float(expected[chosen]), abs=1e-6)
    assert entry["bytes"] == list(token_bytes(tokenizer, chosen))
    top = entry["top_logprobs"]
    assert len(top) == k and all(set(t) == {"token", "logprob", "bytes"} for t in top)
    assert [t["logprob"] for t in top] == pytest.approx(expected.topk(k).values.tolist(), abs=1e-6)
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert [t["bytes"] for t in top] == [list(token_bytes(tokenizer, i)) for i in expected.topk(k).indices.tolist()]


def test_log_probabilities_sum_to_one_and_any_dtype_or_shape_gives_the_same(tokenizer, logits):
    entry = token_logprobs(logits, 3, 300, tokenizer)  # every token
    assert sum(torch.tensor([t["logprob"] for t in entry["top_logprobs"]]).exp().tolist()) == pytest.approx(1, abs=1e-5)
    half = token_logprobs(logits.to(torch.bfloat16).view(1, -1), 3, 2, tokenizer)
    assert half["logprob"] == pytest.approx(entry["logprob"], abs=0.05)


def test_the_bytes_of_a_multi_byte_character_split_over_tokens_join_to_its_utf8(tokenizer, logits):
    text = "Paris é日"
    ids = tokenizer.encode(text, add_special_tokens=False)
    entries = [token_logprobs(logits, i, 0, tokenizer) for i in ids]
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    partial = [e for e in entries if len(e["bytes"]) == 1 and e["bytes"][0] >= 0x80]
    assert partial, "the tiny tokenizer splits é and 日 into bytes"
    for entry in partial:  # a part of a character: its bytes as \xNN in the text, exactly in "bytes"
        assert entry["token"] == f"\\x{entry['bytes'][0]:02x}"
    assert entries[0]["token"] == "Pa" and entries[0]["bytes"] == list(b"Pa")


def test_an_impossible_token_gets_openais_floor_and_the_entry_is_valid_json(tokenizer, logits):
    masked = logits.clone()
    masked[5] = float("-inf")
    entry = token_logprobs(masked, 5, 3, tokenizer)
    assert entry["logprob"] == FLOOR
    json.dumps(entry, allow_nan=False)


def test_chat_logprobs_hold_the_entries_as_content(tokenizer, logits):
    entries = [token_logprobs(logits, i, 2, tokenizer) for i in (4, 5)]
    assert chat_logprobs(entries) == {"content": entries, "refusal": None}


def test_completion_logprobs_are_the_legacy_lists_with_the_chosen_token_among_the_top(tokenizer, logits):
    text = "Paris é日!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    entries = [token_logprobs(logits, i, 2, tokenizer) for i in ids]
    legacy = completion_logprobs(entries)
    assert set(legacy) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert legacy["tokens"] == [e["token"] for e in entries]
    assert legacy["token_logprobs"] == [e["logprob"] for e in entries]
    for entry, top in zip(entries, legacy["top_logprobs"]):
        assert top[entry["token"]] == entry["logprob"] and 2 <= len(top) <= 3
    # where each token starts in the answer's characters: both bytes of é start at é
    starts = legacy["text_offset"]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] == text.index("!")
    assert starts.count(text.index("é")) == 2 and starts.count(text.index("日")) == 3


class _SentencePiece:
    """A tokenizer in SentencePiece's style: U+2581 for a space, <0xNN> for a byte."""

    pieces = {0: "▁hello", 1: "<0xE6>", 2: "world"}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_sentencepiece_pieces_give_their_bytes():
    tokenizer = _SentencePiece()
    assert [token_bytes(tokenizer, i) for i in range(3)] == [b" hello", b"\xe6", b"world"]
