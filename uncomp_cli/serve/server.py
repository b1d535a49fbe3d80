"""A request checked and turned into a job: the model it names, the cache method it asks for, its
tokens, its limits, and the KV bytes it will hold (what admission counts).

Everything here runs on the HTTP side, before the worker sees the request, so bad input is a 400
that never reaches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER
from uncomp_cli.engine.generation import GenerationSettings, full_kv_cache_bytes
from uncomp_cli.errors import UncompError
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.models.prompting import context_length
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.options import CATALOGUE
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.serve.prompts import chat_prompt, text_prompt
from uncomp_cli.serve.protocol import ApiError, ChatRequest, CompletionRequest
from uncomp_cli.serve.worker import Job


@dataclass
class ServeSettings:
    """How a server runs; the method and its options are the defaults a request may override."""

    method: str = "uncomp"
    method_options: dict = field(default_factory=dict)
    max_batch: int = 8
    max_queue: int = 64
    kv_cache_limit: int = 1 << 30  # bytes the running batch's caches may hold
    default_max_tokens: int = 512
    reuse_min_tokens: int = 1024  # 0: no prefix reuse
    context_cache_bytes: int = 1 << 30
    context_scorer: str = DEFAULT_CONTEXT_SCORER
    served_model_name: str | None = None

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise UncompError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reuse_min_tokens < 0:
            raise UncompError(f"--reuse-min-tokens must be 0 (off) or more, got {self.reuse_min_tokens}")


#: A share budget is resolved per request and rounded up to a multiple of this many tokens.
BUDGET_STEP = 8


def own_budget(policy: CachePolicy, prompt_tokens: int, keep_all: int) -> CachePolicy:
    """``policy`` with a share budget (``"5%"``) turned into the token count it gives this prompt.

    A batch takes shares of its longest prompt, so a shorter row would keep more than it would alone;
    as a token count, every row keeps what its own prompt gives, alone or in any batch. Counts are
    rounded up to :data:`BUDGET_STEP` tokens so that requests of similar lengths share a batch; a
    prompt the share keeps whole gets ``keep_all`` (more than any prompt) and no prefill pruning,
    as the share would. Token counts are kept as given.
    """
    if "budget" not in policy.option_names() or policy.parsed_budget.percent is None:
        return policy
    kept = min(-(-policy.kv_budget(prompt_tokens) // BUDGET_STEP) * BUDGET_STEP, prompt_tokens)
    if kept < prompt_tokens:
        return policy.with_budget(kept)
    # Kept whole, as the share would keep it: every token, and (uncomp) no prefill pruning either.
    whole = {"prefill_compression": False} if "prefill_compression" in policy.option_names() else {}
    return policy.with_budget(keep_all, **whole)


def _typed(name: str, value):
    """A method option from JSON, checked against the catalogue's type (the CLI parses the same)."""
    option = CATALOGUE.get(name)
    if option is None:
        return value  # make_policy names what is wrong with it
    kind = option.type
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # strings such as budgets: "10%", 256 and 0.1 are all budgets
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ApiError(f"uncomp.{name} must be a {kind.__name__}, got {json.dumps(value)}", param="uncomp")
    return value


class RequestPlanner:
    """Turns validated requests into :class:`~uncomp_cli.serve.worker.Job` s for one loaded model."""

    def __init__(self, loaded: LoadedModel, settings: ServeSettings):
        self.loaded = loaded
        self.settings = settings
        self.model_name = settings.served_model_name or loaded.name
        self.context_limit = context_length(loaded.model.config)
        self.token_bytes = full_kv_cache_bytes(loaded.model.config, 1, 1, loaded.model.dtype)

    def policy_for(self, asked: dict | None) -> CachePolicy:
        """The policy a request asks for (``uncomp`` body field) over the server's defaults.

        Options given with the server's own method override the server's; another method starts
        from its own defaults."""
        asked = dict(asked or {})
        method = asked.pop("method", self.settings.method)
        if not isinstance(method, str):
            raise ApiError("uncomp.method must be a string", param="uncomp")
        options = dict(self.settings.method_options) if method == self.settings.method else {}
        options |= {name: _typed(name, value) for name, value in asked.items()}
        try:
            policy = make_policy(method, **options)
        except UncompError as exc:
            raise ApiError(str(exc).replace("--", "uncomp."), param="uncomp", code="invalid_uncomp_settings") from None
        except (TypeError, ValueError) as exc:
            raise ApiError(f"uncomp settings: {exc}", param="uncomp", code="invalid_uncomp_settings") from None
        return policy

    @staticmethod
    def kept_tokens(policy: CachePolicy, prompt_tokens: int) -> int:
        """Prompt tokens a row's cache keeps per KV head: its method's budget, or all of them."""
        kept = policy.kv_budget(prompt_tokens)
        return prompt_tokens if kept is None else min(kept, prompt_tokens)

    def plan(self, request: ChatRequest | CompletionRequest, endpoint: str) -> Job:
        if request.model != self.model_name:
            raise ApiError(f"the model '{request.model}' does not exist; this server serves '{self.model_name}'",
                           status=404, param="model", code="model_not_found")
        asked = self.policy_for(request.uncomp)
        tokenizer = self.loaded.tokenizer
        reuse = self.settings.reuse_min_tokens
        try:
            if isinstance(request, ChatRequest):
                prompt = chat_prompt(tokenizer, request.chat(), reuse)
            else:
                prompt = text_prompt(tokenizer, request.prompt, reuse)
        except ValueError as exc:
            raise ApiError(str(exc), param="messages" if endpoint == "chat" else "prompt") from None
        max_tokens = request.limit() or min(self.settings.default_max_tokens, self.context_limit - len(prompt.ids))
        if max_tokens < 1 or len(prompt.ids) + max_tokens > self.context_limit:
            raise ApiError(f"the prompt is {len(prompt.ids)} tokens and {max_tokens} new tokens were asked for, "
                           f"but the model's context is {self.context_limit} tokens",
                           param="messages" if endpoint == "chat" else "prompt", code="context_length_exceeded")
        try:
            if prompt.context_ids is None:  # batched: the share of its own prompt, as a token count
                policy = own_budget(asked, len(prompt.ids), self.context_limit)
                kept = self.kept_tokens(policy, len(prompt.ids))
            else:  # alone: the share of the context, which the next turn's request shares
                policy = asked
                kept = self.kept_tokens(policy, len(prompt.context_ids)) + len(prompt.rest_ids)
        except UncompError as exc:
            raise ApiError(str(exc).replace("--", "uncomp."), param="uncomp", code="invalid_uncomp_settings") from None
        key = json.dumps(policy.describe(), sort_keys=True, default=str)
        kv_bytes = self.token_bytes * policy.held_tokens(kept + max_tokens)
        if kv_bytes > self.settings.kv_cache_limit:
            raise ApiError(f"this request's KV cache would hold {kv_bytes} bytes, more than the server's "
                           f"--kv-cache-limit of {self.settings.kv_cache_limit}; ask for a smaller budget, "
                           "a shorter prompt or fewer max_tokens", code="kv_cache_limit_exceeded")
        sampling = GenerationSettings(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                      seed=request.seed)
        return Job(prompt=prompt, sampling=sampling, stops=request.stops(), policy=policy,
                   policy_key=key, kv_tokens=kept, served=asked.describe() | {"kv_budget_tokens": kept})
