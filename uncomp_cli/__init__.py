"""uncomp: compressed long-context LLM inference guided by matrix entropy (UNComp).

The command-line tool ``uncomp`` is a thin layer over this package; everything it does can be
called from Python::

    from uncomp_cli import load_model, generate, GenerationSettings
    loaded = load_model("smollm2-135m")
    result = generate(loaded, "What is the capital of France?", GenerationSettings(max_new_tokens=20))
    print(result.text)
"""

from __future__ import annotations

__version__ = "0.1.0"

from uncomp_cli.errors import ModelNotFoundError, ProfileError, PromptError, UncompError  # noqa: E402

__all__ = [
    "__version__",
    "UncompError",
    "ModelNotFoundError",
    "PromptError",
    "ProfileError",
]
