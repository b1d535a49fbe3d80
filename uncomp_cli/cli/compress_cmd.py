"""``uncomp compress``: compress a context once and keep it in a file, to ask questions on later."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors
from uncomp_cli.cli.options import CONTEXT_SCORER_HELP, METHOD_NAMES, ModelOptions, with_method_options, with_settings
from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER

DEFAULT_COMPRESS_METHOD = "uncomp"


@dataclass(frozen=True)
class ContextSource:
    """The context to compress, and how it is put to the model."""

    context_file: Annotated[Path | None, typer.Option(help="The context: a UTF-8 text file.")] = None
    context: Annotated[str | None, typer.Option(help="'-' reads the context from stdin.")] = None
    system: Annotated[str | None, typer.Option(help="System message (chat models).")] = None
    raw: Annotated[bool, typer.Option("--raw", help="The context exactly as given: no chat template.")] = False


@handle_errors
@with_method_options()
@with_settings(source=ContextSource, loading=ModelOptions)
def compress(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the compressed context (.uncomp).")],
    method: Annotated[str, typer.Option(help=f"KV cache: {', '.join(METHOD_NAMES)}.")] = DEFAULT_COMPRESS_METHOD,
    context_scorer: Annotated[
        str, typer.Option(help=f"How context tokens are scored: {CONTEXT_SCORER_HELP}.")
    ] = DEFAULT_CONTEXT_SCORER,
    profile: Annotated[
        Path | None,
        typer.Option(help="UNComp profile for the uncomp methods (default: the cached one, calibrated once)."),
    ] = None,
    kv_bits: Annotated[int | None, typer.Option(
        help="8: store what is kept rounded to 8 bits (keys and values; about 0.56 of the bytes at bfloat16, "
             "0.28 at float32), so twice the budget holds about the bytes of one. Default: the model's dtype.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    *,
    source: ContextSource,
    loading: ModelOptions,
    method_options: dict,
) -> None:
    """Prefill and compress a context without any question, and write its compressed cache to a file.

    Answer questions on it later, without prefilling it again:
    uncomp generate --context doc.uncomp "question". The file is checked against the model (shapes,
    weights, dtype) when it is loaded.
    """
    from uncomp_cli.cli.contexts import context_text
    from uncomp_cli.contexts.compress import check_context_scorer, compress_context
    from uncomp_cli.contexts.file import save_context
    from uncomp_cli.engine.quantise import check_kv_bits
    from uncomp_cli.errors import UncompError
    from uncomp_cli.policies.registry import make_policy, with_profile

    if out.is_dir():
        raise UncompError(f"--out {out} is a folder; give a file name such as {out / 'context.uncomp'}")
    if not out.parent.is_dir():
        raise UncompError(f"--out {out}: folder {out.parent} does not exist")
    text = context_text(source.context, source.context_file)
    if text is None:
        raise UncompError("no context: give --context-file PATH or --context - (stdin)")
    check_context_scorer(context_scorer)
    check_kv_bits(kv_bits)
    policy = make_policy(method, **method_options)  # before the model loads: bad settings fail fast
    loaded = loading.load()
    compressed = compress_context(loaded, text, with_profile(policy, loaded, profile), system=source.system,
                                  raw=source.raw, scorer=context_scorer, kv_bits=kv_bits)
    save_context(compressed, loaded, out)
    full = compressed.full_kv_cache_bytes(loaded)
    summary = {"out": str(out), "method": policy.name, "model": loaded.name,
               "kv_cache_bytes": compressed.kv_cache_bytes(), "full_kv_cache_bytes": full,
               "file_bytes": out.stat().st_size} | compressed.summary()
    if json_output:
        typer.echo(json.dumps(summary, ensure_ascii=False))
    else:
        typer.echo(f"{out}: {compressed.context_tokens} context tokens compressed by {policy.name} to "
                   f"{compressed.kv_cache_bytes() / 2**20:.2f} MiB of KV ({compressed.kv_cache_bytes() / full:.1%} of "
                   f"the full cache) in {compressed.prefill_seconds:.1f} s")
    if "budget_note" in compressed.stats:
        typer.echo(f"note: {compressed.stats['budget_note']}", err=True)
