"""``--method`` name -> policy factory. Adding a method: one module, one line here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from uncomp_cli.errors import UncompError
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.uncomp import UNCompPolicy

_FACTORIES: dict[str, Callable[..., CachePolicy]] = {
    "full": FullCachePolicy,
    "snapkv": SnapKVPolicy,
    "uncomp": UNCompPolicy,
}


def available_methods() -> list[str]:
    return sorted(_FACTORIES)


def make_policy(method: str, **settings) -> CachePolicy:
    """Build the policy for ``method``; settings it has no field for are ignored (so one set of
    command-line options serves every method). Unknown names are a user error."""
    try:
        factory = _FACTORIES[method]
    except KeyError:
        raise UncompError(
            f"unknown method {method!r}; available: {', '.join(available_methods())}"
        ) from None
    accepted = {f.name for f in dataclasses.fields(factory) if f.init} if dataclasses.is_dataclass(factory) else None
    return factory(**{k: v for k, v in settings.items() if accepted is None or k in accepted})
