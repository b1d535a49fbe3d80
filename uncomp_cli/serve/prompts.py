"""From a request's messages or prompt to the token ids the worker runs, split for prefix reuse.

A long document is usually asked more than one question: in a chat, the document and the first
question share the first user message, and later turns add answers and questions after it. When
that message is long enough (``reuse_min_tokens``), the part before its last paragraph break
(``"\n\n"``) is taken as a **context**: it is compressed once, query-agnostically, kept in the
server's :class:`~uncomp_cli.serve.store.ContextStore`, and everything after it (the first
question, the template's turn markers, later turns) is fed on the compressed cache, never
compressed. The next request about the same document — a new turn, or a new conversation opening
with the same document — finds the context by the hash of its tokens and skips its prefill.
The context is tokenised on its own (as ``uncomp generate --context-file`` does), so its tokens
are the same whatever follows it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from uncomp_cli.models.prompting import CONTEXT_SEPARATOR

_MARK = "<<uncomp-rest>>"


@dataclass
class Prompt:
    """What the worker runs: ``ids`` whole, or ``context_ids`` (compressed once, reusable) then ``rest_ids``."""

    ids: list[int]
    context_ids: list[int] | None = None
    rest_ids: list[int] | None = None

    def context_hash(self) -> str | None:
        if self.context_ids is None:
            return None
        return hashlib.sha256(",".join(map(str, self.context_ids)).encode()).hexdigest()


def _ids(encoded) -> list[int]:
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def template_carries_name(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes a message's ``name`` into the prompt (most
    templates drop it: then a request that gives one is refused rather than answered without it)."""
    mark = "uncomp-name-mark"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi", "name": mark}],
                                                 add_generation_prompt=True, tokenize=False)
    except Exception:  # a template that fails on the extra key does not carry it either
        return False
    return isinstance(rendered, str) and mark in rendered


def chat_prompt(tokenizer, messages: list[dict], reuse_min_tokens: int = 0) -> Prompt:
    """Token ids of a chat (template with the assistant's turn opened); split when reusable."""
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError("the messages have no user message with text")
    whole = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[first]["content"]
    if reuse_min_tokens <= 0 or CONTEXT_SEPARATOR not in content:
        return Prompt(whole)
    context, question = content.rsplit(CONTEXT_SEPARATOR, 1)
    if not context.strip():
        return Prompt(whole)
    marked = [dict(m) for m in messages]
    marked[first]["content"] = context + CONTEXT_SEPARATOR + _MARK + question
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    head, found, rest = rendered.partition(_MARK)
    if not found:  # a template that rewrites message text: no safe split
        return Prompt(whole)
    context_ids = _ids(tokenizer(head, add_special_tokens=False))
    if len(context_ids) < reuse_min_tokens:
        return Prompt(whole)
    rest_ids = _ids(tokenizer(rest, add_special_tokens=False))
    return Prompt(context_ids + rest_ids, context_ids, rest_ids)


def text_prompt(tokenizer, prompt: str, reuse_min_tokens: int = 0) -> Prompt:
    """Token ids of a raw completion prompt; the text before its last paragraph break is the context."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    whole = _ids(tokenizer(prompt, add_special_tokens=True))
    if reuse_min_tokens <= 0 or CONTEXT_SEPARATOR not in prompt:
        return Prompt(whole)
    context, question = prompt.rsplit(CONTEXT_SEPARATOR, 1)
    if not context.strip() or not question:
        return Prompt(whole)
    context_ids = _ids(tokenizer(context + CONTEXT_SEPARATOR, add_special_tokens=True))
    if len(context_ids) < reuse_min_tokens:
        return Prompt(whole)
    rest_ids = _ids(tokenizer(question, add_special_tokens=False))
    return Prompt(context_ids + rest_ids, context_ids, rest_ids)
