"""The method × budget grid that ``uncomp eval`` and ``uncomp bench`` both run: its cells, how a
method list is read (``snapkv@100%`` = a method at its own budget), and one policy per cell.

It lives with the policies because it builds them (through :mod:`~uncomp_cli.policies.registry`,
imported on first use so that planning a grid loads no torch); eval and bench only order the cells.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from uncomp_cli.errors import UncompError
from uncomp_cli.units import split_list


def slug(text: str) -> str:
    """``text`` safe as a file or folder name: ``10%`` stays readable, ``a/b`` cannot escape."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


@dataclass(frozen=True)
class Cell:
    """One method at one budget (``None``: the method takes none, e.g. ``full``)."""

    method: str
    budget: str | None = None

    @property
    def label(self) -> str:
        """For people: ``snapkv 10%``, ``full``."""
        return self.method if self.budget is None else f"{self.method} {self.budget}"

    @property
    def name(self) -> str:
        """For folders (results are found again by it, so it never changes): ``snapkv-10pct``, ``uncomp-128``."""
        if self.budget is None:
            return self.method
        return f"{self.method}-{slug(self.budget.replace('%', 'pct'))}"


def parse_methods(text: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``full,snapkv,snapkv@100%`` -> ``[(method, own budget or None)]``; ``name@B`` runs only at budget B."""
    items = split_list(text, "--methods") if isinstance(text, str) else list(text)
    parsed = []
    for item in items:
        method, at, budget = item.partition("@")
        if at and not budget.strip():
            raise UncompError(f"method {item!r} names no budget after '@'")
        parsed.append((method.strip(), budget.strip() or None))
    return parsed


def plan_runs(methods: str | Sequence[str], budgets: Sequence[str]) -> list[Cell]:
    """Every method × budget, in the order given: a method at its own budget (``name@B``) only there,
    one without a budget (``full``) once; a repeated cell once, where it first stands."""
    from uncomp_cli.policies.registry import policy_class

    cells: list[Cell] = []
    for method, own_budget in parse_methods(methods):
        takes_budget = "budget" in policy_class(method).option_names()
        for budget in [own_budget] if own_budget else list(budgets) if takes_budget else [None]:
            cell = Cell(method, budget)
            if cell not in cells:
                cells.append(cell)
    if not cells:
        raise UncompError("no runs: give at least one method (and a budget for methods other than full)")
    return cells


def cell_policy(cell: Cell, options: dict):
    """The cell's policy from the registry, with the ``options`` its method takes (no profile yet);
    a setting the policy refuses names the cell."""
    from uncomp_cli.policies.registry import make_policy, options_for

    budget = {} if cell.budget is None else {"budget": cell.budget}
    try:
        return make_policy(cell.method, **options_for(cell.method, options), **budget)
    except UncompError as exc:
        raise UncompError(f"{cell.name}: {exc}") from None


def make_policies(cells: Iterable[Cell], options: dict) -> list:
    """One policy per cell, before a model loads: an option none of the cells' methods takes is refused
    once for the whole grid (``--sinks applies to streamingllm, not full, snapkv``), then any setting a
    policy refuses."""
    from uncomp_cli.policies.registry import check_options

    cells = list(cells)
    check_options([cell.method for cell in cells], options)
    return [cell_policy(cell, options) for cell in cells]
