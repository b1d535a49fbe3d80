"""Compressed contexts: compress once without the question, ask many questions, save and load.

On the tiny random model: answers are compared token for token, with the full cache and across
questions, never against expected text.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_profile import make_profile
from tiny import tiny_model, tiny_tokenizer

from uncomp_cli.contexts.compress import CompressedContext, ask, compress_context
from uncomp_cli.contexts.file import load_context, save_context
from uncomp_cli.engine.generation import GenerationSettings, generate_ids
from uncomp_cli.errors import UncompError
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import context_prompt, question_ids
from uncomp_cli.policies.registry import make_policy

CONTEXT = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))
QUESTIONS = ["Where is item 12?", "Which box holds item 30?", "Name an item."]
SETTINGS = GenerationSettings(max_new_tokens=6)
SMALL = {"window": 4, "kernel": 3}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_a_full_context_answers_as_the_whole_prompt_would(loaded):
    context = compress_context(loaded, CONTEXT)
    answer = ask(loaded, context, QUESTIONS[0], SETTINGS)
    ids = question_ids(loaded.tokenizer, QUESTIONS[0], context.tail)
    whole = torch.tensor([context_prompt(loaded.tokenizer, CONTEXT)[0] + ids])
    reference = generate_ids(loaded.model, whole, torch.ones_like(whole), SETTINGS, eos_ids=[])
    assert answer.token_ids == reference.tokens[0][: len(answer.token_ids)]
    assert answer.prompt_tokens == whole.shape[1] and answer.stats["context_tokens"] == context.context_tokens


@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
@pytest.mark.parametrize("method", ["snapkv", "adakv", "h2o", "streamingllm"])
def test_a_budget_that_holds_the_context_answers_as_the_full_cache(loaded, method, scorer):
    full = ask(loaded, compress_context(loaded, CONTEXT), QUESTIONS[1], SETTINGS)
    options = {k: v for k, v in SMALL.items() if k in make_policy(method).option_names()}
    kept = ask(loaded, compress_context(loaded, CONTEXT, make_policy(method, budget="10000", **options), scorer=scorer),
               QUESTIONS[1], SETTINGS)
    assert kept.token_ids == full.token_ids


def test_every_question_sees_the_same_compressed_context(loaded):
    context = compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL))
    held = context.kv_cache_bytes()
    first = [ask(loaded, context, q, SETTINGS) for q in QUESTIONS]
    again = [ask(loaded, context, q, SETTINGS) for q in reversed(QUESTIONS)][::-1]
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    assert context.kv_cache_bytes() == held  # the answers' tokens were dropped
    alone = [ask(loaded, compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL)), q, SETTINGS)
             for q in QUESTIONS]
    assert [a.token_ids for a in first] == [a.token_ids for a in alone]


@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
def test_the_context_is_compressed_to_its_budget_and_the_question_is_not(loaded, scorer):
    context = compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL), scorer=scorer)
    assert all(layer.get_seq_length() == context.context_tokens for layer in context.cache.layers)  # re-reading gone
    config = loaded.model.config
    per_token = config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * 4
    assert context.kv_cache_bytes() == 24 * per_token
    answer = ask(loaded, context, QUESTIONS[0], SETTINGS)
    fed = answer.prompt_tokens - context.context_tokens + answer.new_tokens - 1  # the last token is never fed
    assert answer.kv_cache_bytes == (24 + fed) * per_token


@pytest.mark.parametrize("method,options", [
    ("full", {}), ("snapkv", {"budget": "24"}), ("adakv", {"budget": "24"}),
    ("snapkv", {"budget": "24", "decode_evict": True}), ("uncomp", {"budget": "24"}),
])
def test_a_saved_context_answers_as_the_one_in_memory(loaded, tmp_path, method, options):
    policy = make_policy(method, **options, **({k: v for k, v in SMALL.items() if method != "full"}))
    if policy.needs_profile:
        policy = replace(policy, profile=make_profile(loaded.model.config))
    context = compress_context(loaded, CONTEXT, policy)
    path = save_context(context, loaded, tmp_path / "doc.uncomp")
    loaded_back = load_context(loaded, path)
    assert loaded_back.context_tokens == context.context_tokens and loaded_back.tail == context.tail
    assert loaded_back.kv_cache_bytes() == context.kv_cache_bytes()
    for question in QUESTIONS[:2]:
        assert ask(loaded, loaded_back, question, SETTINGS).token_ids == ask(loaded, context, question,
                                                                             SETTINGS).token_ids
    assert isinstance(loaded_back, CompressedContext)


def _rewrite_metadata(path, **changes) -> None:
    from safetensors.torch import load_file, save_file

    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    save_file(load_file(path), path, metadata=header["__metadata__"] | changes)


def test_bad_files_are_one_clear_error(loaded, tmp_path, tiny_model_dir):
    path = save_context(compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL)), loaded,
                        tmp_path / "doc.uncomp")
    good = path.read_bytes()
    cases = {
        "truncated": (good[: len(good) // 2], "is not a compressed context file"),
        "not safetensors": (b"hello, world\n" * 10, "is not a compressed context file"),
    }
    for name, (data, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '-')}.uncomp"
        bad.write_bytes(data)
        with pytest.raises(UncompError, match=message):
            load_context(loaded, bad)
    old = tmp_path / "old.uncomp"
    old.write_bytes(good)
    _rewrite_metadata(old, format_version="0")
    with pytest.raises(UncompError, match="context format version 0; this uncomp reads versions 1 and 2"):
        load_context(loaded, old)
    profile_like = tmp_path / "profile.safetensors"
    profile_like.write_bytes(good)
    _rewrite_metadata(profile_like, format="uncomp-profile")
    with pytest.raises(UncompError, match="is a calibration profile, not a compressed context"):
        load_context(loaded, profile_like)
    bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    with pytest.raises(UncompError, match="holds float32 keys and values; the model runs in bfloat16"):
        load_context(bf16, path)
    with torch.no_grad():
        loaded.model.model.norm.weight.add_(1.0)  # same shapes, other weights
    try:
        with pytest.raises(UncompError, match="was compressed with other weights"):
            load_context(loaded, path)
    finally:
        with torch.no_grad():
            loaded.model.model.norm.weight.sub_(1.0)
    other = tmp_path / "other-model"
    tiny_model("llama-mha", vocab_size=len(tiny_tokenizer())).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(UncompError, match=r"was compressed with .* \(its shapes differ\)"):
        load_context(load_model(str(other), device="cpu"), path)
    with pytest.raises(UncompError, match="context file not found"):
        load_context(loaded, tmp_path / "missing.uncomp")


def _whole_context(loaded):
    """SnapKV at 24 tokens a head, prefilled with its selection deferred (every token held), and
    the context's length: what a re-reading's scores are allocated over."""
    from uncomp_cli.engine.steps import feed, prompt_positions

    ids = context_prompt(loaded.tokenizer, CONTEXT)[0]
    mask = torch.ones(1, len(ids), dtype=torch.long)
    policy = make_policy("snapkv", budget="24", **SMALL)
    with policy.attach(loaded.model, mask, policy.plan(loaded.model, mask).deferred()) as cache:
        feed(loaded.model, cache, torch.tensor([ids]), mask, prompt_positions(mask))
    return cache, len(ids)


def test_global_allocation_gives_the_budget_to_heads_whose_scores_stand_out(loaded):
    """KVzip's allocation: all layers' and heads' entries ranked together; sinks and the last 8 kept."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    recorded = [torch.full((1, heads, n), 1e-4) for _ in range(layers)]
    peak = list(range(40, 70))  # one head of one layer attends sharply to these tokens
    recorded[1][0, 0, peak] = 0.9
    allocate_globally(cache.layers, recorded)
    kept = {(index, head): layer_groups_positions(layer, head) for index, layer in enumerate(cache.layers)
            for head in range(heads)}
    assert set(peak) <= set(kept[1, 0])
    assert all({0, 1, 2, 3} | set(range(n - 8, n)) <= set(positions) for positions in kept.values())
    total = sum(len(positions) for positions in kept.values())
    assert abs(total - layers * heads * 24) <= layers * heads  # the method's total, up to ties and floors
    assert len(kept[1, 0]) >= len(peak) + 4 + 8 > 24  # more than its own budget: the global ranking moved it there


@pytest.mark.parametrize("pool,floor", [(1, 1.0), (3, 0.0)])
def test_global_allocation_floors_and_pooling(loaded, pool, floor):
    """floor=1: every head keeps exactly its own budget, by its own scores; pool=3: a kept peak keeps
    its neighbours (a number's digits) instead of far tokens scored just below it."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    recorded = [torch.full((1, heads, n), 1e-4) for _ in range(layers)]
    recorded[1][0, 0, 40:70] = 0.9  # one head stands out: the global ranking would move budget to it
    recorded[0][0, 0, 20] = 0.5  # a lone peak, and far tokens scored just below it
    recorded[0][0, 0, 90:92] = 0.4
    allocate_globally(cache.layers, recorded, pool=pool, floor=floor, shared=0.0)
    kept = {(index, head): layer_groups_positions(layer, head) for index, layer in enumerate(cache.layers)
            for head in range(heads)}
    if floor == 1.0:
        assert all(len(positions) == 24 for positions in kept.values())
        assert 20 in kept[0, 0] and {90, 91} <= set(kept[0, 0])
    else:
        assert {19, 20, 21} <= set(kept[0, 0])  # the peak's neighbours share its score


@pytest.mark.parametrize("share_power", [1.0, 0.0])
def test_global_allocation_weights_scores_by_budget_shares_to_the_given_power(loaded, share_power):
    """Two heads read alike: with the shares' full weight the one with four times the budget keeps
    more; with power 0 the shares set only the total, so both keep the same tokens."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    cache.layers[0].budgets[:2] = [48, 12]  # head 0: four times head 1's budget
    recorded = [torch.full((1, heads, n), 1e-4) for _ in range(layers)]
    recorded[0][0, :2, 20:110] = torch.linspace(0.9, 0.01, 90)  # the same descending scores in both heads
    allocate_globally(cache.layers, recorded, share_power=share_power, shared=0.0)
    first, second = (layer_groups_positions(cache.layers[0], head) for head in (0, 1))
    if share_power == 0.0:
        assert first == second
    else:
        assert len(first) > len(second) and set(second) <= set(first)


def test_rank_consensus_ignores_differences_below_bfloat16_precision():
    """Two recordings of the same context that differ only below bfloat16's precision (a float32
    and a bfloat16 recording's near-ties) agree on every token's rank; exact ranks would not."""
    from uncomp_cli.contexts.compress import _agreed_tokens

    generator = torch.Generator().manual_seed(0)
    base = torch.full((6, 64), 2.0 ** -9, dtype=torch.float64)  # many low scores, tied in bfloat16
    base[:, 10:14] = 0.5
    noisy = [base + torch.rand(base.shape, generator=generator, dtype=torch.float64) * 1e-9 for _ in range(2)]
    first, second = (_agreed_tokens([scores], 0, "rank") for scores in noisy)
    assert torch.equal(first, second)
    assert first[10:14].min() > first[14:].max()  # the tokens every head scores high still come first
    exact = [scores.argsort(dim=-1).argsort(dim=-1).double().mean(dim=0) for scores in noisy]
    assert not torch.equal(*exact)  # the test would catch ranks taken at full precision


@pytest.mark.parametrize("consensus", ["votes", "rank"])
def test_global_allocation_shares_the_tokens_heads_agree_on_with_every_head(loaded, consensus):
    """shared=0.5: the tokens that many heads score highest are kept by every head, even by heads
    that score them low, and the method's total stays."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    generator = torch.Generator().manual_seed(0)
    recorded = [torch.rand((1, heads, n), generator=generator) * 1e-3 for _ in range(layers)]
    agreed = list(range(40, 50))
    for scores in recorded:  # every head scores them highest...
        scores[0, :, agreed] = 0.5
    recorded[-1][0, 0, agreed] = 0.0  # ...but one, which looks elsewhere
    recorded[-1][0, 0, 60:65] = 0.9
    allocate_globally(cache.layers, recorded, shared=0.0)
    assert not set(agreed) & set(layer_groups_positions(cache.layers[-1], 0))
    cache, n = _whole_context(loaded)
    allocate_globally(cache.layers, recorded, shared=0.5, consensus=consensus)
    kept = {(index, head): layer_groups_positions(layer, head) for index, layer in enumerate(cache.layers)
            for head in range(heads)}
    assert all(set(agreed) <= set(positions) for positions in kept.values())
    total = sum(len(positions) for positions in kept.values())
    assert abs(total - layers * heads * 24) <= layers * heads


def test_word_ids_hold_a_numbers_digits_and_a_words_pieces_together():
    """Every token of " 7007071" (and of a word the tiny tokenizer cuts into pieces) has one word
    number; a leading space or punctuation starts the next word."""
    from uncomp_cli.contexts.words import word_ids

    tokenizer = tiny_tokenizer()
    text = "The zebra code is 7007071. Paris"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == text
    words = word_ids(tokenizer, ids).tolist()
    starts = [sum(map(len, pieces[:index])) for index in range(len(pieces))]

    def word_of(start: int, end: int) -> set[int]:  # the word numbers of the tokens inside text[start:end]
        return {w for w, s, piece in zip(words, starts, pieces) if s < end and s + len(piece) > start}

    number = text.index("7007071")
    assert len(word_of(number, number + 7)) == 1
    zebra = text.index("zebra")
    assert len([p for p, s in zip(pieces, starts) if zebra <= s < zebra + 5]) > 1  # cut into pieces...
    assert len(word_of(zebra, zebra + 5)) == 1  # ...one word
    period, paris = text.index("."), text.index("Paris")
    assert len(word_of(number, number + 7) | word_of(period, period + 1) | word_of(paris, paris + 5)) == 3
    assert words == sorted(words)


def test_a_word_never_holds_more_than_max_word_tokens():
    """Text without spaces (here one long run of letters and digits, cut into many tokens) is cut
    into words of at most MAX_WORD_TOKENS, not made one word."""
    from uncomp_cli.contexts.words import MAX_WORD_TOKENS, word_ids

    tokenizer = tiny_tokenizer()
    ids = tokenizer("xq" * 40 + "7" * 30, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * MAX_WORD_TOKENS
    sizes = torch.bincount(word_ids(tokenizer, ids))
    assert int(sizes.max()) == MAX_WORD_TOKENS
    assert int((sizes > 0).sum()) == -(-len(ids) // MAX_WORD_TOKENS)


def test_pooling_over_words_gives_each_token_its_words_best_score():
    from uncomp_cli.contexts.words import pool_over_words

    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.05], [0.4, 0.0, 0.0, 0.7, 0.6]])
    pooled = pool_over_words(scores, torch.tensor([1, 1, 1, 2, 3]))
    assert torch.equal(pooled, torch.tensor([[0.9, 0.9, 0.9, 0.3, 0.05], [0.4, 0.4, 0.4, 0.7, 0.6]]))


@pytest.mark.parametrize("whole_words", [False, True])
def test_global_allocation_keeps_a_word_whole_when_it_keeps_any_of_it(loaded, whole_words):
    """One token of a five-token word scores high in one head: with words, the head keeps the whole
    word; without, that token alone. The method's total stays."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    generator = torch.Generator().manual_seed(1)
    recorded = [torch.rand((1, heads, n), generator=generator) * 1e-3 for _ in range(layers)]
    recorded[2][0, 1, 42] = 0.9
    words = torch.arange(n)
    words[40:45] = 40  # tokens 40..44: one word
    allocate_globally(cache.layers, recorded, shared=0.0, words=words if whole_words else None)
    kept = set(layer_groups_positions(cache.layers[2], 1))
    assert 42 in kept
    assert ({40, 41, 43, 44} <= kept) == whole_words
    total = sum(len(layer_groups_positions(layer, head)) for layer in cache.layers for head in range(heads))
    assert abs(total - layers * heads * 24) <= layers * heads


@pytest.mark.parametrize("shared_words", [False, True])
def test_shared_tokens_can_be_extended_to_whole_words(loaded, shared_words):
    """Every head but one scores a five-token word highest, and the shared budget (three tokens)
    cuts inside it: the head that looks elsewhere keeps three of its tokens, or with shared_words
    all five."""
    from uncomp_cli.contexts.compress import allocate_globally

    cache, n = _whole_context(loaded)
    layers, heads = len(cache.layers), loaded.model.config.num_key_value_heads
    generator = torch.Generator().manual_seed(2)
    recorded = [torch.rand((1, heads, n), generator=generator) * 1e-3 for _ in range(layers)]
    word = list(range(36, 41))
    for scores in recorded:
        scores[0, :, 38] = 0.5
    recorded[-1][0, 0, word] = 0.0  # the one head that looks elsewhere
    recorded[-1][0, 0, 60:80] = 0.9
    words = torch.arange(n)
    words[word] = 36
    allocate_globally(cache.layers, recorded, shared=3 / 24, words=words, shared_words=shared_words)
    kept = set(layer_groups_positions(cache.layers[-1], 0)) & set(word)
    assert len(kept) == (5 if shared_words else 3)


def layer_groups_positions(layer, head: int) -> list[int]:
    group = next(g for g in layer.groups if head in g.heads)
    return group.positions[0, group.heads.index(head)].tolist()


def _held(context) -> list[tuple]:
    """Every group's stored keys, values and positions, layer by layer."""
    return [(g.heads, g.keys, g.values, g.positions) for layer in context.cache.layers for g in layer.groups]


PRUNED = {"prune_contexts": True}


@pytest.mark.parametrize("method,budget,options", [
    ("snapkv", "24", {}), ("pyramidkv", "16", {}), ("adakv", "20", {}), ("uncomp-noprune", "24", {}),
    ("uncomp", "24", {}), ("uncomp", "24", PRUNED), ("uncomp", "40", PRUNED)])
def test_a_shared_reading_compresses_exactly_as_reading_again(loaded, method, budget, options):
    """One re-reading serves every policy whose prefill leaves the same cache, at any budget; the
    result is what a fresh prefill and re-reading keep, and the reading's cost is still counted."""
    from uncomp_cli.contexts.compress import compress_ids, reading_store

    ids, tail = context_prompt(loaded.tokenizer, CONTEXT)
    profile = make_profile(loaded.model.config)  # several stages: uncomp prunes its prefill

    def policy(name: str, size: str, **extra):
        made = make_policy(name, budget=size, **SMALL, **extra)
        return replace(made, profile=profile) if made.needs_profile else made

    readings = reading_store(1 << 30)
    compress_ids(loaded, ids, policy("snapkv", "12"), "reconstruct", tail, readings)
    compress_ids(loaded, ids, policy("uncomp", "12", **PRUNED), "reconstruct", tail, readings)  # pruned: its own
    assert len(readings) == 2 and readings.hits == 0
    shared = compress_ids(loaded, ids, policy(method, budget, **options), "reconstruct", tail, readings)
    assert readings.hits == 1
    kind = policy(method, budget, **options).for_context().reading_key(loaded.model,
                                                                        torch.ones(1, len(ids), dtype=torch.long))
    assert shared.prefill_seconds >= readings.get((tuple(ids), tail, kind, "reconstruct")).seconds
    fresh = compress_ids(loaded, ids, policy(method, budget, **options), "reconstruct", tail)
    for (heads, *tensors), (fresh_heads, *fresh_tensors) in zip(_held(shared), _held(fresh), strict=True):
        assert heads == fresh_heads and all(torch.equal(a, b) for a, b in zip(tensors, fresh_tensors))
    assert shared.stats == fresh.stats
    assert [layer.get_seq_length() for layer in shared.cache.layers] == [len(ids)] * len(shared.cache.layers)
    if options == PRUNED:  # the pruned layers ran on fewer tokens, in the shared reading too
        assert min(shared.cache.prefill_tokens_per_layer()) < len(ids)
    assert ask(loaded, shared, QUESTIONS[0], SETTINGS).token_ids == ask(loaded, fresh, QUESTIONS[0], SETTINGS).token_ids


@pytest.mark.parametrize("scorer", ["reconstruct", "window"])
def test_a_context_is_compressed_without_pruning_unless_asked(loaded, scorer):
    """Without its question a context's end would decide the pruning: uncomp keeps its entropy head
    budgets and prunes nothing, exactly as uncomp-noprune, unless prune_contexts asks for it."""
    profile = make_profile(loaded.model.config)  # several stages: uncomp prunes a prompt's prefill

    def compress(name: str, **extra) -> CompressedContext:
        policy = replace(make_policy(name, budget="24", **SMALL, **extra), profile=profile)
        return compress_context(loaded, CONTEXT, policy, scorer=scorer)

    default, noprune, pruned = compress("uncomp"), compress("uncomp-noprune"), compress("uncomp", **PRUNED)
    length = default.context_tokens
    assert default.cache.prefill_tokens_per_layer() == [length] * len(default.cache.layers)
    assert min(pruned.cache.prefill_tokens_per_layer()) < length
    for (heads, *tensors), (other_heads, *others) in zip(_held(default), _held(noprune), strict=True):
        assert heads == other_heads and all(torch.equal(a, b) for a, b in zip(tensors, others))
    assert default.policy.describe()["prefill_compression"] is False and default.policy.name == "uncomp"


@pytest.mark.parametrize("name, method, options, scorer", [
    ("snapkv-v1", "snapkv", {}, "reconstruct"),
    ("adakv-evict-v1", "adakv", {"decode_evict": True}, "window"),
])
def test_a_context_file_of_the_previous_version_loads_and_answers_as_one_made_now(loaded, name, method, options,
                                                                                  scorer, monkeypatch):
    """tests/data holds files written by uncomp before the engine was built from plans (format 1),
    and before every head shared tokens and kept whole words (so the new one is made without them)."""
    from tiny import REPO_ROOT

    from uncomp_cli.contexts import compress

    monkeypatch.setattr(compress, "SHARED_TOKENS", 0.0)
    monkeypatch.setattr(compress, "WHOLE_WORDS", False)
    old = load_context(loaded, REPO_ROOT / "tests" / "data" / f"{name}.uncomp")
    new = compress_context(loaded, CONTEXT, make_policy(method, budget="24", **SMALL, **options), scorer=scorer)
    assert old.kv_cache_bytes() == new.kv_cache_bytes()
    for question in QUESTIONS[:2]:
        assert ask(loaded, old, question, SETTINGS).token_ids == ask(loaded, new, question, SETTINGS).token_ids


# -- re-reading in chunks (contexts/reread.py) and recording in one pass (engine/recording.py) -----

SMALL_CHUNK = 64  # the test context is ~500 tokens: several chunks


@pytest.fixture
def small_chunks(monkeypatch):
    from uncomp_cli.contexts import reread

    monkeypatch.setattr(reread, "REREAD_CHUNK", SMALL_CHUNK)
    return reread


def test_each_chunk_sees_the_context_and_itself_and_a_peak_one_chunk_records_is_kept(loaded, small_chunks,
                                                                                     monkeypatch):
    """A chunk is fed on the context alone (the chunks before it are gone), and the scores are the
    most any chunk recorded: a peak only the second chunk sees, in one head of one layer, survives."""
    from uncomp_cli.engine.cache import GroupedKVLayer

    ids, tail = context_prompt(loaded.tokenizer, CONTEXT)
    n, layers = len(ids), loaded.model.config.num_hidden_layers
    chunks = small_chunks.reread_chunks(loaded.tokenizer, ids, tail, SMALL_CHUNK)
    assert len(chunks) == -(-n // SMALL_CHUNK) >= 3
    assert sum(len(c) for c in chunks) > n and chunks[-1][-SMALL_CHUNK // 2:] == ids[-SMALL_CHUNK // 2:]
    fed, calls = [], []
    real_feed, real_start = small_chunks.feed, GroupedKVLayer.start_recording
    peak = list(range(100, 130))

    def spy_feed(model, cache, input_ids, mask, positions, chunk=None):
        fed.append((input_ids.shape[1], mask.shape[1], cache.layers[0].get_seq_length()))
        return real_feed(model, cache, input_ids, mask, positions, chunk)

    def start_with_peak(layer):
        real_start(layer)
        chunk, index = divmod(len(calls), layers)
        calls.append(index)
        if chunk == 1 and index == 1:
            layer.recorded[0, 0, peak] = 0.9  # what the second chunk "paid" these tokens, nothing else did

    monkeypatch.setattr(small_chunks, "feed", spy_feed)
    monkeypatch.setattr(GroupedKVLayer, "start_recording", start_with_peak)
    context = compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL))
    assert [(q, width, held) for q, width, held in fed] == [(len(c), n + len(c), n) for c in chunks]
    assert len(calls) == len(chunks) * layers
    assert all(layer.get_seq_length() == n for layer in context.cache.layers)
    assert set(peak) <= set(layer_groups_positions(context.cache.layers[1], 0))
    assert not set(peak) <= set(layer_groups_positions(context.cache.layers[1], 1))


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_a_budget_that_holds_the_context_answers_as_the_full_cache_when_read_in_chunks(loaded, small_chunks, method):
    full = ask(loaded, compress_context(loaded, CONTEXT), QUESTIONS[1], SETTINGS)
    kept = ask(loaded, compress_context(loaded, CONTEXT, make_policy(method, budget="10000", **SMALL)), QUESTIONS[1],
               SETTINGS)
    assert kept.token_ids == full.token_ids


def test_recording_in_one_pass_is_the_attention_and_the_float32_recording():
    """The fused path gives the layer's attention and the same maxima as SDPA + window_attention."""
    from uncomp_cli.engine.groups import HeadGroup
    from uncomp_cli.engine.recording import attend_and_record

    torch.manual_seed(0)
    held, new, heads, rep, dim = 50, 7, 2, 3, 16
    group = HeadGroup([0, 1], None)
    total = held + new
    group.store(torch.randn(1, heads, total, dim), torch.randn(1, heads, total, dim),
                torch.ones(1, heads, total, dtype=torch.bool), torch.arange(total).expand(1, heads, total).contiguous())
    query, positions = torch.randn(1, heads * rep, new, dim), torch.arange(held, total)[None]
    reference_out, reference = attend_and_record(query, group, positions, torch.ones(1, new, dtype=torch.bool),
                                                 dim ** -0.5, held)  # the two-pass path, in float32
    out, seen = attend_and_record(query, group, positions, None, dim ** -0.5, held, dtype=torch.float32)
    assert seen.shape == (1, heads, held) and seen.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen, reference, atol=1e-6, rtol=1e-5)
    out, seen = attend_and_record(query, group, positions, None, dim ** -0.5, held, dtype=torch.bfloat16)
    assert out.dtype == seen.dtype == torch.float32
    torch.testing.assert_close(out, reference_out, atol=0.05, rtol=0.05)
    torch.testing.assert_close(seen, reference, atol=0.02, rtol=0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recording_in_bfloat16_keeps_what_float32_keeps(tiny_model_dir, monkeypatch, dtype):
    """The fused recording in bfloat16 (on CPUs with bfloat16 instructions, or a bfloat16 model)
    keeps nearly the tokens a float32 recording keeps, and the answers are the same."""
    import uncomp_cli.engine.cache as cache_module
    from uncomp_cli.engine.recording import attend_and_record

    model = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    policy = make_policy("snapkv", budget="24", **SMALL)

    def recording_in(record_dtype):
        def record(*args, **kwargs):
            return attend_and_record(*args, **kwargs, dtype=record_dtype)
        return record

    monkeypatch.setattr(cache_module, "attend_and_record", recording_in(torch.bfloat16))
    fused = compress_context(model, CONTEXT, policy)
    monkeypatch.setattr(cache_module, "attend_and_record", recording_in(torch.float32))
    reference = compress_context(model, CONTEXT, policy)
    pairs = [(set(layer_groups_positions(a, h)), set(layer_groups_positions(b, h)))
             for a, b in zip(fused.cache.layers, reference.cache.layers) for h in range(len(a.budgets))]
    overlap = sum(len(x & y) for x, y in pairs) / sum(len(y) for _, y in pairs)
    assert overlap >= 0.9
    for question in QUESTIONS[:2]:
        assert ask(model, fused, question, SETTINGS).token_ids == ask(model, reference, question, SETTINGS).token_ids
