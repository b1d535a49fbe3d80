"""The method × budget grid shared by eval and bench: cell names, ``name@budget``, expansion, one policy per cell."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uncomp_cli.errors import UncompError
from uncomp_cli.policies import registry
from uncomp_cli.policies.grid import Cell, make_policies, parse_methods, plan_runs


@pytest.mark.parametrize("cell, label, name", [
    (Cell("full"), "full", "full"),
    (Cell("snapkv", "10%"), "snapkv 10%", "snapkv-10pct"),
    (Cell("uncomp", "128"), "uncomp 128", "uncomp-128"),
    (Cell("snapkv", "2.5%"), "snapkv 2.5%", "snapkv-2.5pct"),
    (Cell("snapkv", "../x"), "snapkv ../x", "snapkv-x"),  # a folder name cannot leave the results folder
])
def test_cells_have_a_label_for_people_and_a_name_for_folders(cell, label, name):
    # Existing results folders are found by these names: they must never change.
    assert (cell.label, cell.name) == (label, name)


def test_method_lists_parse_own_budgets_after_at():
    assert parse_methods("full, snapkv,snapkv@100%,uncomp@ 128") == [
        ("full", None), ("snapkv", None), ("snapkv", "100%"), ("uncomp", "128")]
    assert parse_methods([" snapkv @ 5% ", "full"]) == [("snapkv", "5%"), ("full", None)]


@pytest.mark.parametrize("text, message", [
    ("snapkv@", "^method 'snapkv@' names no budget after '@'$"),
    (["full", "snapkv@ "], "^method 'snapkv@ ' names no budget after '@'$"),
    (" , ", "^--methods is empty$"),
    ("full,,snapkv", "without empty items"),
])
def test_bad_method_lists_are_user_errors(text, message):
    with pytest.raises(UncompError, match=message):
        parse_methods(text)


def test_the_grid_keeps_the_order_given_runs_full_once_and_drops_repeats():
    cells = plan_runs(["snapkv@10%", "full", "uncomp", "snapkv", "full", "uncomp"], ["10%", "5%"])
    assert cells == [Cell("snapkv", "10%"), Cell("full"), Cell("uncomp", "10%"), Cell("uncomp", "5%"),
                     Cell("snapkv", "5%")]  # snapkv 10% stands where it first did


def test_a_method_at_its_own_budget_runs_only_there():
    assert plan_runs(["full", "snapkv@100%", "uncomp"], ["5%"]) == [
        Cell("full"), Cell("snapkv", "100%"), Cell("uncomp", "5%")]
    assert plan_runs("full,snapkv@128", []) == [Cell("full"), Cell("snapkv", "128")]


def test_an_empty_grid_and_an_unknown_method_are_refused():
    with pytest.raises(UncompError, match="^no runs: give at least one method"):
        plan_runs(["snapkv", "uncomp"], [])
    with pytest.raises(UncompError, match="^unknown method 'nope'; available: "):
        plan_runs(["full", "nope"], ["5%"])


def test_each_cell_gets_its_policy_with_the_options_its_method_takes():
    cells = plan_runs(["full", "snapkv", "streamingllm"], ["40", "10%"])
    policies = make_policies(cells, {"window": 16, "sinks": 2})
    assert [(p.name, getattr(p, "budget", None)) for p in policies] == [
        ("full", None), ("snapkv", "40"), ("snapkv", "10%"), ("streamingllm", "40"), ("streamingllm", "10%")]
    assert policies[1].window == 16 and not hasattr(policies[0], "window")
    assert policies[3].sinks == 2 and not hasattr(policies[1], "sinks")


def test_an_option_no_method_takes_is_refused_once_for_the_whole_grid(monkeypatch):
    calls = []
    real = registry.check_options
    monkeypatch.setattr(registry, "check_options", lambda methods, given: calls.append(1) or real(methods, given))
    cells = plan_runs(["full", "snapkv"], ["10%", "5%"])
    with pytest.raises(UncompError, match="^--sinks applies to streamingllm, not full, snapkv$"):
        make_policies(cells, {"sinks": 4})
    assert calls == [1]


def test_a_setting_a_policy_refuses_names_its_cell():
    with pytest.raises(UncompError, match="^snapkv-16: budget 16 is below the 32-token observation window"):
        make_policies([Cell("full"), Cell("snapkv", "16")], {})


def test_the_grid_module_imports_no_torch():
    # eval and bench import the grid at their top; the CLI's --help must not pay for torch.
    code = "import sys, uncomp_cli.policies.grid; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
