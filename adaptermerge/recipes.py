"""Merge recipes: a YAML file that names several merges, validated before anything runs.

The schema (every mapping refuses keys it does not know; see ``examples/recipe.yaml`` for a commented file)::

    version: 1                      # optional; the only version so far
    defaults:                       # optional; any merge field below except name, adapters and output
      method: linear
      format: peft
    merges:                         # one or more
      - name: style_mix             # optional; unique; the output's stem by default
        adapters:                   # one or more entries, in order
          - loras/style.safetensors           # a path (file or PEFT folder), relative to the recipe's folder
          - path: loras/character/            # the same, with a weight
            weight: 0.5                       # a number, or a mapping passed to merge_adapters unchanged
          - glob: "loras/extra_*.safetensors" # every match, sorted; each gets the entry's weight
            weight: 0.1
          - hub: some-user/some-lora          # a Hugging Face hub id
        method: ties                # a registered method (`adaptermerge methods`); linear by default
        params: {density: 0.5}      # the method's parameters
        rank: 16                    # output rank per module (optional)
        output: out/style_mix       # where to write, relative to the recipe's folder
        format: peft                # peft, kohya or diffusers; the first input's format by default
        dtype: float16              # float32, float16, bfloat16 or float64; the first input's by default
        allow_pickle: false         # read .bin/.pt/.ckpt checkpoints (only for files you trust)

Relative paths resolve against the recipe's folder, and every local path (inputs, glob matches, outputs) must lie
inside an allowed root: the recipe's folder, plus any folders given as `allowed_roots` (CLI: `--allow-root`).
A string entry with `*`, `?` or `[` is a glob; hub ids must be written as `hub:` entries, so a relative path is
never mistaken for one.
"""

from __future__ import annotations

import difflib
import glob as globlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import AdapterMergeError, InvalidParameterError, OutputPathError, UnknownMethodError
from .io import HUB_PREFIX, check_not_input, is_hub_id
from .methods import get_method, list_methods

__all__ = ["MergeJob", "Recipe", "RecipeError", "load_recipe"]

RecipeWeight = StrictFloat | StrictInt | dict[str, StrictFloat | StrictInt]
_GLOB_CHARS = set("*?[")


class RecipeError(AdapterMergeError, ValueError):
    """A recipe file is unreadable, does not follow the schema, or names something that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterSpec(_Strict):
    """One adapter entry: exactly one of `path`, `glob` or `hub`, and an optional weight."""

    path: str | None = None
    glob: str | None = None
    hub: str | None = None
    weight: RecipeWeight = 1.0

    @field_validator("weight", mode="before")
    @classmethod
    def _number_or_mapping(cls, value: Any) -> Any:
        numbers = (int, float)
        is_number = isinstance(value, numbers) and not isinstance(value, bool)
        is_mapping = isinstance(value, dict) and all(
            isinstance(v, numbers) and not isinstance(v, bool) for v in value.values()
        )
        if not (is_number or is_mapping):
            raise ValueError(f"a weight is a number or a mapping of module patterns to numbers; got {value!r}")
        return value

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not is_hub_id(value):
            raise ValueError(f"a hub id looks like owner/name; got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"glob": value} if _GLOB_CHARS & set(value) else {"path": value}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        given = [name for name in ("path", "glob", "hub") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, glob or hub; got {' and '.join(given) or 'none'}")
        return self


class MergeOptions(_Strict):
    """The fields a merge can take from `defaults`."""

    method: str | None = None
    params: dict[str, Any] | None = None
    rank: int | None = Field(default=None, gt=0)
    format: Literal["peft", "kohya", "diffusers"] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    allow_pickle: bool | None = None


class MergeSpec(MergeOptions):
    """One merge: its adapters and output, plus options that override `defaults`."""

    name: str | None = Field(default=None, min_length=1)
    adapters: list[AdapterSpec] = Field(min_length=1)
    output: str = Field(min_length=1)


class RecipeFile(_Strict):
    """The whole file."""

    version: Literal[1] = 1
    defaults: MergeOptions = MergeOptions()
    merges: list[MergeSpec] = Field(min_length=1)


@dataclass(frozen=True)
class MergeJob:
    """One resolved merge, ready to run in any process: absolute paths or hub ids, plain data only.

    Args:
        name (`str`): the merge's name (for tables and the merged adapter).
        adapters (`tuple[str, ...]`): absolute local paths or `hub:owner/name` ids, in order.
        weights (`tuple`): one weight per adapter (a number or a mapping), passed to `merge_adapters` unchanged.
        method (`str`), params (`dict`), rank (`int`, *optional*): as for `merge_adapters`.
        output (`Path`): the absolute output path.
        format (`str`, *optional*), dtype (`str`, *optional*), allow_pickle (`bool`): output format and dtype name,
            and whether pickle checkpoints may be read.
    """

    name: str
    adapters: tuple[str, ...]
    weights: tuple[Any, ...]
    output: Path
    method: str = "linear"
    params: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    format: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: where it was read from, the allowed roots, and its jobs in file order."""

    path: Path
    roots: tuple[Path, ...]
    jobs: tuple[MergeJob, ...]


def _where(loc: Sequence[int | str], merges: list[Any]) -> str:
    """`merges[1] ('style_mix').adapters[0].weight` for a pydantic error location."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if i == 1 and loc[0] == "merges" and part < len(merges) and isinstance(merges[part], dict):
                name = merges[part].get("name")
                text += f" ({name!r})" if name else ""
        else:
            text += f".{part}" if text else str(part)
    return text or "top level"


def _message(error: Mapping[str, Any]) -> str:
    """Pydantic's message, with the closest known field named for a misspelt one."""
    if error["type"] != "extra_forbidden":
        return error["msg"].removeprefix("Value error, ")
    *parent, name = [part for part in error["loc"] if isinstance(part, str)]
    model = {(): RecipeFile, ("defaults",): MergeOptions, ("merges",): MergeSpec}.get(tuple(parent), AdapterSpec)
    known = list(model.model_fields)
    method_params = {p for m in list_methods() for p in m.param_names} if "params" in known else set()
    close = difflib.get_close_matches(str(name), [*known, *sorted(method_params - set(known))], n=1)
    if close and close[0] in method_params and close[0] not in known:
        hint = f"a method parameter goes under params, as params: {{{close[0]}: ...}}; "
    else:
        hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {name!r}; {hint}known fields: {', '.join(known)}"


def _inside(path: Path, roots: Sequence[Path], where: str, recipe: Path) -> Path:
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise RecipeError(
            f"{recipe}: {where}: {resolved} is outside the allowed roots ({allowed}); move it there or add its "
            "folder with --allow-root"
        )
    return resolved


def _expand(
    entry: AdapterSpec, folder: Path, roots: Sequence[Path], where: str, recipe: Path
) -> list[tuple[str, Any]]:
    """The adapters (absolute path or hub id) one entry stands for, each with the entry's weight."""
    if entry.hub is not None:  # resolved through huggingface_hub only, never as a local path
        return [(HUB_PREFIX + entry.hub, entry.weight)]
    if entry.path is not None:
        path = _inside(folder / Path(entry.path).expanduser(), roots, f"{where}.path", recipe)
        if not path.exists():
            hint = f" (for a hub id write `hub: {entry.path}`)" if is_hub_id(entry.path) else ""
            raise RecipeError(f"{recipe}: {where}.path: {path} does not exist{hint}")
        return [(str(path), entry.weight)]
    pattern = str(folder / Path(entry.glob).expanduser())
    matches = sorted(globlib.glob(pattern, recursive=True))
    if not matches:
        raise RecipeError(f"{recipe}: {where}.glob: no file or folder matches {pattern}")
    return [(str(_inside(Path(m), roots, f"{where}.glob", recipe)), entry.weight) for m in matches]


def _job(spec: MergeSpec, defaults: MergeOptions, folder: Path, roots: Sequence[Path], where: str, recipe: Path):
    options = {name: getattr(spec, name) for name in MergeOptions.model_fields}
    options = {name: value if value is not None else getattr(defaults, name) for name, value in options.items()}
    method, params = options["method"] or "linear", options["params"] or {}
    try:
        merge_method = get_method(method)
        checked = dict(params)
        if "rank" in merge_method.param_names and options["rank"] is not None:
            checked["rank"] = options["rank"]
        merge_method.make_params(checked)
    except UnknownMethodError as err:
        raise RecipeError(f"{recipe}: {where}.method: {err}") from None
    except InvalidParameterError as err:
        raise RecipeError(f"{recipe}: {where}.params: {err}") from None
    adapters = [
        item
        for i, entry in enumerate(spec.adapters)
        for item in _expand(entry, folder, roots, f"{where}.adapters[{i}]", recipe)
    ]
    output = _inside(folder / Path(spec.output).expanduser(), roots, f"{where}.output", recipe)
    try:
        check_not_input(output, [a for a, _ in adapters])
    except OutputPathError as err:
        raise RecipeError(f"{recipe}: {where}.output: {err}") from None
    return MergeJob(
        name=spec.name or output.stem,
        adapters=tuple(a for a, _ in adapters),
        weights=tuple(w for _, w in adapters),
        output=output,
        method=method,
        params=dict(params),
        rank=options["rank"],
        format=options["format"],
        dtype=options["dtype"],
        allow_pickle=bool(options["allow_pickle"]),
    )


def load_recipe(path: str | Path, *, allowed_roots: Sequence[str | Path] = ()) -> Recipe:
    """Read and validate a recipe, resolving its paths and globs.

    Args:
        path (`str` or `Path`): the YAML file.
        allowed_roots (`list` of paths, *optional*): folders besides the recipe's own that its paths may point into.

    Returns:
        `Recipe`: the resolved jobs, in file order.

    Raises:
        RecipeError: naming the file, the entry (`merges[1] ('style_mix').adapters[0].weight`) and what is wrong:
            unreadable YAML, schema violations, unknown methods or parameters, paths outside the allowed roots,
            missing inputs, globs that match nothing, duplicate names or outputs, outputs that are, contain or lie
            inside an input.
    """
    import yaml

    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err})") from None
    try:
        recipe = RecipeFile.model_validate(raw)
    except ValidationError as err:
        merges = raw.get("merges") if isinstance(raw, dict) and isinstance(raw.get("merges"), list) else []
        problems = "; ".join(f"{_where(e['loc'], merges)}: {_message(e)}" for e in err.errors())
        raise RecipeError(f"{path}: {problems}") from None
    roots = (path.parent, *(Path(r).expanduser().resolve() for r in allowed_roots))
    jobs = []
    for i, spec in enumerate(recipe.merges):
        where = f"merges[{i}]" + (f" ({spec.name!r})" if spec.name else "")
        jobs.append(_job(spec, recipe.defaults, path.parent, roots, where, path))
    for attribute in ("name", "output"):
        seen: dict[Any, int] = {}
        for i, job in enumerate(jobs):
            first = seen.setdefault(getattr(job, attribute), i)
            if first != i:
                raise RecipeError(
                    f"{path}: merges[{i}].{attribute}: {getattr(job, attribute)} is already used by merges[{first}]; "
                    f"give each merge its own {attribute}"
                )
    return Recipe(path, roots, tuple(jobs))
