"""``--method`` name -> policy factory. Adding a method: one module, one line here."""

from __future__ import annotations

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
    """Build the policy for ``method`` with its settings; unknown names are a user error."""
    try:
        factory = _FACTORIES[method]
    except KeyError:
        raise UncompError(
            f"unknown method {method!r}; available: {', '.join(available_methods())}"
        ) from None
    return factory(**settings)
