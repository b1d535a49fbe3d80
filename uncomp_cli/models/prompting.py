"""Turn user text into prompt token ids: chat template or raw text, and the context-length check."""

from __future__ import annotations

from uncomp_cli.errors import PromptError

TRUNCATE_MODES = ("none", "middle")


def context_length(config) -> int:
    """The longest sequence the model was built for (``max_position_embeddings``)."""
    return int(getattr(config, "max_position_embeddings", 0) or 0) or 2048


def build_prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for ``prompt``: through the chat template when the tokenizer has one, unless ``raw``.

    ``raw`` passes the text exactly as given, which answer-prefix prompts (needle tests) need.
    """
    if not prompt or not prompt.strip():
        raise PromptError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        if system:
            prompt = f"{system}\n\n{prompt}"
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in some tokenizers
            ids = ids["input_ids"]
    if not ids:
        raise PromptError("the prompt has no tokens")
    return list(ids)


#: Between a context and the question asked about it, as in one user message "context\n\nquestion".
CONTEXT_SEPARATOR = "\n\n"
_QUESTION_MARK = "<<uncomp-question>>"


def context_prompt(tokenizer, context: str, system: str | None = None, raw: bool = False) -> tuple[list[int], str]:
    """A context prompted apart from its questions: (the context's token ids, the text that follows
    every question).

    The chat template is rendered for one user message ``context + "\n\n" + question`` and cut where
    the question goes (kvpress's pipeline does the same): the ids hold the template's head, the
    system message and the context; the tail (end of the user turn, start of the assistant's) is
    put after each question. ``raw``: the context as given, no tail.
    """
    if not context or not context.strip():
        raise PromptError("the context is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        text = f"{system}\n\n{context}" if system else context
        ids = tokenizer(text + CONTEXT_SEPARATOR, add_special_tokens=True)["input_ids"]
        return list(ids), ""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": context + CONTEXT_SEPARATOR + _QUESTION_MARK})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, _, tail = rendered.partition(_QUESTION_MARK)
    return list(tokenizer(head, add_special_tokens=False)["input_ids"]), tail


def template_tail(tokenizer) -> str:
    """What :func:`context_prompt` puts after every question (end of the user turn, start of the
    answer); empty without a chat template."""
    return context_prompt(tokenizer, ".")[1] if getattr(tokenizer, "chat_template", None) else ""


def question_ids(tokenizer, question: str, tail: str, answer_prefix: str | None = None) -> list[int]:
    """The tokens fed after a context: the question, the template's tail, then ``answer_prefix``."""
    if not question or not question.strip():
        raise PromptError("the question is empty")
    return list(tokenizer(question + tail + (answer_prefix or ""), add_special_tokens=False)["input_ids"])


def fit_to_context(ids: list[int], context: int, max_new_tokens: int, truncate: str = "none") -> list[int]:
    """Check that prompt + new tokens fit the context; ``truncate="middle"`` cuts the prompt's middle.

    Middle truncation keeps the first and last halves of what fits, as LongBench does: instructions
    at the start and the question at the end survive.
    """
    if truncate not in TRUNCATE_MODES:
        raise PromptError(f"invalid truncation {truncate!r}; use one of {', '.join(TRUNCATE_MODES)}")
    room = context - max_new_tokens
    if room < 1:
        raise PromptError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    if len(ids) <= room:
        return ids
    if truncate == "middle":
        head = room // 2
        return ids[:head] + ids[len(ids) - (room - head):]
    raise PromptError(
        f"the prompt is {len(ids)} tokens but the model's context is {context} tokens "
        f"({max_new_tokens} reserved for new tokens); shorten it or pass --truncate middle"
    )
