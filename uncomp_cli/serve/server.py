"""A request checked and turned into a job: the model it names, the cache method it asks for, its
tokens, its limits, and the KV bytes it will hold (what admission counts).

Everything here runs on the HTTP side, before the worker sees the request, so bad input is a 400
that never reaches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple

from uncomp_cli.engine.generation import GenerationSettings, full_kv_cache_bytes
from uncomp_cli.errors import UncompError
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.models.prompting import context_length
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.options import CATALOGUE
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.serve.prompts import chat_prompt, template_carries_name, text_prompt
from uncomp_cli.serve.protocol import ApiError, ChatRequest, CompletionRequest, request_logprobs
from uncomp_cli.serve.worker import DEFAULT_PREFILL_CHUNK, Job

#: ``--max-body auto``: this many bytes per token of the model's context, and at least
#: :data:`MIN_MAX_BODY`. Text in a JSON body takes 1-4.5 bytes per token (English, code, CJK and emoji
#: measured on the embedded model's tokenizer, escaped or not), so a body of a whole context fits
#: with room for the JSON around it; a body many times larger is no prompt the model could take.
BODY_BYTES_PER_TOKEN = 32
MIN_MAX_BODY = 1 << 20


def default_max_body(context_tokens: int) -> int:
    """The largest request body taken by default: 32 bytes per token of context, at least 1 MiB."""
    return max(MIN_MAX_BODY, BODY_BYTES_PER_TOKEN * context_tokens)


def kv_cache_limit_bytes(text: str, device) -> int:
    """``--kv-cache-limit``: a size, or ``auto``: half the memory available now (free GPU memory, or
    the machine's available RAM)."""
    from uncomp_cli.memory import available_memory_bytes
    from uncomp_cli.units import parse_memory

    return available_memory_bytes(device) // 2 if text == "auto" else parse_memory(text)


@dataclass
class ServeSettings:
    """How a server runs; the method and its options are the defaults a request may override."""

    method: str = "uncomp"
    method_options: dict = field(default_factory=dict)
    max_batch: int = 8
    max_queue: int = 64
    kv_cache_limit: int = 1 << 30  # bytes the running batch's caches may hold
    default_max_tokens: int = 512
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per step between decode steps
    reuse_min_tokens: int = 1024  # 0: no document reuse
    context_cache_bytes: int = 1 << 30  # documents kept at full precision
    served_model_name: str | None = None
    max_body: int | None = None  # bytes of a request body; None: default_max_body of the model's context
    shutdown_timeout: float = 30.0  # seconds running requests get to finish once the server stops
    context_dir: str | None = None  # a folder of documents' prefixes shared by replicas (context_dir.py)
    context_dir_bytes: int = 16 << 30  # what its files may hold in all

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise UncompError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reuse_min_tokens < 0:
            raise UncompError(f"--reuse-min-tokens must be 0 (off) or more, got {self.reuse_min_tokens}")
        if self.max_body is not None and self.max_body < 1:
            raise UncompError(f"--max-body must be at least 1 byte, got {self.max_body}")
        if self.prefill_chunk < 1:
            raise UncompError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.context_dir_bytes < 1:
            raise UncompError(f"--context-dir-limit must be at least 1 byte, got {self.context_dir_bytes}")
        if self.context_dir is not None and self.reuse_min_tokens == 0:
            raise UncompError("--context-dir keeps documents for reuse; it needs --reuse-min-tokens above 0")
        if self.shutdown_timeout < 0:
            raise UncompError(f"--shutdown-timeout must be 0 or more, got {self.shutdown_timeout}")


class SamplingDefaults(NamedTuple):
    """What a request that leaves out ``temperature`` / ``top_p`` gets, and where that comes from."""

    temperature: float
    top_p: float
    source: str


def sampling_defaults(loaded: LoadedModel) -> SamplingDefaults:
    """The sampling a request gets when it leaves ``temperature`` or ``top_p`` out.

    From the model's ``generation_config`` where it speaks of sampling, as vLLM's
    ``--generation-config auto``: ``do_sample: false`` is greedy; its ``temperature`` and ``top_p``
    otherwise (1.0 for the one it leaves out). A model whose config says nothing of sampling (the
    embedded model, any GGUF) gets greedy decoding, as ``transformers``' ``generate`` and
    ``uncomp generate`` give it, not OpenAI's 1.0: a model that ships no sampling settings was not
    tuned to answer at temperature 1, and small ones answer nonsense there.
    """
    config = getattr(loaded.model, "generation_config", None)
    given = config.to_diff_dict() if config is not None else {}  # what the config sets, not the defaults
    temperature, top_p = given.get("temperature"), given.get("top_p")
    if given.get("do_sample") is False:
        return SamplingDefaults(0.0, 1.0, "generation_config: do_sample is false (greedy)")
    if given.get("do_sample") is None and temperature is None and top_p is None:
        return SamplingDefaults(0.0, 1.0, "greedy: the model's generation_config sets no sampling")
    return SamplingDefaults(1.0 if temperature is None else float(temperature), 1.0 if top_p is None else float(top_p),
                            "generation_config")


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
        self.max_body = settings.max_body or default_max_body(self.context_limit)
        self.sampling = sampling_defaults(loaded)
        self.names = template_carries_name(loaded.tokenizer)

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
        logprobs = request_logprobs(request)
        if isinstance(request, ChatRequest) and not self.names:
            named = next((i for i, m in enumerate(request.messages) if m.name is not None), None)
            if named is not None:
                raise ApiError(f"messages.{named}.name: this model's chat template does not carry a message's "
                               "name; put it in the content", param="messages")
        asked = self.policy_for(request.uncomp)
        tokenizer = self.loaded.tokenizer
        reuse = self.settings.reuse_min_tokens
        try:
            if isinstance(request, ChatRequest):
                prompt = chat_prompt(tokenizer, request.chat(names=self.names), reuse)
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
            # A share of its own prompt, as a token count (a document's later turns too: reuse
            # only skips the document's prefill, the selection is the request's own).
            policy = own_budget(asked, len(prompt.ids), self.context_limit)
            kept = self.kept_tokens(policy, len(prompt.ids))
        except UncompError as exc:
            raise ApiError(str(exc).replace("--", "uncomp."), param="uncomp", code="invalid_uncomp_settings") from None
        key = json.dumps(policy.describe(), sort_keys=True, default=str)
        kv_bytes = self.token_bytes * policy.held_tokens(kept + max_tokens)
        if kv_bytes > self.settings.kv_cache_limit:
            raise ApiError(f"this request's KV cache would hold {kv_bytes} bytes, more than the server's "
                           f"--kv-cache-limit of {self.settings.kv_cache_limit}; ask for a smaller budget, "
                           "a shorter prompt or fewer max_tokens", code="kv_cache_limit_exceeded")
        temperature = self.sampling.temperature if request.temperature is None else request.temperature
        top_p = self.sampling.top_p if request.top_p is None else request.top_p
        sampling = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                      seed=request.seed)
        served = asked.describe() | {"kv_budget_tokens": kept, "temperature": temperature, "top_p": top_p}
        return Job(prompt=prompt, sampling=sampling, stops=request.stops(), policy=policy,
                   policy_key=key, kv_tokens=kept, served=served, logprobs=logprobs,
                   ignore_eos=bool(request.ignore_eos))
