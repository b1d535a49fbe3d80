"""Hidden-state pruning during prefill (UNComp §3): later layers run on fewer prompt tokens.

Before decoder layer ``l`` whose keep fraction drops below layer ``l − 1``'s, the tokens that the
last ``window`` queries of layer ``l − 1`` attended to most are carried on: the KV selection's
observation window, softmax probabilities summed over those rows and all heads, then pooled with
the selection's kernel and pooling (:func:`~uncomp_cli.engine.selection.prune_scores`, computed by
that layer's attention function anyway). The official code sums the last 8 rows without pooling;
on SmolLM2-135M that drops a needle's digits piecemeal (docs/methods.md). The last
:data:`~uncomp_cli.engine.selection.PRUNE_WINDOW` (8) tokens are always carried. Hidden states, the *original* position
ids and RoPE (cos, sin), and the padding mask are gathered alike, so RoPE stays right and a
layer's cache only ever holds tokens that reached it. The kept indices stay sorted, so the last
position is still the last prompt token and the first generated token comes out of it.

In a left-padded batch every row keeps ``ceil(f · its own length)`` tokens; rows that keep fewer
than the widest are filled with slots marked invalid (never attended, placed first), so each row
is pruned exactly as it would be alone.

Only the prefill (the first forward into an empty cache) is pruned; decoding is untouched.
Implemented with forward pre-hooks on the decoder layers (they receive ``position_embeddings``,
``position_ids`` and ``attention_mask`` as keyword arguments), removed on exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uncomp_cli.engine.attention import decoder_layers
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.selection import select_rows
from uncomp_cli.errors import UncompError


def validate_layer_keep(layer_keep: Sequence[float], num_layers: int) -> list[float]:
    """Check a per-layer keep schedule: one fraction per layer in (0, 1], 1 for layer 0, never rising."""
    keep = [float(f) for f in layer_keep]
    if len(keep) != num_layers:
        raise UncompError(f"layer_keep has {len(keep)} fractions but the model has {num_layers} layers")
    if any(not 0 < f <= 1 for f in keep):
        raise UncompError(f"layer_keep fractions must be in (0, 1], got {keep}")
    if keep[0] != 1.0:
        raise UncompError(f"layer 0 is never pruned: layer_keep[0] must be 1.0, got {keep[0]}")
    if any(b > a for a, b in zip(keep, keep[1:], strict=False)):
        raise UncompError(f"layer_keep must not rise from one layer to the next (dropped tokens are gone): "
                          f"{keep}")
    return keep


def validate_layer_tokens(layer_tokens: Sequence[int], num_layers: int) -> list[int]:
    """Check an absolute schedule: tokens each layer runs on at most, at least 1, never rising."""
    tokens = [int(t) for t in layer_tokens]
    if len(tokens) != num_layers:
        raise UncompError(f"layer_tokens has {len(tokens)} counts but the model has {num_layers} layers")
    if any(t < 1 for t in tokens) or any(b > a for a, b in zip(tokens, tokens[1:])):
        raise UncompError(f"layer_tokens must be at least 1 and never rise from one layer to the next: {tokens}")
    return tokens


def parse_keep_fractions(text: str | Sequence[float]) -> list[float]:
    """``"0.75,0.5,0.35"`` (or a list) -> fractions in (0, 1], never rising; one clear error otherwise."""
    try:
        fractions = [float(f) for f in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise UncompError(f"--prefill-keep takes fractions such as 0.75,0.5,0.35, got {text!r}") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UncompError(f"--prefill-keep fractions must be in (0, 1], got {text!r}")
    if any(b > a for a, b in zip(fractions, fractions[1:])):
        raise UncompError(f"--prefill-keep fractions must not rise (dropped tokens are gone), got {text!r}")
    return fractions


def spans_keep(num_layers: int, first_pruned: int, fractions: Sequence[float]) -> list[float]:
    """A per-layer schedule: layers before ``first_pruned`` keep everything; the rest are cut into
    ``len(fractions)`` spans of (almost) equal depth keeping those fractions, later spans one layer
    longer when the depth does not divide evenly.

    Several small cuts keep the needle where one large cut loses it: on SmolLM2-135M at 4k tokens,
    keeping 50 % from layer 8 on lost 1 of 5 needles, 75/50/35 % in three spans lost none
    (docs/results.md).
    """
    fractions = parse_keep_fractions(fractions)
    pruned = num_layers - first_pruned
    if pruned < len(fractions):
        raise UncompError(f"--prefill-keep has {len(fractions)} spans but only {pruned} layers can be pruned")
    base, extra = divmod(pruned, len(fractions))
    keep = [1.0] * first_pruned
    for i, fraction in enumerate(fractions):
        keep += [float(fraction)] * (base + (1 if i >= len(fractions) - extra else 0))
    return keep


@dataclass
class _PrefillState:
    index: torch.Tensor  # [B, n] original positions of the tokens carried (real ones ascending, at the end)
    valid: torch.Tensor  # [B, n] bool: a real token of that row (not padding, not pruned)
    lengths: torch.Tensor  # [B] prompt tokens per row
    prompt_len: int  # N, padded
    pruned: bool = False  # from the first pruning point on, every layer's arguments are gathered
    evidence: torch.Tensor | None = None  # pruning scores summed over the layers since the last point


class HiddenStatePruner:
    """Context manager: prune hidden states between decoder layers at prefill, as the cache's plan
    says (:class:`~uncomp_cli.engine.plan.PruneSchedule`; its scoring layers keep their scores).

    ``layer_keep[l]``: share of each row's prompt tokens that layer ``l`` runs on (rows keep
    ``ceil(f · own length)`` tokens), or ``layer_tokens[l]``: at most that many (the official
    schedule; a shorter row keeps all it has). At least the window is kept, and a left-padded
    batch prunes each row as if alone. After each prefill, the cache's layers know the tokens they ran on
    (:meth:`~uncomp_cli.engine.cache.GroupedKVCache.prefill_tokens_per_layer`) and
    :attr:`kept_positions` maps each pruning layer to the original positions it received ([B, n]).
    """

    def __init__(self, model: torch.nn.Module, cache: GroupedKVCache):
        self.layers = decoder_layers(model)
        schedule = cache.plan.prune
        if schedule is None:
            raise UncompError("the cache's plan has no pruning schedule")
        self.keep = None if schedule.layer_keep is None else validate_layer_keep(schedule.layer_keep,
                                                                                 len(self.layers))
        self.tokens = None if schedule.layer_tokens is None else validate_layer_tokens(schedule.layer_tokens,
                                                                                       len(self.layers))
        if len(cache.layers) != len(self.layers):
            raise UncompError(f"the cache has {len(cache.layers)} layers, the model {len(self.layers)}")
        self.cache = cache
        self.window = schedule.window
        self.points = schedule.points()
        self.kept_positions: dict[int, torch.Tensor] = {}
        self._state: _PrefillState | None = None
        self._handles: list = []

    def __enter__(self) -> HiddenStatePruner:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.cache.layers:
            layer.take_prune_scores()
        self._state = None

    def _hook(self, index: int):
        def before_layer(module, args, kwargs):
            return self._before_layer(index, args, kwargs)
        return before_layer

    def _before_layer(self, index: int, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            self._start(hidden, kwargs.get("attention_mask"))
            return None
        state = self._state
        if state is None:
            return None
        self._gather_evidence(index, state)
        if index in self.points:
            hidden = self._prune(index, hidden, state)
        self.cache.layers[index].record_skipped(state.prompt_len - state.index.shape[1])
        if not state.pruned:
            return None
        # Each layer's own arguments: Gemma 3 gives sliding and full layers different RoPE.
        kwargs = {**kwargs, **self._gathered_kwargs(kwargs, state)}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _start(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        """At layer 0: a prefill if the cache is empty, else a decode step (left alone)."""
        self._state = None
        if self.cache.layers[0].get_seq_length() != 0:
            return
        batch, n = hidden.shape[:2]
        valid = torch.ones(batch, n, dtype=torch.bool, device=hidden.device) if mask is None \
            else mask[:, -n:].to(torch.bool)
        index = torch.arange(n, device=hidden.device).expand(batch, n)
        self._state = _PrefillState(index=index, valid=valid, lengths=valid.sum(-1), prompt_len=n)
        self.kept_positions.clear()

    def _gather_evidence(self, index: int, state: _PrefillState) -> None:
        """Add the scores layer ``index - 1`` left (every layer keeps the same tokens between points)."""
        scores = self.cache.layers[index - 1].take_prune_scores()
        if scores is not None:
            state.evidence = scores if state.evidence is None else state.evidence + scores

    def _prune(self, index: int, hidden: torch.Tensor, state: _PrefillState) -> torch.Tensor:
        """Carry the best-attended tokens of layer ``index - 1`` (with ``layers="span"``: of every
        layer since the last point, scores summed) into layer ``index``."""
        scores, state.evidence = state.evidence, None
        if scores is None:
            raise UncompError(f"layer {index - 1} left no pruning scores; is attention 'uncomp' active?")
        scores = scores.masked_fill(~state.valid, float("-inf"))
        if self.tokens is not None:  # an absolute count: a row shorter than it keeps all it has
            wanted = state.lengths.clamp(max=self.tokens[index])
        else:
            wanted = torch.ceil(state.lengths.to(torch.float64) * self.keep[index]).long()
        wanted = torch.maximum(wanted, state.lengths.clamp(max=self.window))
        wanted = torch.minimum(wanted, state.valid.sum(-1))
        picked, kept = select_rows(scores, wanted, self.window)  # [B, n] relative to the current tokens
        hidden = hidden.gather(1, picked[..., None].expand(-1, -1, hidden.shape[-1]))
        state.index = state.index.gather(1, picked)
        state.valid = state.valid.gather(1, picked) & kept
        self.kept_positions[index] = state.index
        state.pruned = True
        return hidden

    @staticmethod
    def _gathered_kwargs(kwargs: dict, state: _PrefillState) -> dict:
        """Original positions and RoPE of the carried tokens, and their validity as the mask."""
        batch, n = state.index.shape
        out: dict = {"attention_mask": state.valid}
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            out["position_ids"] = position_ids.expand(batch, -1).gather(1, state.index)
        embeddings = kwargs.get("position_embeddings")
        if embeddings is not None:
            out["position_embeddings"] = tuple(
                t.expand(batch, -1, -1).gather(1, state.index[..., None].expand(-1, -1, t.shape[-1]))
                for t in embeddings
            )
        return out
