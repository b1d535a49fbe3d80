"""Every method option, once: its name, type, default and help (no torch, so ``--help`` stays fast).

A policy declares the options it takes as dataclass fields made by :meth:`MethodOption.field`;
the registry refuses an option its method does not take, and the CLI derives its method flags from
:data:`CATALOGUE` (``--window`` is the kebab-case of ``window``), so generate, eval and bench expose
the same set with the same help. A new option is one row of :data:`CATALOGUE` and one field on the
policies that take it (:func:`option_field`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from uncomp_cli.defaults import (
    DEFAULT_ADAKV_FLOOR,
    DEFAULT_AGGREGATE,
    DEFAULT_BUDGET,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_PREFILL_MAX_LEN,
    DEFAULT_PYRAMID_BETA,
    DEFAULT_SINKS,
    DEFAULT_WINDOW,
)


@dataclass(frozen=True)
class MethodOption:
    """One hyperparameter a cache method may take. ``type`` is what the command line parses."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        """The command-line flag: ``--prefill-keep`` for ``prefill_keep``."""
        return "--" + self.name.replace("_", "-")

    def field(self, default: Any = dataclasses.MISSING, init: bool = True) -> Any:
        """A dataclass field for this option (``default`` overrides the catalogue's for one method)."""
        value = self.default if default is dataclasses.MISSING else default
        return dataclasses.field(default=value, init=init, metadata={"option": self})


#: Every option of every method, in the order ``--help`` lists them.
CATALOGUE: dict[str, MethodOption] = {option.name: option for option in (
    MethodOption(
        "budget", str, DEFAULT_BUDGET,
        "Average KV entries kept per KV head: a share of the prompt (5%) or tokens (128). A share that falls "
        "below what the method must keep (its observation window) on a short prompt keeps the whole prompt."),
    MethodOption(
        "window", int, DEFAULT_WINDOW,
        "Observation window: the last prompt tokens whose attention scores the others (always kept)."),
    MethodOption("kernel", int, DEFAULT_KERNEL, "Pooling kernel over neighbouring positions (odd)."),
    MethodOption("pooling", str, DEFAULT_POOLING, "Pooling of the scores: max or avg."),
    MethodOption(
        "aggregate", str, DEFAULT_AGGREGATE, "How query heads sharing a KV head combine scores: mean or max."),
    MethodOption(
        "decode_evict", bool, False,
        "Keep each head group at its budget while decoding (evict one entry per new token) instead of appending."),
    MethodOption(
        "prefill_compression", bool, True,
        "uncomp: later layers see fewer prompt tokens during prefill, per the profile's stages."),
    MethodOption(
        "prefill_keep", str, None,
        "uncomp: instead of the profile's stages, cut the layers after the first quarter into equal spans keeping "
        "these shares of the prompt, e.g. 0.75,0.5,0.35."),
    MethodOption(
        "prefill_schedule", str, "fraction",
        "uncomp: fraction (each stage keeps its share of the prompt) or official (absolute token counts per stage "
        "against --prefill-max-len, as the official code)."),
    MethodOption(
        "prefill_max_len", int, DEFAULT_PREFILL_MAX_LEN,
        "uncomp: the length the official schedule's counts are set against (its first stage keeps this many)."),
    MethodOption(
        "prefill_from", int, None, "uncomp: the first layer that may be pruned (default: a quarter of the layers)."),
    MethodOption(
        "prune_heads", str, "sum",
        "uncomp: how hidden-state pruning ranks prompt tokens: the observation window's attention summed over the "
        "heads (sum) or the most any one head pays (max)."),
    MethodOption(
        "prune_layers", str, "last",
        "uncomp: which layers' attention decides a hidden-state pruning point: the layer before it (last) or every "
        "layer since the previous point, summed (span)."),
    MethodOption(
        "prune_contexts", bool, False,
        "uncomp: prune hidden states also when a context is compressed before its question (--context-file, "
        "compress, --query-agnostic, the server's reused contexts). Off: without the question, the end of the "
        "context decides what the pruned layers run on, and they lose what a question will ask (docs/methods.md)."),
    MethodOption(
        "preset", str, None,
        "uncomp: official = the official code's configuration (window 8, kernel 7, max pooling, decode eviction, "
        "the absolute schedule from layer 2); options given beside it override it."),
    MethodOption("sinks", int, DEFAULT_SINKS, "streamingllm: first tokens every KV head keeps (attention sinks)."),
    MethodOption(
        "beta", float, DEFAULT_PYRAMID_BETA,
        "pyramidkv: the top layer keeps 1/beta of the average beyond the window (1 = flat)."),
    MethodOption(
        "floor", float, DEFAULT_ADAKV_FLOOR,
        "adakv: share of the average budget (beyond the window) every KV head keeps at least."),
)}


def option_field(name: str, default: Any = dataclasses.MISSING, init: bool = True) -> Any:
    """The dataclass field of the catalogue's option ``name`` (``window: int = option_field("window")``);
    ``default`` overrides the catalogue's for one method."""
    return CATALOGUE[name].field(default, init)
