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


def _parameter(option: MethodOption) -> inspect.Parameter:
    flag = option.flag
    names = (f"{flag}/--no-{flag[2:]}",) if option.type is bool else (flag,)
    annotation = Annotated[option.type | None, typer.Option(*names, help=_help(option), show_default=False)]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_method_options(exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a typer command that takes ``method_options: dict``: add a flag for every method
    option but ``exclude`` and pass the command those the user gave, by keyword."""
    chosen = [option for name, option in CATALOGUE.items() if name not in exclude]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != "method_options"]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {}
            for option in chosen:
                value = kwargs.pop(option.name, None)
                if value is not None:
                    given[option.name] = value
            return command(*args, method_options=given, **kwargs)

        parameters = kept + [_parameter(option) for option in chosen]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return decorate
