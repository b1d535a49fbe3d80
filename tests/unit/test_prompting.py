"""Prompt building and the context-length check."""

from __future__ import annotations

import pytest
from tiny import tiny_tokenizer

from uncomp_cli.errors import PromptError
from uncomp_cli.models.prompting import build_prompt_ids, fit_to_context


def test_chat_template_is_applied_unless_raw():
    tok = tiny_tokenizer()
    templated = build_prompt_ids(tok, "hello world", system="be brief")
    assert tok.decode(templated) == "<|system|>be brief</s><|user|>hello world</s><|assistant|>"
    raw = build_prompt_ids(tok, "hello world", raw=True)
    assert tok.decode(raw) == "hello world"


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_empty_prompt_is_rejected(prompt):
    with pytest.raises(PromptError, match="empty"):
        build_prompt_ids(tiny_tokenizer(), prompt)


def test_over_long_prompt_names_both_lengths():
    with pytest.raises(PromptError, match=r"prompt is 100 tokens but the model's context is 64 tokens"):
        fit_to_context(list(range(100)), context=64, max_new_tokens=8)


def test_middle_truncation_keeps_head_and_tail():
    ids = list(range(100))
    cut = fit_to_context(ids, context=64, max_new_tokens=8, truncate="middle")
    assert len(cut) == 56
    assert cut[:28] == ids[:28] and cut[28:] == ids[-28:]


def test_prompt_that_fits_is_unchanged_and_bad_modes_rejected():
    assert fit_to_context([1, 2, 3], context=64, max_new_tokens=8) == [1, 2, 3]
    with pytest.raises(PromptError, match="invalid truncation"):
        fit_to_context([1], context=64, max_new_tokens=8, truncate="left")
    with pytest.raises(PromptError, match="leaves no room"):
        fit_to_context([1], context=64, max_new_tokens=64)
