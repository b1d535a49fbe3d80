"""``with_settings``: a dataclass of typer options reaches a command as one instance, with every flag
as typer declares it (names, short flags, ``--x/--no-x``, envvars, ranges, help, required)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from uncomp_cli.cli.options import with_settings


@dataclass(frozen=True)
class Shape:
    size: Annotated[int, typer.Option("--size", "-s", min=1, max=9, help="How big.")] = 3
    name: Annotated[str | None, typer.Option(envvar="SHAPE_NAME", help="What it is called.")] = None


@dataclass(frozen=True)
class Look:
    colour: Annotated[str, typer.Option(help="Its colour.")]
    shiny: Annotated[bool, typer.Option("--shiny/--no-shiny", help="Whether it shines.")] = True


seen: dict = {}


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.command()
    @with_settings(shape=Shape, look=Look)
    def draw(label: Annotated[str, typer.Argument(help="A label.")] = "x", *, shape: Shape, look: Look) -> None:
        """Draw a shape."""
        seen.update(label=label, shape=shape, look=look)

    return app


def invoke(*args, **kwargs):
    seen.clear()
    return CliRunner().invoke(make_app(), list(args), **kwargs)


def test_help_lists_every_field_as_its_flag_in_the_groups_order():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    flags = ["--size", "-s", "--name", "--colour", "--shiny", "--no-shiny"]
    for flag in flags:
        assert flag in result.stdout
    assert "How big." in result.stdout and "Whether it shines." in result.stdout
    positions = [result.stdout.index(flag) for flag in ("--size", "--name", "--colour", "--shiny")]
    assert positions == sorted(positions)


def test_values_reach_the_command_as_one_instance_per_group():
    result = invoke("hi", "-s", "5", "--colour", "red", "--no-shiny")
    assert result.exit_code == 0, result.output
    assert seen == {"label": "hi", "shape": Shape(size=5, name=None), "look": Look(colour="red", shiny=False)}


def test_defaults_envvars_and_required_fields():
    assert invoke("--colour", "blue", env={"SHAPE_NAME": "box"}).exit_code == 0
    assert seen["shape"] == Shape(size=3, name="box") and seen["look"] == Look(colour="blue", shiny=True)
    missing = invoke()
    assert missing.exit_code == 2 and "--colour" in missing.output


def test_ranges_are_checked_by_typer():
    result = invoke("--colour", "red", "--size", "10")
    assert result.exit_code == 2 and seen == {}


def test_a_field_that_is_already_a_parameter_is_refused_at_declaration():
    @dataclass
    class Other:
        size: Annotated[int, typer.Option()] = 1

    with pytest.raises(TypeError, match="'size' is declared twice"):
        with_settings(shape=Shape, other=Other)(lambda *, shape, other: None)
