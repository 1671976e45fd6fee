"""Trainer layouts of DiT model families, as pure key-name maps onto one canonical naming per family.

A layout (kohya Flux, ComfyUI Wan, ...) names a model's modules as the original training code does (BFL's
`double_blocks.0.img_attn.qkv`, Wan's `blocks.0.self_attn.q`), under a prefix (`lora_unet_`, `diffusion_model.`,
`base_model.model.`) and with its own factor suffixes. A :class:`NameMap` holds one family's rules from original
module paths to canonical ones (the module names of the family's diffusers model, as diffusers' converters write
them), usable both ways; a :class:`Layout` adds the prefix, the suffixes and kohya's flattening, and offers the verbs
of a format module (`detect`, `load`, `save`, `from_state_dict`, `to_state_dict`).

A fused projection (BFL's `qkv`; Flux's single-block `linear1` = q, k, v and the MLP input) is read as one module
per part, each taking its rows of `B` and all of `A`: exact, and still low-rank. Written back, parts that share `A`
(as they do after any merge by concatenation) become `A` and `[B_q; B_k; B_v]`; parts with different `A` become
`[A_q; A_k; A_v]` and a block-diagonal `B` of rank `r_q + r_k + r_v` (in float32 and float64, reduced to the
numerical rank of the stacked `A`, so parts a method gave one row space keep rank `r`; half-precision rounding
leaves no such rank to find). A part an adapter lacks is a zero block.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import AdapterFormatError
from ..lowrank import LowRank, range_basis
from ._source import DictSource, ModuleEntry, TensorSource, lazy_adapter, open_source, take_unused
from ._validate import alpha_tensor, factor_shapes
from ._write import atomic_path, provenance_metadata, save_tensors
from .kohya import component_path

_INDEX = "{i}"
# Key suffixes of full-rank side-car tensors and the kind they are carried as (see `Adapter.side_cars`).
_SIDE_CARS = {".diff": "diff", ".diff_b": "diff_b", ".diff_m": "diff_m", ".lora_B.bias": "diff_b"}
_WRITTEN_SIDE_CARS = {"diff": ".diff", "diff_b": ".diff_b", "diff_m": ".diff_m"}
# ComfyUI saves kohya's factor names under dotted paths, and reads peft's too; its files are written with kohya's.
COMFYUI_FACTORS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def _pattern(template: str, *, flat: bool) -> re.Pattern[str]:
    text = template.replace(".", "_") if flat else template
    return re.compile(re.escape(text).replace(re.escape(_INDEX), r"(?P<i>\d+)"))


@dataclass(frozen=True)
class Rule:
    """One original module (path template with `{i}` for a block index) and the canonical module(s) it holds.

    Args:
        original (`str`): the path in the original model, e.g. `"double_blocks.{i}.img_attn.qkv"`.
        canonical (`tuple[str, ...]`): the canonical paths below the family's component; several for a fused
            projection, in the order of its rows.
        sizes (`tuple[int, ...]`, *optional*): the parts' relative row counts (Flux `linear1`: q, k, v and the MLP
            input are `(1, 1, 1, 4)`); equal parts when empty.
        swap_halves (`bool`): the two halves of the rows are swapped (BFL's final `adaLN_modulation` is
            shift-then-scale, diffusers' `norm_out.linear` scale-then-shift).
        swap_two_chunks (`bool`): the halves are swapped when the module has exactly two chunks of its input width
            (SD3's last, pre-only context `adaLN_modulation`; the others have six chunks and keep their order).
    """

    original: str
    canonical: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    swap_halves: bool = False
    swap_two_chunks: bool = False

    def swaps(self, out_features: int, in_features: int | None) -> bool:
        """Whether a module of this rule with these widths has its two halves of rows swapped."""
        return self.swap_halves or (self.swap_two_chunks and out_features == 2 * (in_features or 0))

    @functools.cached_property
    def patterns(self) -> dict[bool, re.Pattern[str]]:
        return {flat: _pattern(self.original, flat=flat) for flat in (False, True)}

    @functools.cached_property
    def canonical_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_pattern(name, flat=False) for name in self.canonical)

    def part_sizes(self, out_features: int, where: str) -> list[int]:
        """Rows of each part of a fused module with `out_features` rows."""
        relative = self.sizes or (1,) * len(self.canonical)
        sizes = [out_features * s // sum(relative) for s in relative]
        if sum(sizes) != out_features:
            raise AdapterFormatError(
                f"{where}: the fused module {self.original!r} has {out_features} output rows, which do not split "
                f"into {', '.join(self.canonical)} ({'+'.join(map(str, sizes))})"
            )
        return sizes

    def rows(self, out_features: int, where: str, in_features: int | None = None) -> list[tuple[tuple[int, int], ...]]:
        """The row ranges of `B` (or of a bias) that make each canonical module."""
        if self.swaps(out_features, in_features):
            half = out_features // 2
            return [((half, out_features), (0, half))]
        if len(self.canonical) == 1:
            return [()]
        bounds, start = [], 0
        for size in self.part_sizes(out_features, where):
            bounds.append(((start, start + size),))
            start += size
        return bounds


class NameMap:
    """A family's map between original module paths and canonical module names (`<component>.<path>`).

    Args:
        component (`str`): the pipeline component the canonical names start with (`"transformer"`).
        rules (`Sequence[Rule]`): the modules that are renamed, split or permuted.
        identity (`bool`): every other path keeps its name (the original names are the diffusers names).
    """

    def __init__(self, component: str, rules: Sequence[Rule] = (), *, identity: bool = False) -> None:
        self.component = component
        self.rules = tuple(rules)
        self.identity = identity

    def to_canonical(self, path: str, *, flat: bool = False) -> tuple[Rule, list[str]] | None:
        """The rule for an original path and the canonical names it holds; None when no rule knows the path."""
        for rule in self.rules:
            if match := rule.patterns[flat].fullmatch(path):
                names = [name.replace(_INDEX, match["i"]) if match.groupdict() else name for name in rule.canonical]
                return rule, [f"{self.component}.{name}" for name in names]
        if self.identity and not flat:
            return Rule(path, (path,)), [f"{self.component}.{path}"]
        return None

    def from_canonical(self, name: str) -> tuple[str, int, Rule] | None:
        """`(original path, part index, rule)` of a canonical module name; None when the map cannot name it."""
        component, _, path = name.partition(".")
        if component != self.component:
            return None
        for rule in self.rules:
            for index, pattern in enumerate(rule.canonical_patterns):
                if match := pattern.fullmatch(path):
                    original = rule.original.replace(_INDEX, match["i"]) if match.groupdict() else rule.original
                    return original, index, rule
        return (path, 0, Rule(path, (path,))) if self.identity else None


def _sizes(rule: Rule, known: Mapping[int, int], where: str) -> list[int]:
    """Every part's rows of a fused module, from the rows of the parts at hand."""
    relative = rule.sizes or (1,) * len(rule.canonical)
    index, rows = next(iter(known.items()))
    sizes = [rows * s // relative[index] for s in relative]
    if any(sizes[i] != rows for i, rows in known.items()):
        raise AdapterFormatError(f"{where}: the parts of {rule.original!r} have {dict(known)} rows, expected {sizes}")
    return sizes


def join_rows(
    rule: Rule, parts: Mapping[int, torch.Tensor], where: str, in_features: int | None = None
) -> torch.Tensor:
    """One module's dense side-car from its canonical parts (zeros for a part that has none), rows put back."""
    if rule.swaps(parts[0].shape[0] if 0 in parts else 0, in_features):
        half = parts[0].shape[0] // 2
        return torch.cat([parts[0][half:], parts[0][:half]])
    if len(rule.canonical) == 1:
        return parts[0]
    first = next(iter(parts.values()))
    sizes = _sizes(rule, {i: t.shape[0] for i, t in parts.items()}, where)
    return torch.cat(
        [parts[i] if i in parts else first.new_zeros(size, *first.shape[1:]) for i, size in enumerate(sizes)]
    )


def _same_factor(A: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether two parts' `A` are one factor: equal, or equal up to one rounding in their dtype (a method that
    computes each part's `A` on its own, such as TIES in core space, gets the same `A` up to rounding, and a
    half-precision output turns that into one-ulp differences)."""
    if A.shape != first.shape:
        return False
    if torch.equal(A, first):
        return True
    eps = torch.finfo(torch.promote_types(A.dtype, first.dtype)).eps
    a, b = A.to(torch.float32), first.to(torch.float32)
    return bool(((a - b).abs() <= eps * torch.maximum(a.abs(), b.abs())).all())


def join_parts(rule: Rule, parts: Mapping[int, LowRank], where: str) -> LowRank:
    """One module's update from its canonical parts: rows permuted back, or fused projections joined exactly."""
    if rule.swaps(parts[0].out_features if 0 in parts else 0, parts[0].in_features if 0 in parts else None):
        lowrank = parts[0]
        return LowRank(lowrank.A, join_rows(rule, {0: lowrank.B}, where, lowrank.in_features), lowrank.kernel_size)
    if len(rule.canonical) == 1:
        return parts[0]
    present = [parts[i] for i in sorted(parts)]
    if any(lr.magnitude is not None for lr in present):
        raise AdapterFormatError(f"{where}: DoRA parts of a fused projection cannot be written as one module")
    dtype = functools.reduce(torch.promote_types, (lr.dtype for lr in present))
    first = present[0].A
    if all(_same_factor(lr.A, first) for lr in present):
        # Parts that share A (as read, or merged by concatenation) keep it: rank stays r.
        return LowRank(first.to(dtype), join_rows(rule, {i: lr.B.to(dtype) for i, lr in parts.items()}, where))
    sizes = _sizes(rule, {i: lr.out_features for i, lr in parts.items()}, where)
    work = torch.promote_types(dtype, torch.float32)
    A = torch.cat([lr.A.to(work) for lr in present])
    B = A.new_zeros(sum(sizes), A.shape[0])
    row, column = 0, 0
    for i, size in enumerate(sizes):
        if i in parts:
            B[row : row + size, column : column + parts[i].rank] = parts[i].B
            column += parts[i].rank
        row += size
    # `[A_q; A_k; A_v]` may span fewer directions than its rows (parts merged by a method that computed one A per
    # part in the same row space): `A = Rᵀ (Xᵀ A)` with `Xᵀ A` a basis of its row space keeps `B A` to float
    # precision at the numerical rank of the stack. Half-precision factors carry rounding noise in every direction,
    # so their stack has full rank and is kept as is.
    if torch.finfo(dtype).bits < 32:
        return LowRank(A.to(dtype), B.to(dtype))
    X, R = range_basis(A.T, singular_vectors=False)
    if X.shape[1] == A.shape[0]:
        return LowRank(A.to(dtype), B.to(dtype))
    return LowRank((X.T.to(work) @ A).to(dtype), (B @ R.T.to(work)).to(dtype))


@dataclass(frozen=True)
class Layout:
    """One trainer's key layout of one model family: the verbs of a format module over a :class:`NameMap`.

    Args:
        name (`str`): the format name (`"kohya-flux"`), as `--format` takes it.
        family (`str`, *optional*): the model family (`"Flux.1"`); None when the module names tell it.
        names (`NameMap`): the family's module names.
        prefix (`str`): the prefix of the family model's keys (`"lora_unet_"`).
        flat (`bool`): module paths have every `.` turned into `_` (kohya).
        factors (`tuple`): `(down, up)` key suffixes it reads; the first pair is written.
        text_encoders (`Mapping[str, str]`): other key prefixes and the component they hold, with paths kept as the
            host library names them (kohya-flattened when `flat`).
        marker (`str`, *optional*): a regex some module path must match for detection, when `names` is an identity.
        alphas (`bool`, defaults to `True`): written files carry `.alpha` (= rank; the scale is folded into `up`).
        shapes_fit (`Callable`, *optional*): for a family whose original names are another's (Flux.2 and Flux.1), a
            test of the file's `{canonical name: (out, in)}` (modules with one canonical name) that detection needs.
    """

    name: str
    family: str | None
    names: NameMap
    prefix: str
    flat: bool = False
    factors: tuple[tuple[str, str], ...] = ((".lora_down.weight", ".lora_up.weight"),)
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    marker: str | None = None
    alphas: bool = True
    shapes_fit: Callable[[Mapping[str, tuple[int, int]]], bool] | None = None

    def _roles(self) -> dict[str, str]:
        roles = {suffix: role for pair in self.factors for suffix, role in zip(pair, ("down", "up"))}
        return {**roles, ".alpha": "alpha", **_SIDE_CARS}

    def _split(self, key: str) -> tuple[str, str] | None:
        return next(((key[: -len(s)], role) for s, role in self._roles().items() if key.endswith(s)), None)

    def _targets(self, stem: str, *, side_car: bool = False) -> tuple[Rule, list[str]] | None:
        """The rule and canonical names of a key stem; a side-car of a module no rule knows keeps its path."""
        for prefix, component in self.text_encoders.items():
            if stem.startswith(prefix):
                path = stem[len(prefix) :]
                return Rule(path, (path,)), [component_path(component, path, flat=self.flat)]
        if not stem.startswith(self.prefix):
            return None
        path = stem[len(self.prefix) :]
        found = self.names.to_canonical(path, flat=self.flat)
        if found is None and side_car:
            return Rule(path, (path,)), [component_path(self.names.component, path, flat=self.flat)]
        return found

    def detect(self, path: Path, keys: list[str], source: TensorSource | None = None) -> bool:
        """A file whose keys all carry this layout's prefixes and most of whose LoRA modules are the family's (so a
        file with an odd module is still read, and refused or skipped by name; families that share a few names, such
        as Flux.1 and SD3 `final_layer`, are told apart). With an identity name map, one module matches the marker;
        with `shapes_fit`, the modules' shapes (read from `source`, the file's header) must fit too."""
        if path.is_dir() or not keys or not all(k.startswith((self.prefix, *self.text_encoders)) for k in keys):
            return False
        stems: dict[str, dict[str, str]] = {}
        for k in keys:
            if k.startswith(self.prefix) and (split := self._split(k)) and split[1] in ("down", "up"):
                stems.setdefault(split[0][len(self.prefix) :], {})[split[1]] = k
        if self.marker is not None:
            return any(re.search(self.marker, stem) for stem in stems)
        found = {stem: self.names.to_canonical(stem, flat=self.flat) for stem in stems}
        if sum(target is not None for target in found.values()) <= len(stems) / 2:
            return False
        if self.shapes_fit is None:
            return True
        source = source or open_source(path)
        shapes = {
            target[1][0]: (source.shape(stems[stem]["up"])[0], source.shape(stems[stem]["down"])[1])
            for stem, target in found.items()
            if target is not None and len(target[1]) == 1 and len(stems[stem]) == 2
        }
        return self.shapes_fit(shapes)

    def parse(self, source: TensorSource) -> tuple[dict, dict]:
        """What a state dict in this layout holds, under canonical names.

        Returns:
            `(entries, side_cars)`: module name → :class:`ModuleEntry`, and side-car name → `(key, rows)`.

        Raises:
            AdapterFormatError: for keys nothing understands (outside `skipping_unknown_keys`) and factors that do
                not pair.
        """
        keys = source.keys()
        found: dict[str, dict[str, str]] = {}
        for key in keys:
            if split := self._split(key):
                found.setdefault(split[0], {})[split[1]] = key
        entries: dict[str, ModuleEntry] = {}
        side_cars: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {}
        used: set[str] = set()
        for stem, roles in found.items():
            has_factors = "down" in roles or "up" in roles
            targets = self._targets(stem, side_car=not has_factors)
            if targets is None:
                continue
            rule, names = targets
            where = f"{source.name}: {stem}"
            if has_factors:
                if "down" not in roles or "up" not in roles:
                    raise AdapterFormatError(f"{source.name}: module {stem!r} has only one of its down/up factors")
                rank = factor_shapes(source, stem, roles["down"], roles["up"])[0][0]
                alpha = alpha_tensor(source, roles["alpha"], stem) if "alpha" in roles else 0.0
                scale = alpha / rank if alpha else 1.0
                in_features = source.shape(roles["down"])[1]
                for name, rows in zip(names, rule.rows(source.shape(roles["up"])[0], where, in_features)):
                    if name in entries:
                        raise AdapterFormatError(
                            f"{source.name}: two modules map to {name!r} (the second is {stem!r})"
                        )
                    entries[name] = ModuleEntry(roles["down"], roles["up"], scale, rows=rows)
            for kind in set(roles) & set(_SIDE_CARS.values()):
                key = roles[kind]
                for name, rows in zip(names, rule.rows(source.shape(key)[0], where)):
                    side_cars[f"{name}.{kind}"] = (key, rows)
            used.update(roles.values())
        take_unused(keys, used, source, self.name)
        return entries, side_cars

    def _adapter(self, source: TensorSource, name: str) -> Adapter:
        entries, side_cars = self.parse(source)
        return lazy_adapter(source, entries, name, side_cars, format=self.name)

    def load(self, path: str | Path, *, allow_pickle: bool = False) -> Adapter:
        """Read a LoRA file in this layout, lazily, under the family's canonical module names."""
        path = Path(path)
        if path.is_dir():
            raise AdapterFormatError(f"{path}: a {self.name} LoRA is one file; pass the file itself")
        return self._adapter(open_source(path, allow_pickle=allow_pickle), path.stem)

    def from_state_dict(self, state_dict: Mapping[str, torch.Tensor], name: str = "adapter") -> Adapter:
        """An adapter from an in-memory state dict in this layout."""
        return self._adapter(DictSource(state_dict, name=name), name)

    def _stem(self, name: str, *, side_car: bool = False) -> tuple[str, int, Rule]:
        if found := self.names.from_canonical(name):
            original, index, rule = found
            return self.prefix + (original.replace(".", "_") if self.flat else original), index, rule
        component, _, path = name.partition(".")
        prefix = next((p for p, c in self.text_encoders.items() if c == component), None)
        if side_car and component == self.names.component:
            prefix = self.prefix  # a side-car of a module no rule knows was read with its original path
        if prefix is None or not path:
            raise AdapterFormatError(
                f"module {name!r} has no name in the {self.name} layout; write the adapter with "
                "--format diffusers or --format peft"
            )
        return prefix + (path.replace(".", "_") if self.flat else path), 0, Rule(path, (path,))

    def to_state_dict(self, adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The state dict of an adapter in this layout: fused projections joined, scale folded, alpha = rank.

        Raises:
            AdapterFormatError: for modules the layout cannot name, DoRA modules, or an empty adapter.
        """
        if not len(adapter):
            raise AdapterFormatError(f"adapter {adapter.name!r} has no modules to write")
        dtype = dtype or adapter.metadata.dtype
        groups: dict[str, tuple[Rule, dict[int, LowRank]]] = {}
        for name, lowrank in adapter.items():
            if lowrank.magnitude is not None:
                raise AdapterFormatError(
                    f"adapter {adapter.name!r}, module {name!r} is a DoRA module; {self.name} files hold plain LoRA, "
                    "so write it with --format diffusers or --format peft"
                )
            stem, index, rule = self._stem(name)
            groups.setdefault(stem, (rule, {}))[1][index] = lowrank
        down_suffix, up_suffix = self.factors[0]
        where = f"adapter {adapter.name!r}"
        tensors: dict[str, torch.Tensor] = {}
        for stem, (rule, parts) in groups.items():
            down, up = join_parts(rule, parts, where).to(dtype).weights()
            tensors[stem + down_suffix] = down
            tensors[stem + up_suffix] = up
            if self.alphas:
                tensors[stem + ".alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
        side_cars: dict[tuple[str, str], tuple[Rule, dict[int, torch.Tensor]]] = {}
        for name, tensor in adapter.side_cars.items():
            module, _, kind = name.rpartition(".")
            stem, index, rule = self._stem(module, side_car=True)
            side_cars.setdefault((stem, kind), (rule, {}))[1][index] = tensor
        for (stem, kind), (rule, parts) in side_cars.items():
            tensors[stem + _WRITTEN_SIDE_CARS[kind]] = join_rows(rule, parts, where).to(dtype)
        return tensors

    def save(
        self, adapter: Adapter, path: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None
    ) -> Path:
        """Write `adapter` as one `.safetensors` file in this layout, atomically. Returns the file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise AdapterFormatError(f"{path}: a {self.name} LoRA is one file; give a path ending in .safetensors")
        tensors = self.to_state_dict(adapter, dtype)
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_tensors(tensors, tmp, {"format": "pt", **provenance_metadata(adapter.metadata.extra)})
        return path
