"""How a grouped cache layer's state is kept: a checkpoint (:meth:`LayerState.snapshot`) and a
file (:meth:`LayerState.export` / :meth:`LayerState.restore`, what :mod:`uncomp_cli.contexts.file`
writes). A mixin of :class:`~uncomp_cli.engine.cache.GroupedKVLayer`, apart so the layer's module
stays about attention and selection.
"""

from __future__ import annotations

import copy

import torch

from uncomp_cli.engine.groups import HeadGroup
from uncomp_cli.engine.plan import LayerPlan


class LayerState:
    """What a layer holds, copied or written out; the layer's own fields are read and set here."""

    def snapshot(self) -> LayerState:
        """A copy of this layer's state that shares its tensors (a checkpoint): neither copy ever
        writes a token the other can see (:meth:`~uncomp_cli.engine.groups.HeadGroup.snapshot`)."""
        clone = copy.copy(self)
        clone.groups = [group.snapshot() for group in self.groups]
        return clone

    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The layer's state for a file: JSON-ready counters and group layout, and tensors by name
        (views; :meth:`restore` reads both back)."""
        tensors: dict[str, torch.Tensor] = {}
        groups = []
        for g, group in enumerate(self.groups):
            names = ("valid", "positions") if group.bits is not None else ("keys", "values", "valid", "positions")
            tensors |= {f"groups.{g}.{name}": getattr(group, name) for name in names}
            if group.bits is not None:  # the codes, minima and steps: the file keeps the saving
                tensors |= {f"groups.{g}.{name}": t for name, t in group.quantised_tensors().items()}
            if group.row_budgets is not None:
                tensors[f"groups.{g}.row_budgets"] = group.row_budgets
            groups.append({"heads": group.heads, "budget": group.budget}
                          | ({"bits": group.bits} if group.bits is not None else {}))
        if self._query_window is not None:  # decode_evict's rolling score
            tensors["query_window"], tensors["query_valid"] = self._query_window, self._query_valid
        spec = {"seen": self.seen, "skipped": self.skipped, "prefill_tokens": self.prefill_tokens,
                "budgets": self.budgets, "groups": groups}
        if self.holds_whole_context():  # a document before any selection: what adopt() takes over
            spec |= {"deferred": True, "scaling": self._scaling, "sliding_window": self.sliding_window,
                     "softcap": self.softcap}
            if self._window_queries is not None:
                tensors["window_queries"], tensors["window_valid"] = self._window_queries, self._window_valid
        return spec, tensors

    @classmethod
    def restore(cls, plan: LayerPlan, spec: dict, tensors: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32) -> LayerState:
        """A layer holding what :meth:`export` wrote, decoding by ``plan`` (KeyError or TypeError when
        something is missing, ValueError when 8-bit parts do not fit); ``dtype``: what 8-bit keys
        and values are read back in (the model's)."""
        layer = cls(plan)
        layer.groups = []
        for g, group_spec in enumerate(spec["groups"]):
            group = HeadGroup(list(group_spec["heads"]), group_spec["budget"])
            if group_spec.get("bits") is not None:
                group.restore_quantised(group_spec["bits"], *(
                    {part: tensors[f"groups.{g}.{name}.{part}"] for part in ("codes", "low", "step")}
                    for name in ("keys", "values")), tensors[f"groups.{g}.valid"], tensors[f"groups.{g}.positions"],
                    dtype)
            else:
                group.store(*(tensors[f"groups.{g}.{name}"] for name in ("keys", "values", "valid", "positions")))
            group.row_budgets = tensors.get(f"groups.{g}.row_budgets")
            layer.groups.append(group)
        first = layer.groups[0].keys
        layer.device, layer.dtype, layer.is_initialized = first.device, first.dtype, True
        layer.seen, layer.skipped, layer.prefill_tokens = spec["seen"], spec["skipped"], spec["prefill_tokens"]
        layer._query_window, layer._query_valid = tensors.get("query_window"), tensors.get("query_valid")
        if spec.get("deferred"):
            layer._deferred, layer._scaling = True, spec["scaling"]
            layer.sliding_window, layer.softcap = spec["sliding_window"], spec["softcap"]
            layer._window_queries, layer._window_valid = tensors.get("window_queries"), tensors.get("window_valid")
        return layer

