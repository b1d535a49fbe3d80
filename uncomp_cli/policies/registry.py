"""``--method`` name -> policy factory. Adding a method: one module, one line here.

Two levels: :func:`make_policy` builds a policy from settings alone (tests, library users);
:func:`policy_for` builds it for a loaded model, bringing the UNComp profile (given, cached or
calibrated once) to the methods that need one. The CLI's generate, eval and bench all go through
:func:`policy_for`, so a method means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from uncomp_cli.errors import UncompError
from uncomp_cli.policies.adakv import AdaKVPolicy
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.policies.h2o import H2OPolicy
from uncomp_cli.policies.pyramidkv import PyramidKVPolicy
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.streamingllm import StreamingLLMPolicy
from uncomp_cli.policies.uncomp import UNCompPolicy
from uncomp_cli.policies.uncomp_ablations import UNCompNoPrunePolicy, UNCompUniformPolicy

_FACTORIES: dict[str, Callable[..., CachePolicy]] = {
    "full": FullCachePolicy,
    "snapkv": SnapKVPolicy,
    "uncomp": UNCompPolicy,
    "uncomp-noprune": UNCompNoPrunePolicy,
    "uncomp-uniform": UNCompUniformPolicy,
    "streamingllm": StreamingLLMPolicy,
    "pyramidkv": PyramidKVPolicy,
    "h2o": H2OPolicy,
    "adakv": AdaKVPolicy,
}

#: Methods whose policy takes the model's UNComp profile (``profile=``): UNComp and its ablations.
PROFILE_METHODS = frozenset(name for name, factory in _FACTORIES.items() if issubclass(factory, UNCompPolicy))


def available_methods() -> list[str]:
    return sorted(_FACTORIES)


def _factory(method: str) -> Callable[..., CachePolicy]:
    try:
        return _FACTORIES[method]
    except KeyError:
        raise UncompError(
            f"unknown method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def make_policy(method: str, **settings) -> CachePolicy:
    """Build the policy for ``method``; settings it has no field for are ignored (so one set of
    command-line options serves every method). Unknown names are a user error."""
    factory = _factory(method)
    accepted = {f.name for f in dataclasses.fields(factory) if f.init} if dataclasses.is_dataclass(factory) else None
    return factory(**{k: v for k, v in settings.items() if accepted is None or k in accepted})


def check_method_options(method: str, **settings) -> None:
    """Fail fast on bad settings (unknown method, bad budget, window, kernel…) before a model loads.

    Profile methods are checked with SnapKV's selection settings, which they share, since their
    profile is not at hand yet.
    """
    from uncomp_cli.engine.selection import resolve_budget

    _factory(method)
    policy = make_policy("snapkv" if method in PROFILE_METHODS else method, **settings)
    if method in PROFILE_METHODS and settings.get("prefill_keep") is not None:
        from uncomp_cli.engine.prefill import parse_keep_fractions

        parse_keep_fractions(settings["prefill_keep"])
    if hasattr(policy, "check_budget"):  # methods whose budget rule is not the window's
        if settings.get("budget") is not None:
            policy.check_budget(prompt_len=1_000_000)
    elif method != "full" and settings.get("budget") is not None:
        window = settings.get("window")
        resolve_budget(settings["budget"], prompt_len=1_000_000, **({} if window is None else {"window": window}))


def policy_for(loaded, method: str, profile_path: str | Path | None = None, **settings) -> CachePolicy:
    """The policy for ``method`` on ``loaded`` (a :class:`~uncomp_cli.models.loading.LoadedModel`).

    Profile methods use ``profile_path``, or the profile cached for the model, or calibrate once
    (:func:`~uncomp_cli.profile.store.profile_for`); a profile given to another method is an error.
    """
    _factory(method)
    if method in PROFILE_METHODS:
        from uncomp_cli.profile.store import profile_for

        return make_policy(method, profile=profile_for(loaded, profile_path), **settings)
    if profile_path is not None:
        raise UncompError(f"--profile is for the methods {', '.join(sorted(PROFILE_METHODS))}, not {method}")
    return make_policy(method, **settings)
