"""Click options shared by the verbs, and method options generated from the registered parameter dataclasses."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import InvalidParameterError
from ..io import FORMATS, LAYOUTS
from ..methods import list_methods

FORMAT_NAMES = [*FORMATS, *LAYOUTS]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """The click type of a dataclass field, and whether it is a flag."""
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return bool, True
    return {int: int, float: float}.get(annotation, str), False


def method_option_specs() -> dict[str, tuple[Any, bool, str, list[str]]]:
    """Parameter name → (click type, is_flag, help, methods that take it), over every registered method."""
    specs: dict[str, tuple[Any, bool, str, list[str]]] = {}
    helps: dict[str, Counter[str]] = {}
    for method in list_methods():
        hints = typing.get_type_hints(method.params_cls)
        for field in dataclasses.fields(method.params_cls):
            if field.name == "rank":
                continue
            helps.setdefault(field.name, Counter())[field.metadata.get("help", "")] += 1
            if field.name in specs:
                specs[field.name][3].append(method.name)
                continue
            click_type, is_flag = _click_type(hints[field.name])
            specs[field.name] = (click_type, is_flag, "", [method.name])
    # A parameter shared by several methods (density) gets the help text most of them give.
    return {name: (t, flag, helps[name].most_common(1)[0][0], used) for name, (t, flag, _, used) in specs.items()}


def method_options(command: Callable) -> Callable:
    """Add one `--<param>` option per method parameter; unset options are not passed to the method."""
    for name, (click_type, is_flag, help_text, methods) in sorted(method_option_specs().items(), reverse=True):
        flag = "--" + name.replace("_", "-")
        used_by = f" [methods: {', '.join(methods)}]"
        if is_flag:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text + used_by)
        else:
            option = click.option(flag, name, type=click_type, default=None, help=help_text + used_by)
        command = option(command)
    return command


def pop_method_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the method options from `kwargs` and return those that were given."""
    return {name: value for name in method_option_specs() if (value := kwargs.pop(name, None)) is not None}


def parse_weights(text: str | None) -> list[Any] | None:
    """`--weights`: comma-separated numbers, or a JSON/YAML file holding a list with one entry per adapter."""
    if text is None:
        return None
    path = Path(text)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        import yaml

        try:
            loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise InvalidParameterError(f"{path}: the --weights file does not parse ({err})") from None
        if not isinstance(loaded, list):
            raise InvalidParameterError(f"{path}: --weights file must hold a list with one entry per adapter")
        return loaded
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidParameterError(
            f"--weights must be comma-separated numbers such as 0.7,0.3 or a .json/.yaml file; got {text!r}"
        ) from None


format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMAT_NAMES),
    default=None,
    help="Output format or trainer layout (kohya-flux, comfyui-wan, ...); the first input's format by default.",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Output dtype; the first input's dtype by default (math runs in float32 or better).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
skip_unknown_option = click.option(
    "--skip-unknown",
    is_flag=True,
    help="Read files with keys nothing understands, leaving those modules out (the summary counts the keys).",
)
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt/.ckpt pickle checkpoints (only for files you trust)."
)
