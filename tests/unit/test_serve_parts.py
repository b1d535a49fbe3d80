"""The server's parts without HTTP: request checks, stop sequences, the reusable-context split, the
context store, per-request budgets, admission by KV bytes and the queue limit."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from tiny import tiny_tokenizer  # noqa: E402

from uncomp_cli.policies.registry import make_policy  # noqa: E402
from uncomp_cli.serve.prompts import chat_prompt, text_prompt  # noqa: E402
from uncomp_cli.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_request  # noqa: E402
from uncomp_cli.serve.server import BUDGET_STEP, own_budget  # noqa: E402
from uncomp_cli.serve.store import ContextStore  # noqa: E402
from uncomp_cli.serve.worker import RowText  # noqa: E402


def test_a_valid_chat_request_parses_with_openai_defaults():
    request = parse_request(ChatRequest, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    # temperature and top_p stay unset: the server takes them from the model's generation_config
    assert (request.temperature, request.top_p, request.n, request.stream, request.stops()) == \
        (None, None, 1, False, [])
    assert request.chat() == [{"role": "user", "content": "hi"}]


def test_text_parts_and_the_developer_role_become_a_plain_chat():
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]})
    assert request.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_max_completion_tokens_is_the_newer_name_of_max_tokens():
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          "max_completion_tokens": 7})
    assert request.limit() == 7


@pytest.mark.parametrize("body, message", [
    (b'{"model": "m"}', "missing field 'messages'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}', "n: only n=1 is supported"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "foo": 1}', "unsupported field 'foo'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}', "temperature"),
    (b'not json', "not valid JSON"),
    (b'"a string"', "must be a JSON object"),
])
def test_bad_bodies_become_one_api_error(body, message):
    with pytest.raises(ApiError, match=message) as caught:
        parse_request(ChatRequest, body)
    assert caught.value.status == 400 and caught.value.body()["error"]["type"] == "invalid_request_error"


def test_a_completion_takes_one_prompt_as_a_string_or_a_list_of_one():
    assert parse_request(CompletionRequest, b'{"model": "m", "prompt": ["one"]}').prompt == "one"
    with pytest.raises(ApiError, match="one prompt per request"):
        parse_request(CompletionRequest, b'{"model": "m", "prompt": ["one", "two"]}')


class _Tokens:
    """A tokenizer whose tokens are characters, to test the text side of a row alone."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _row(text: str, stops: list[str]) -> tuple[str, RowText]:
    row = RowText(_Tokens(), stops)
    sent = "".join(row.push(ord(c)) for c in text if not row.stopped)
    return sent + row.close(), row


def test_a_stop_sequence_cuts_the_text_and_nothing_after_it_is_sent():
    sent, row = _row("hello world, and more", ["wor", "zzz"])
    assert sent == "hello " and row.stopped


def test_text_that_might_start_a_stop_is_held_back_until_it_cannot():
    row = RowText(_Tokens(), ["abc"])
    assert row.push(ord("x")) == ""  # two characters are held while they could begin "abc"
    assert row.push(ord("a")) == ""
    assert row.push(ord("b")) == "x"
    assert row.push(ord("d")) == "a"
    assert row.close() == "bd" and not row.stopped


def test_without_stops_every_character_is_sent_at_once():
    sent, row = _row("hello", [])
    assert sent == "hello" and row.tokens == 5


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


DOC = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)


def test_a_long_first_message_splits_into_a_context_every_later_turn_shares(tokenizer):
    first = [{"role": "user", "content": DOC + "\n\nWhat does the fox do?"}]
    later = [*first, {"role": "assistant", "content": "It jumps."}, {"role": "user", "content": "And the dog?"}]
    one, two = chat_prompt(tokenizer, first, 32), chat_prompt(tokenizer, later, 32)
    assert one.context_ids is not None and one.context_ids == two.context_ids
    assert one.context_hash() == two.context_hash()
    assert one.ids == one.context_ids + one.rest_ids and two.ids == two.context_ids + two.rest_ids
    assert tokenizer.decode(one.rest_ids).startswith("What does the fox do?")


def test_short_messages_and_reuse_off_are_not_split(tokenizer):
    messages = [{"role": "user", "content": DOC + "\n\nWhat?"}]
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    whole = list(whole if isinstance(whole, list) else whole["input_ids"])
    assert chat_prompt(tokenizer, messages, 0).context_ids is None
    assert chat_prompt(tokenizer, messages, 10_000).context_ids is None
    assert chat_prompt(tokenizer, messages, 0).ids == whole
    assert chat_prompt(tokenizer, [{"role": "user", "content": DOC}], 32).context_ids is None  # no break


def test_a_completion_prompt_splits_at_its_last_paragraph_break(tokenizer):
    prompt = text_prompt(tokenizer, DOC + "\n\nQ: what?", 32)
    assert prompt.context_ids is not None and tokenizer.decode(prompt.rest_ids) == "Q: what?"
    with pytest.raises(ValueError, match="empty"):
        text_prompt(tokenizer, "   ", 32)


class _Context:
    def __init__(self, size: int):
        self.size = size

    def kv_cache_bytes(self) -> int:
        return self.size


def test_the_context_store_drops_the_least_recently_used_to_stay_under_its_bytes():
    store = ContextStore(100)
    store.put("a", _Context(40))
    store.put("b", _Context(40))
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", _Context(40))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.bytes == 80 and len(store) == 2
    store.put("huge", _Context(101))
    assert store.get("huge") is None and store.bytes == 80
    assert (store.hits, store.misses) == (3, 2)


@pytest.mark.parametrize("prompt_tokens", [100, 203, 1000, 2047])
def test_a_share_becomes_this_prompts_token_count_rounded_up(prompt_tokens):
    share = make_policy("snapkv", budget="10%", window=8)
    own = own_budget(share, prompt_tokens, keep_all=4096)
    tokens = int(own.budget)
    assert tokens % BUDGET_STEP == 0 and share.kv_budget(prompt_tokens) <= tokens < \
        share.kv_budget(prompt_tokens) + BUDGET_STEP


def test_a_prompt_a_share_keeps_whole_and_token_counts_are_left_as_given():
    assert own_budget(make_policy("snapkv", budget="5%"), 40, keep_all=4096).budget == "4096"
    whole = own_budget(make_policy("uncomp", budget="5%"), 40, keep_all=4096)
    assert (whole.budget, whole.prefill_compression) == ("4096", False)  # a short question is not pruned
    assert own_budget(make_policy("uncomp", budget="5%"), 4000, keep_all=4096).prefill_compression
    assert own_budget(make_policy("snapkv", budget="64"), 1000, keep_all=4096).budget == "64"
    assert own_budget(make_policy("full"), 1000, keep_all=4096).name == "full"


def test_a_store_that_does_not_evict_keeps_the_first_entries_when_full():
    from uncomp_cli.contexts.store import BytesLRU

    store = BytesLRU(100, lambda c: c.kv_cache_bytes(), evict=False)
    for key in "abc":
        store.put(key, _Context(40))
    assert [store.get(k) is not None for k in "abc"] == [True, True, False] and store.bytes == 80
