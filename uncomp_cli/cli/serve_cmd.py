"""``uncomp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors
from uncomp_cli.cli.options import METHOD_NAMES, ModelOptions, with_method_options, with_settings
from uncomp_cli.defaults import DEFAULT_METHOD
from uncomp_cli.errors import UncompError


@dataclass(frozen=True)
class ListenOptions:
    """Where the server listens, the name it answers to, what it reads, and how it stops."""

    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000
    served_model_name: Annotated[str | None, typer.Option(help="The model id clients send (default: the model's "
                                                          "name).")] = None
    max_body: Annotated[str, typer.Option(
        help="Largest request body (e.g. 1MiB); larger: HTTP 413. auto: 32 bytes per token of the model's context, "
             "at least 1MiB.")] = "auto"
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM, seconds to let running requests finish before they are failed (waiting ones "
                    "are failed at once).")] = 30.0


@dataclass(frozen=True)
class BatchingOptions:
    """How many requests run and wait, and the memory their caches may take."""

    max_batch: Annotated[int, typer.Option(min=1, help="Most requests prefilled and decoded together.")] = 8
    max_queue: Annotated[int, typer.Option(min=1, help="Most requests waiting; beyond it: HTTP 429.")] = 64
    kv_cache_limit: Annotated[str, typer.Option(
        help="KV bytes a batch may hold (e.g. 256MiB, 8GiB); requests are admitted while their caches fit. "
             "auto: half the memory available at start.")] = "auto"
    default_max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of a request that gives none.")] = 512
    prefill_chunk: Annotated[int, typer.Option(
        min=1, help="Prompt tokens prefilled per step between the running requests' decode steps (chunked "
                    "prefill).")] = 512


@dataclass(frozen=True)
class ReuseOptions:
    """Documents kept at full precision for the later turns that ask about them again."""

    reuse_min_tokens: Annotated[int, typer.Option(
        min=0, help="A first user message whose text before its last paragraph break has this many tokens is a "
                    "document: its KV is kept (before any selection) for later turns about it (0: off).")] = 1024
    context_cache: Annotated[str, typer.Option(
        help="KV bytes of documents kept for reuse (full precision, least recently used dropped first).")] = "1GiB"
    context_dir: Annotated[Path | None, typer.Option(
        help="A folder where documents kept for reuse are also written (.uncomp files) and looked for before a "
             "document is prefilled: shared by replicas (local disk, NFS, an object-store mount).")] = None
    context_dir_limit: Annotated[str, typer.Option(
        help="Bytes the --context-dir files may take; least recently used files go first.")] = "16GiB"


@dataclass(frozen=True)
class ReplicaOptions:
    """Several engine replicas on Ray Serve (the ray extra)."""

    replicas: Annotated[int, typer.Option(
        min=0, help="Engine replicas on Ray Serve, each with its own model, batch and --kv-cache-limit; requests "
                    "about one document go to the replica that holds it (0: one process, no Ray).")] = 0
    ray_address: Annotated[str | None, typer.Option(
        help="With --replicas: the Ray cluster to run on (e.g. ray://head:10001 or auto); default: start a "
             "local one.")] = None


@handle_errors
@with_method_options()
@with_settings(loading=ModelOptions, listen=ListenOptions, batching=BatchingOptions, reuse=ReuseOptions,
               scaling=ReplicaOptions)
def serve(
    method: Annotated[str, typer.Option(help=f"Default KV cache: {', '.join(METHOD_NAMES)}. A request may ask for "
                                        "another in its 'uncomp' body field.")] = DEFAULT_METHOD,
    profile: Annotated[Path | None, typer.Option(help="UNComp profile (default: the model's cached one).")] = None,
    *,
    loading: ModelOptions,
    listen: ListenOptions,
    batching: BatchingOptions,
    reuse: ReuseOptions,
    scaling: ReplicaOptions,
    method_options: dict,
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models),
    with /health and Prometheus /metrics.

    Method options given here are the defaults; a request may send its own, e.g. the openai client's
    extra_body={"uncomp": {"method": "snapkv", "budget": "10%"}}.
    """
    try:
        import uvicorn  # noqa: F401  (the serve extra: checked here, used by serve.app.run)

        from uncomp_cli.serve.app import create_app, run
    except ImportError as exc:
        raise UncompError(f"uncomp serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'uncomp[serve]'") from None
    from uncomp_cli.policies.registry import make_policy, with_profile
    from uncomp_cli.serve.server import ServeSettings
    from uncomp_cli.units import parse_memory

    policy = make_policy(method, **method_options)  # bad settings fail before the model loads
    settings = ServeSettings(method=method, method_options=method_options, max_batch=batching.max_batch,
                             max_queue=batching.max_queue, default_max_tokens=batching.default_max_tokens,
                             prefill_chunk=batching.prefill_chunk, reuse_min_tokens=reuse.reuse_min_tokens,
                             context_cache_bytes=parse_memory(reuse.context_cache),
                             served_model_name=listen.served_model_name,
                             shutdown_timeout=listen.shutdown_timeout,
                             context_dir=None if reuse.context_dir is None else str(reuse.context_dir),
                             context_dir_bytes=parse_memory(reuse.context_dir_limit))
    if batching.kv_cache_limit != "auto":
        settings.kv_cache_limit = parse_memory(batching.kv_cache_limit)
    if listen.max_body != "auto":
        settings.max_body = parse_memory(listen.max_body)
    settings.validate()
    if scaling.ray_address and not scaling.replicas:
        raise UncompError("--ray-address is for --replicas N")
    if scaling.replicas:
        _serve_replicas(loading, settings, profile, batching.kv_cache_limit, listen, scaling)
        return
    loaded = loading.load()
    if policy.needs_profile or profile is not None:  # check (or calibrate) the profile now, not at a request
        with_profile(policy if policy.needs_profile else make_policy("uncomp"), loaded, profile)
    from uncomp_cli.serve.server import kv_cache_limit_bytes

    settings.kv_cache_limit = kv_cache_limit_bytes(batching.kv_cache_limit, loaded.device)
    app = create_app(loaded, settings, str(profile) if profile else None)
    planner = app.state.planner
    sampling = planner.sampling
    typer.echo(f"serving {planner.model_name} ({method}) on http://{listen.host}:{listen.port}/v1, KV cache limit "
               f"{settings.kv_cache_limit} bytes, bodies up to {planner.max_body} bytes; a request without "
               f"temperature/top_p gets {sampling.temperature:g}/{sampling.top_p:g} ({sampling.source})", err=True)
    # uvicorn stops on SIGTERM, then raises the signal again for the handler it found: with this one
    # installed that ends the run normally (exit 0) instead of killing the process.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if not run(app, listen.host, listen.port, listen.shutdown_timeout):
        raise UncompError(f"the server could not start on {listen.host}:{listen.port}")
    typer.echo("stopped", err=True)


def _serve_replicas(loading, settings, profile: Path | None, kv_cache_limit: str, listen: ListenOptions,
                    scaling: ReplicaOptions) -> None:
    try:
        import ray  # noqa: F401

        from uncomp_cli.serve.replicas import ReplicaSpec, run_replicas
    except ImportError as exc:
        raise UncompError(f"uncomp serve --replicas needs the ray extra ({exc.name} is missing): "
                          "pip install 'uncomp[ray]'") from None
    spec = ReplicaSpec(loading, settings, str(profile) if profile else None, kv_cache_limit)
    typer.echo(f"serving {scaling.replicas} replicas ({settings.method}) on http://{listen.host}:{listen.port}/v1 "
               f"through Ray Serve{' at ' + scaling.ray_address if scaling.ray_address else ''}; KV cache limit "
               f"{kv_cache_limit} per replica", err=True)
    import torch

    device = str(loading.device or "auto")
    device_type = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    run_replicas(spec, scaling.replicas, listen.host, listen.port, scaling.ray_address, device_type)
    typer.echo("stopped", err=True)
