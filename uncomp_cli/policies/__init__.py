"""Cache policies: what the KV cache keeps. One method per module, looked up by name in ``registry``.

``options`` (the method options, for the CLI) imports no torch; the rest loads on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "CachePolicy": "uncomp_cli.policies.base",
    "available_methods": "uncomp_cli.policies.registry",
    "make_policy": "uncomp_cli.policies.registry",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uncomp_cli.policies' has no attribute {name!r}")
