"""uncomp: compressed long-context LLM inference guided by matrix entropy (UNComp).

The command-line tool ``uncomp`` is a thin layer over this package; everything it does can be
called from Python::

    from uncomp_cli import GenerationSettings, generate, load_model, make_policy, with_profile
    loaded = load_model("smollm2-135m")
    policy = with_profile(make_policy("uncomp", budget="5%"), loaded)  # the cached profile, or calibrate once
    result = generate(loaded, "What is the capital of France?", GenerationSettings(max_new_tokens=20), policy)
    print(result.text, result.stats)

The parts, one package each: ``models`` (resolve and load), ``profile`` (entropy, calibration,
the profile file and store), ``engine`` (grouped KV cache, attention, selection, prefill pruning,
the generation loop), ``policies`` (one cache method per module and the registry), ``eval``,
``bench`` and ``cli`` (typer only). Imports run one way, in that order.

Heavy modules (torch, transformers) load on first use of a name, so ``uncomp --help`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from uncomp_cli.errors import ModelNotFoundError, ProfileError, PromptError, UncompError  # noqa: E402

_LAZY = {
    # models
    "load_model": "uncomp_cli.models.loading",
    "LoadedModel": "uncomp_cli.models.loading",
    # generation
    "generate": "uncomp_cli.engine.generation",
    "generate_batch": "uncomp_cli.engine.generation",
    "generate_ids": "uncomp_cli.engine.generation",
    "BatchItem": "uncomp_cli.engine.generation",
    "GenerationSettings": "uncomp_cli.engine.generation",
    "GenerationResult": "uncomp_cli.engine.generation",
    # the step API (docs/engine.md)
    "Batch": "uncomp_cli.engine.steps",
    "Row": "uncomp_cli.engine.steps",
    "CachePlan": "uncomp_cli.engine.plan",
    # cache methods
    "make_policy": "uncomp_cli.policies.registry",
    "with_profile": "uncomp_cli.policies.registry",
    "available_methods": "uncomp_cli.policies.registry",
    # profiles
    "calibrate_loaded": "uncomp_cli.profile.calibrate",
    "read_texts": "uncomp_cli.profile.calibration_text",
    "Profile": "uncomp_cli.profile.file",
    "load_profile": "uncomp_cli.profile.file",
    "save_profile": "uncomp_cli.profile.file",
    "profile_for": "uncomp_cli.profile.store",
    # compressed contexts: compress once, ask many, keep in a file
    "compress_context": "uncomp_cli.contexts.compress",
    "ask": "uncomp_cli.contexts.compress",
    "CompressedContext": "uncomp_cli.contexts.compress",
    "save_context": "uncomp_cli.contexts.file",
    "load_context": "uncomp_cli.contexts.file",
    # evaluation and benchmarks
    "Cell": "uncomp_cli.policies.grid",
    "plan_runs": "uncomp_cli.policies.grid",
    "EvalSettings": "uncomp_cli.eval.runner",
    "run_eval": "uncomp_cli.eval.runner",
    "BenchSettings": "uncomp_cli.bench.results",
    "run_bench": "uncomp_cli.bench.runner",
}

__all__ = ["__version__", "UncompError", "ModelNotFoundError", "PromptError", "ProfileError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uncomp_cli' has no attribute {name!r}")
