"""uncomp: compressed long-context LLM inference guided by matrix entropy (UNComp).

The command-line tool ``uncomp`` is a thin layer over this package; everything it does can be
called from Python::

    from uncomp_cli import GenerationSettings, generate, load_model
    loaded = load_model("smollm2-135m")
    result = generate(loaded, "What is the capital of France?", GenerationSettings(max_new_tokens=20))
    print(result.text)

Heavy modules (torch, transformers) load on first use of a name, so ``uncomp --help`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from uncomp_cli.errors import ModelNotFoundError, ProfileError, PromptError, UncompError  # noqa: E402

_LAZY = {
    "load_model": "uncomp_cli.models.loading.loading",
    "LoadedModel": "uncomp_cli.models.loading.loading",
    "generate": "uncomp_cli.engine.generation",
    "generate_ids": "uncomp_cli.engine.generation",
    "GenerationSettings": "uncomp_cli.engine.generation",
    "GenerationResult": "uncomp_cli.engine.generation",
    "make_policy": "uncomp_cli.policies",
    "available_methods": "uncomp_cli.policies",
}

__all__ = ["__version__", "UncompError", "ModelNotFoundError", "PromptError", "ProfileError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uncomp_cli' has no attribute {name!r}")
