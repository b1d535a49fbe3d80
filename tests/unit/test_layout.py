"""The package's shape: imports run one way between its parts, no module grows past reading size,
and what the CLI lists without importing torch agrees with the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "uncomp_cli"
#: Each part may import its own modules and those of earlier parts; eval, bench and serve never each other.
LAYERS = [
    {"", "errors", "files", "defaults", "units", "memory", "haystack"},  # shared ground
    {"models"},
    {"profile"},
    {"engine"},
    {"policies"},
    {"contexts"},
    {"eval", "bench", "serve"},
    {"cli"},
]
MAX_LINES = 450


def part_of(module: str) -> str:
    """``uncomp_cli.engine.cache`` -> ``engine``; ``uncomp_cli.units`` -> ``units``; ``uncomp_cli`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def runtime_imports(path: Path) -> list[str]:
    """Modules of uncomp_cli imported by ``path``, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uncomp_cli"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("uncomp_cli")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    module = ".".join(("uncomp_cli", *path.relative_to(PACKAGE).with_suffix("").parts))
    own = part_of(module.removesuffix(".__init__"))
    if own == "":
        return  # the package root only names what its parts export, loaded lazily
    for imported in runtime_imports(path):
        other = part_of(imported)
        assert rank(other) <= rank(own), f"{module} imports {imported}: {other} is above {own}"
        assert {own, other} != {"eval", "bench"}, f"{module} imports {imported}: eval and bench stay apart"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_reading_size(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_only_the_cli_imports_typer():
    for path in MODULES:
        if "cli" not in path.relative_to(PACKAGE).parts[:1]:
            assert "import typer" not in path.read_text(encoding="utf-8"), path


def test_the_method_names_in_help_are_the_registry():
    from uncomp_cli.cli.options import METHOD_NAMES
    from uncomp_cli.policies.registry import available_methods

    assert sorted(METHOD_NAMES) == available_methods()


def test_every_method_option_is_in_the_catalogue():
    from uncomp_cli.policies.options import CATALOGUE
    from uncomp_cli.policies.registry import METHODS

    for method, policy in METHODS.items():
        for name in policy.option_names(settable=False):
            assert name in CATALOGUE, f"{method}.{name} is not in the options catalogue"
