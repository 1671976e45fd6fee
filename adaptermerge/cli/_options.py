"""Click options shared by the verbs, and method options generated from the registered parameter dataclasses."""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidParameterError
from ._catalog import load_catalog

DTYPES = ("float32", "float16", "bfloat16", "float64")
# What --format accepts: io's formats and trainer layouts, written out so that --help starts without importing the
# readers (hence torch); tests/test_layouts.py checks it against io.FORMATS and io.LAYOUTS.
FORMATS = (
    "peft",
    "diffusers",
    "kohya",
    "kohya-flux",
    "comfyui-flux",
    "fal-flux",
    "xlabs-flux",
    "comfyui-flux2",
    "kohya-flux2",
    "fal-flux2",
    "kohya-sd3",
    "comfyui-hunyuan-video",
    "comfyui-wan",
    "musubi-wan",
    "comfyui-qwen-image",
    "comfyui-ltx-video",
    "peft-transformer",
)


def torch_dtype(name: str | None) -> Any:
    """The torch dtype named by `--dtype`, or None (torch is imported only when a dtype is asked for)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _click_type(type_name: str, choices: tuple[str, ...] | None) -> Any:
    return click.Choice(choices) if choices else {"int": int, "float": float, "bool": bool}.get(type_name, str)


def method_option_specs() -> dict[str, tuple[Any, bool, str, list[str]]]:
    """Parameter name → (click type, is_flag, help, methods that take it), over every registered method."""
    specs: dict[str, tuple[Any, bool, str, list[str]]] = {}
    helps: dict[str, Counter[str]] = {}
    for method in load_catalog():
        for param in method.params:
            if param.name == "rank":
                continue
            helps.setdefault(param.name, Counter())[param.help] += 1
            if param.name in specs:
                specs[param.name][3].append(method.name)
                continue
            specs[param.name] = (_click_type(param.type, param.choices), param.type == "bool", "", [method.name])
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


def renamed_option(old: str, new: str, name: str, **option_kwargs: Any) -> Callable[[Callable], Callable]:
    """Keep the old spelling `old` of option `new` (parameter `name`) working for one release, with a note.

    The old option is hidden from `--help`; when given, its value is used unless `new` was given too.
    """
    hidden_name = f"{name}_before_rename"

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old_value = kwargs.pop(hidden_name)
            if old_value is not None and old_value is not False:
                click.echo(f"Note: {old} is deprecated and will be removed in the next release; use {new}.", err=True)
                ctx = click.get_current_context()
                if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
                    kwargs[name] = old_value
            return command(*args, **kwargs)

        return click.option(old, hidden_name, hidden=True, default=None, **option_kwargs)(wrapper)

    return decorate


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


def output_format_option(default_help: str) -> Callable[[Callable], Callable]:
    """`--format FORMAT`, its choices listed in the help (a bracketed list would not fit 80 columns)."""
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(FORMATS),
        default=None,
        metavar="FORMAT",
        help=f"Output format or trainer layout ({', '.join(FORMATS)}); {default_help}.",
    )


format_option = output_format_option("the first input's format by default")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
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
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines instead of tables.")
