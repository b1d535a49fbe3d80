"""Options several commands share, defined once, and the decorators that hand a command a group of
options as one value.

A group of options is a dataclass whose fields are the options, each typed
``Annotated[T, typer.Option(...)]`` with its default, as a command's parameter would be;
:func:`with_settings` adds its flags to a command and hands the command one instance::

    @dataclass(frozen=True)
    class SamplingOptions:
        temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0
        seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None

    @with_settings(sampling=SamplingOptions)
    def generate(prompt: str, *, sampling: SamplingOptions) -> None: ...

:class:`ModelOptions` (the model, the device and the dtype) is such a group, shared by the commands
that load a model. :func:`with_method_options` adds one flag per method option of
:data:`~uncomp_cli.policies.options.CATALOGUE`, so generate, eval and bench expose the same set with
the same help, and hands the command only the options the user gave (``method_options``, a dict):
the registry then refuses one that the chosen methods do not take, instead of a default silently
standing in for it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from uncomp_cli.policies.options import CATALOGUE, MethodOption

#: What --context-scorer's choices mean (compress, generate --context-file, eval --query-agnostic, bench).
CONTEXT_SCORER_HELP = ("reconstruct (how the model re-reads the context: one more pass over it; the default), gate "
                       "(those scores predicted during the prefill by a gate trained once per model and cached: "
                       "about one prefill) or window (the method's own, at the end of the context)")

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


def with_options(into: str, parameters: list[inspect.Parameter], given_only: bool = False,
                 build: Callable[..., Any] = dict) -> Callable[[F], F]:
    """Decorate a typer command that takes ``into``: add ``parameters`` (keyword-only, each an
    ``Annotated[..., typer.Option(...)]``) to its options and pass their values as that one value,
    ``build(**values)``: a dict by default (``given_only``: only those the user gave, i.e. not None).
    Options several commands share are declared once this way, and each command's own signature
    keeps only what is its own."""
    names = [parameter.name for parameter in parameters]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != into]
        twice = sorted(set(names) & {p.name for p in kept})
        if twice:
            raise TypeError(f"{command.__name__}: option {twice[0]!r} is declared twice")

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            if given_only:
                values = {name: value for name, value in values.items() if value is not None}
            return command(*args, **{into: build(**values)}, **kwargs)

        merged = kept + parameters
        wrapper.__signature__ = signature.replace(parameters=merged)
        wrapper.__annotations__ = {p.name: p.annotation for p in merged}
        return wrapper  # type: ignore[return-value]

    return decorate


def option(name: str, annotation, default=None) -> inspect.Parameter:
    """A keyword-only parameter for :func:`with_options`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def settings_options(settings: type) -> list[inspect.Parameter]:
    """The options of a dataclass of options: one a field, with the field's
    ``Annotated[T, typer.Option(...)]`` type and its default (a field without one is a required option)."""
    types = typing.get_type_hints(settings, include_extras=True)
    parameters = []
    for field in dataclasses.fields(settings):
        if field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{settings.__name__}.{field.name}: give a default, not a default_factory")
        default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        parameters.append(option(field.name, types[field.name], default))
    return parameters


def with_settings(**groups: type) -> Callable[[F], F]:
    """Add a flag for every field of each dataclass of options and hand the command one instance of
    each, as the parameter named by its keyword: ``@with_settings(sampling=SamplingOptions)`` gives
    the command ``sampling: SamplingOptions``. ``--help`` lists the groups in the order given. A field
    whose name is already a parameter (the command's own or another group's) is refused when the
    command is declared."""

    def decorate(command: F) -> F:
        for into, settings in groups.items():  # the first group's options are added first
            command = with_options(into, settings_options(settings), build=settings)(command)
        return command

    return decorate


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, on which device and in which dtype (generate, compress, serve, bench)."""

    model: Model = None
    device: Device = "auto"
    dtype: Dtype = "auto"

    def load(self):
        """The loaded model (:func:`~uncomp_cli.models.loading.load_model`)."""
        from uncomp_cli.models.loading import load_model

        return load_model(self.model, device=self.device, dtype=self.dtype)


def with_method_options(exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Add a flag for every method option but ``exclude``; the command gets ``method_options``, those
    the user gave (the registry refuses one that the chosen methods do not take)."""
    chosen = [_parameter(o) for name, o in CATALOGUE.items() if name not in exclude]
    return with_options("method_options", chosen, given_only=True)
