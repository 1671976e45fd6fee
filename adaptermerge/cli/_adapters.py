"""The single-adapter verbs: `merge`, `inspect`, `convert` and `methods`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..bundle import is_bundle
from ..io import check_not_input, load_adapter, model_family, save_adapter
from ..lowrank import norm
from ..merge import load_adapters, merge_adapters
from ..methods import list_methods
from ..methods.advice import TRY_FIRST
from ..training.orthogonal import check_disjoint
from ._options import (
    DTYPES,
    FORMAT_NAMES,
    allow_pickle_option,
    dtype_option,
    format_option,
    method_options,
    overwrite_option,
    parse_weights,
    pop_method_params,
    skip_unknown_option,
)
from ._rmm import show_bundle


def _quiet(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
@click.option(
    "--method",
    "-m",
    default="linear",
    help="Merge method; `adaptermerge methods` lists them. `linear` is the exact weighted sum.",
)
@click.option(
    "--weights",
    "-w",
    default=None,
    help="One weight per adapter, comma-separated (0.7,0.3), or a .json/.yaml file with a list; 1.0 each by default.",
)
@click.option("--rank", "-r", type=int, default=None, help="Output rank per module (low-rank SVD truncation).")
@click.option(
    "--base",
    default=None,
    help="Base model (folder, file or hub id), read one layer at a time; needed to merge DoRA adapters exactly.",
)
@format_option
@dtype_option
@overwrite_option
@allow_pickle_option
@skip_unknown_option
@method_options
@click.pass_context
def merge(ctx: click.Context, adapters: tuple[str, ...], output: Path, method: str, weights: str | None, **kwargs):
    """Merge ADAPTERS (PEFT folders, .safetensors LoRA files or hub ids) into one adapter at OUTPUT.

    Everything happens on the low-rank factors: no base model is loaded and no full-size weight matrix is built.

    \b
    Examples:
      adaptermerge merge a/ b/ -o ab/                              exact sum, rank = sum of ranks
      adaptermerge merge a/ b/ -w 0.7,0.3 --rank 16 -o ab/         weighted, truncated to rank 16
      adaptermerge merge a.safetensors b.safetensors -m ties --density 0.3 -o ab.safetensors
    """
    params = pop_method_params(kwargs)
    start = time.perf_counter()
    loaded = load_adapters(list(adapters), allow_pickle=kwargs["allow_pickle"], skip_unknown=kwargs["skip_unknown"])
    sources = [a.metadata.source for a in loaded if a.metadata.source]
    check_not_input(output, [*adapters, *sources, *([kwargs["base"]] if kwargs["base"] else [])])
    check_disjoint(loaded)  # warns when orthogonal-adaptation concepts were given overlapping basis blocks
    merged = merge_adapters(
        loaded,
        parse_weights(weights),
        method,
        rank=kwargs["rank"],
        dtype=DTYPES[kwargs["dtype"]] if kwargs["dtype"] else None,
        allow_pickle=kwargs["allow_pickle"],
        base=kwargs["base"],
        progressbar=not _quiet(ctx),
        **params,
    )
    if hasattr(merged, "save"):  # a method that returns something other than an adapter (rmm's bundle) saves itself
        return click.echo(f"Wrote {merged!r} to {merged.save(output, overwrite=kwargs['overwrite'])}")
    path = save_adapter(merged, output, format=kwargs["output_format"], overwrite=kwargs["overwrite"])
    if not _quiet(ctx):
        ranks = sorted({lr.rank for lr in merged.values()})
        unused = {a.name: a.metadata.extra.get("unused_keys", []) for a in loaded}
        click.echo(
            f"Merged {len(adapters)} adapters with {method!r} into {path} "
            f"({len(merged)} modules, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, "
            f"{len(merged.side_cars)} side-car tensors, {sum(map(len, unused.values()))} unused keys, "
            f"{time.perf_counter() - start:.2f} s)"
        )
        if ctx.find_root().obj.get("verbose"):
            for name, keys in unused.items():
                for key in keys:
                    click.echo(f"  unused key of {name}: {key}")


def describe(path: str, *, allow_pickle: bool = False, skip_unknown: bool = False) -> dict[str, Any]:
    """What `inspect` reports about one adapter, as plain data."""
    adapter = load_adapter(path, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
    modules = []
    for name, lowrank in adapter.items():
        entry = getattr(adapter.modules, "entries", {}).get(name)
        modules.append(
            {
                "module": name,
                "shape": list(lowrank.shape) + list(lowrank.kernel_size),
                "rank": lowrank.rank,
                "scale": getattr(entry, "scale", 1.0),  # a LoHa/LoKr module's scale is folded at read time
                "parameters": lowrank.num_parameters,
                "norm": float(norm(lowrank)),
                "dora": lowrank.magnitude is not None,
            }
        )
    return {
        "path": str(path),
        "format": adapter.metadata.format,
        "family": model_family(adapter),
        "base_model": adapter.metadata.base_model,
        "dtype": str(adapter.metadata.dtype).removeprefix("torch."),
        "modules": len(modules),
        "parameters": sum(m["parameters"] for m in modules),
        "ranks": sorted({m["rank"] for m in modules}),
        "per_module": modules,
        "side_cars": [
            {"name": name, "shape": list(tensor.shape), "norm": float(tensor.double().norm())}
            for name, tensor in adapter.side_cars.items()
        ],
        "unused_keys": list(adapter.metadata.extra.get("unused_keys", [])),
    }


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines instead of a table.")
@allow_pickle_option
@skip_unknown_option
def inspect(path: str, as_json: bool, allow_pickle: bool, skip_unknown: bool) -> None:
    """Show an adapter's format, base model, modules, ranks, scales, size and per-module update norms.

    Norms are computed on the factors (Frobenius norm of scale·B·A), so this is fast even for large adapters.
    """
    if is_bundle(path):
        return show_bundle(path, as_json=as_json)
    info = describe(path, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{info['path']}[/bold]  format={info['format']}  family={info['family'] or '?'}  "
        f"base_model={info['base_model'] or '?'}  "
        f"dtype={info['dtype']}  modules={info['modules']}  parameters={info['parameters']:,}  ranks={info['ranks']}"
    )
    table = Table("module", "shape", "rank", "scale", "alpha≡scale·r", "‖ΔW‖", "DoRA")
    table.columns[0].no_wrap = True
    for m in info["per_module"]:
        table.add_row(
            m["module"],
            "×".join(map(str, m["shape"])),
            str(m["rank"]),
            f"{m['scale']:.4g}",
            f"{m['scale'] * m['rank']:.4g}",
            f"{m['norm']:.4g}",
            "yes" if m["dora"] else "",
        )
    console.print(table)
    if info["side_cars"]:
        side_cars = Table("side-car tensor (dense, summed by every method)", "shape", "‖·‖")
        for car in info["side_cars"]:
            side_cars.add_row(car["name"], "×".join(map(str, car["shape"])), f"{car['norm']:.4g}")
        console.print(side_cars)
    if info["unused_keys"]:
        console.print(f"{len(info['unused_keys'])} unused keys: {', '.join(info['unused_keys'])}")


@click.command()
@click.argument("path")
@click.option(
    "--to", "to_format", type=click.Choice(FORMAT_NAMES), required=True, help="Target format or trainer layout."
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
@dtype_option
@overwrite_option
@allow_pickle_option
def convert(path: str, to_format: str, output: Path, dtype: str | None, overwrite: bool, allow_pickle: bool) -> None:
    """Convert the adapter at PATH to another format; every module's update is kept exactly."""
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    check_not_input(output, [path, *([adapter.metadata.source] if adapter.metadata.source else [])])
    written = save_adapter(
        adapter, output, format=to_format, overwrite=overwrite, dtype=DTYPES[dtype] if dtype else None
    )
    click.echo(f"Wrote {written} ({to_format}, {len(adapter)} modules)")


@click.command()
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    table = Table("method", "what it does", "parameters", "paper")
    for method in list_methods():
        table.add_row(method.name, method.summary, ", ".join(method.param_names) or "-", method.reference_url)
    console = Console()
    console.print(table)
    console.print(TRY_FIRST)


COMMANDS = [merge, inspect, convert, methods]
