"""Options several commands share, defined once: the method options (from the policies' catalogue),
the model, the device and the dtype.

:func:`with_method_options` adds one flag per method option of
:data:`~uncomp_cli.policies.options.CATALOGUE` to a command, so generate, eval and bench expose the
same set with the same help, and hands the command only the options the user gave
(``method_options``, a dict): the registry then refuses one that the chosen methods do not take,
instead of a default silently standing in for it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from uncomp_cli.policies.options import CATALOGUE, MethodOption

F = TypeVar("F", bound=Callable)

#: The ``--method`` names, for help texts that must not import torch (a test keeps it equal to the registry).
METHOD_NAMES = ("full", "snapkv", "pyramidkv", "streamingllm", "h2o", "adakv", "uncomp", "uncomp-noprune",
                "uncomp-uniform")

Model = Annotated[
    str | None,
    typer.Option("--model", "-m", envvar="UNCOMP_MODEL",
                 help="smollm2-135m (default), a model folder, a .gguf, or a hub id."),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]


def _help(option: MethodOption) -> str:
    if option.type is bool:
        return f"{option.help} [default: {'on' if option.default else 'off'}]"
    return option.help if option.default is None else f"{option.help} [default: {option.default}]"


def _parameter(method_option: MethodOption) -> inspect.Parameter:
    flag = method_option.flag
    names = (f"{flag}/--no-{flag[2:]}",) if method_option.type is bool else (flag,)
    help_text = _help(method_option)
    return option(method_option.name, Annotated[method_option.type | None,
                                                typer.Option(*names, help=help_text, show_default=False)])


def with_options(into: str, parameters: list[inspect.Parameter], given_only: bool = False) -> Callable[[F], F]:
    """Decorate a typer command that takes ``into: dict``: add ``parameters`` (keyword-only, each an
    ``Annotated[..., typer.Option(...)]``) to its options and pass their values as that one dict
    (``given_only``: only those the user gave, i.e. not None). Options several commands share are
    declared once this way, and each command's own signature keeps only what is its own."""
    names = [parameter.name for parameter in parameters]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != into]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            if given_only:
                values = {name: value for name, value in values.items() if value is not None}
            return command(*args, **{into: values}, **kwargs)

        merged = kept + parameters
        wrapper.__signature__ = signature.replace(parameters=merged)
        wrapper.__annotations__ = {p.name: p.annotation for p in merged}
        return wrapper  # type: ignore[return-value]

    return decorate


def option(name: str, annotation, default=None) -> inspect.Parameter:
    """A keyword-only parameter for :func:`with_options`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_method_options(exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Add a flag for every method option but ``exclude``; the command gets ``method_options``, those
    the user gave (the registry refuses one that the chosen methods do not take)."""
    chosen = [_parameter(o) for name, o in CATALOGUE.items() if name not in exclude]
    return with_options("method_options", chosen, given_only=True)
