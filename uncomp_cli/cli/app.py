"""The ``uncomp`` application: registers one function per command; heavy imports stay inside them."""

from __future__ import annotations

import typer

from uncomp_cli import __version__
from uncomp_cli.cli.common import configure_logging

app = typer.Typer(
    name="uncomp",
    help="Compressed long-context LLM inference with UNComp (entropy-guided KV and hidden-state compression).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uncomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Compressed long-context LLM inference with UNComp."""
    configure_logging()


# Commands register themselves here, one module each.
from uncomp_cli.cli import (  # noqa: E402
    bench_cmd,
    calibrate_cmd,
    compress_cmd,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    serve_cmd,
)

app.command("generate")(generate_cmd.generate)
app.command("compress")(compress_cmd.compress)
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("inspect-heads")(inspect_cmd.inspect_heads)
app.command("bench")(bench_cmd.bench)
app.command("serve")(serve_cmd.serve)
app.add_typer(eval_cmd.eval_app, name="eval")


def main() -> None:
    app()
