"""``--method`` name -> policy class. Adding a method: one module, one line in :data:`METHODS`.

Two levels: :func:`make_policy` builds a policy from its options alone and refuses an option the
method does not take (tests, library users, and every command before a model loads, so bad
settings fail fast); :func:`with_profile` gives a built policy the UNComp profile of a loaded model
(given, cached or calibrated once) when its method needs one. Generate, eval and bench all go
through these two, so a method and its options mean the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from uncomp_cli.defaults import PRESETS
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.adakv import AdaKVPolicy
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.policies.h2o import H2OPolicy
from uncomp_cli.policies.options import CATALOGUE
from uncomp_cli.policies.pyramidkv import PyramidKVPolicy
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.streamingllm import StreamingLLMPolicy
from uncomp_cli.policies.uncomp import UNCompPolicy
from uncomp_cli.policies.uncomp_ablations import UNCompNoPrunePolicy, UNCompUniformPolicy

METHODS: dict[str, type[CachePolicy]] = {policy.name: policy for policy in (
    FullCachePolicy,
    SnapKVPolicy,
    PyramidKVPolicy,
    StreamingLLMPolicy,
    H2OPolicy,
    AdaKVPolicy,
    UNCompPolicy,
    UNCompNoPrunePolicy,
    UNCompUniformPolicy,
)}


def available_methods() -> list[str]:
    return sorted(METHODS)


def policy_class(method: str) -> type[CachePolicy]:
    try:
        return METHODS[method]
    except KeyError:
        raise UncompError(f"unknown method {method!r}; available: {', '.join(available_methods())}") from None


def profile_methods() -> list[str]:
    """The methods that take the model's UNComp profile."""
    return [name for name in available_methods() if METHODS[name].needs_profile]


def methods_taking(option: str) -> list[str]:
    """The methods that take ``option`` (a keyword such as ``"sinks"``), sorted."""
    return [name for name in available_methods() if option in METHODS[name].option_names()]


def _flag(option: str) -> str:
    return CATALOGUE[option].flag if option in CATALOGUE else "--" + option.replace("_", "-")


def check_options(methods: Iterable[str], given: Iterable[str]) -> None:
    """Refuse an option that none of ``methods`` takes: ``--sinks applies to streamingllm, not snapkv``."""
    methods = list(dict.fromkeys(methods))
    for method in methods:
        policy_class(method)
    for option in given:
        if not any(option in METHODS[m].option_names() for m in methods):
            takers = methods_taking(option)
            where = f"applies to {', '.join(takers)}" if takers else "is not an option of any method"
            raise UncompError(f"{_flag(option)} {where}, not {', '.join(methods)}")


def options_for(method: str, given: dict) -> dict:
    """The part of ``given`` (options for a grid of methods) that ``method`` takes."""
    taken = set(policy_class(method).option_names())
    return {name: value for name, value in given.items() if name in taken}


def make_policy(method: str, **settings) -> CachePolicy:
    """Build the policy for ``method`` from its options (and, for library users, any other field of
    its class, such as UNComp's ``profile`` or ``kv_head_budgets``). A setting the method does not
    take, an unknown method or a bad value is a one-line :class:`UncompError`."""
    factory = policy_class(method)
    fields = {f.name for f in dataclasses.fields(factory) if f.init}
    if settings.get("preset") is not None and "preset" in fields:  # the preset's options, under the given ones
        if settings["preset"] not in PRESETS:
            raise UncompError(f"--preset must be one of {', '.join(PRESETS)}, got {settings['preset']!r}")
        settings = {k: v for k, v in PRESETS[settings["preset"]].items() if k in fields} | settings
    unknown = [name for name in settings if name not in fields]
    if unknown:
        if unknown[0] == "profile":
            raise UncompError(f"--profile is for the methods {', '.join(profile_methods())}, not {method}")
        check_options([method], unknown)
    return factory(**settings)


def with_profile(policy: CachePolicy, loaded, profile_path: str | Path | None = None) -> CachePolicy:
    """``policy`` ready to run on ``loaded`` (a :class:`~uncomp_cli.models.loading.LoadedModel`).

    Methods that need a profile get ``profile_path``, or the profile cached for the model, or one
    calibrated once (:func:`~uncomp_cli.profile.store.profile_for`); a profile given to another
    method is an error.
    """
    if not policy.needs_profile:
        if profile_path is not None:
            raise UncompError(f"--profile is for the methods {', '.join(profile_methods())}, not {policy.name}")
        return policy
    from uncomp_cli.profile.store import profile_for

    return policy.given(profile=profile_for(loaded, profile_path))
