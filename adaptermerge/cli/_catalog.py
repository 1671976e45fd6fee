"""The merge methods' names, parameters and papers, readable without importing torch.

`adaptermerge methods` prints this table and `merge` builds its method options from it, so `--help` and argument
errors answer without loading the math. The table is generated from the method registry and a test checks that the
two agree; after adding or changing a method, rewrite it with
`python -c "from adaptermerge.cli._catalog import write_catalog; write_catalog()"`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOG_PATH = Path(__file__).with_name("methods.json")
# Which method to try first, from `adaptermerge bench quality --suite all` over seeds 0-2 (printed by `methods`).
TRY_FIRST = (
    "Try first for LLM LoRAs: `tsv`. On the text suite (4 WordNet tasks on MiniLM, 3 separately trained seeds) it "
    "kept 91.1 ± 0.8 % of each task's own accuracy, above the exact sum (`linear`, 88.0 ± 2.0) and peft's best type "
    "(ties_svd, 88.4 ± 1.4) on every seed, with nothing to tune but one weight for all adapters (0.4-0.5 for 4 "
    "adapters there: pick it on held-out data). `iso_c` has a similar mean (91.5) but a wider spread (± 3.5); "
    "`ties`, `dare_*` and `knots` did not beat `linear`. To keep every adapter recoverable instead of merging, use "
    "`rmm`."
)


@dataclass(frozen=True)
class ParamInfo:
    """One method parameter: its name, `int`/`float`/`str`/`bool` type, allowed values, default and help."""

    name: str
    type: str
    choices: tuple[str, ...] | None
    default: Any
    help: str


@dataclass(frozen=True)
class MethodInfo:
    """One registered method as the command line shows it."""

    name: str
    pretty_name: str
    summary: str
    reference_url: str
    params: tuple[ParamInfo, ...]


def _type_name(annotation: Any) -> tuple[str, tuple[str, ...] | None]:
    """The type name and the allowed values (for a `Literal`) of a parameter annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return "str", tuple(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {int: "int", float: "float", bool: "bool"}.get(annotation, "str"), None


def build_catalog() -> list[dict[str, Any]]:
    """The catalog as plain data, read from the method registry (imports every method, hence torch)."""
    from ..methods import list_methods

    methods = []
    for method in list_methods():
        hints = typing.get_type_hints(method.params_cls)
        params = []
        for field in dataclasses.fields(method.params_cls):
            type_name, choices = _type_name(hints[field.name])
            default = None if field.default is dataclasses.MISSING else field.default
            params.append(
                {
                    "name": field.name,
                    "type": type_name,
                    "choices": list(choices) if choices else None,
                    "default": default,
                    "help": field.metadata.get("help", ""),
                }
            )
        methods.append(
            {
                "name": method.name,
                "pretty_name": method.pretty_name,
                "summary": method.summary,
                "reference_url": method.reference_url,
                "params": params,
            }
        )
    return methods


def write_catalog(path: Path = CATALOG_PATH) -> Path:
    """Regenerate the catalog file from the registry."""
    path.write_text(json.dumps(build_catalog(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@functools.cache
def load_catalog() -> tuple[MethodInfo, ...]:
    """Every registered method, sorted by name, read from the catalog file."""
    return tuple(
        MethodInfo(
            **{k: v for k, v in entry.items() if k != "params"},
            params=tuple(
                ParamInfo(**{**p, "choices": tuple(p["choices"]) if p["choices"] else None}) for p in entry["params"]
            ),
        )
        for entry in json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    )
