"""The single-adapter verbs: `merge`, `inspect`, `convert` and `methods`."""

from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path
from typing import Any

import click

from ._catalog import TRY_FIRST, load_catalog
from ._console import console, is_quiet, print_json, shared_prefix, spinner, table
from ._options import (
    FORMATS,
    allow_pickle_option,
    dtype_option,
    format_option,
    json_option,
    method_options,
    output_format_option,
    overwrite_option,
    parse_weights,
    pop_method_params,
    renamed_option,
    skip_unknown_option,
    torch_dtype,
)


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
      adaptermerge merge a/ b/ -o ab/                   exact sum, rank = Σ ranks
      adaptermerge merge a/ b/ -w 0.7,0.3 -r 16 -o ab/  weighted, rank 16
      adaptermerge merge a.safetensors b.safetensors -m ties -o ab.safetensors
    """
    from ..io import check_not_input, save_adapter
    from ..io._write import check_writable
    from ..merge import load_adapters, merge_adapters
    from ..methods import get_method
    from ..training.orthogonal import check_disjoint

    params = pop_method_params(kwargs)
    chosen, rank = get_method(method), kwargs["rank"]
    chosen.make_params({**params, "rank": rank} if rank is not None and "rank" in chosen.param_names else params)
    check_writable(output, kwargs["overwrite"], directory=True)  # exists? before any work (the writer checks the rest)
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
        dtype=torch_dtype(kwargs["dtype"]),
        allow_pickle=kwargs["allow_pickle"],
        base=kwargs["base"],
        progressbar=not is_quiet(ctx),
        **params,
    )
    with spinner(f"writing {output}"):
        if hasattr(merged, "save"):  # a method whose result is not an adapter (rmm's bundle) saves itself
            path = merged.save(output, overwrite=kwargs["overwrite"])
        else:
            path = save_adapter(merged, output, format=kwargs["output_format"], overwrite=kwargs["overwrite"])
    seconds = f"{time.perf_counter() - start:.2f} s"
    unused = {a.name: a.metadata.extra.get("unused_keys", []) for a in loaded}
    if hasattr(merged, "save"):
        summary = f"{merged!r}, {seconds}"
    else:
        ranks = sorted({lr.rank for lr in merged.values()})
        rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        cars = f"{len(merged.side_cars)} side-car tensors, " if merged.side_cars else ""
        summary = f"{len(merged)} modules, rank {rank}, {cars}{sum(map(len, unused.values()))} unused keys, {seconds}"
    console(ctx).print(f"Merged {len(adapters)} adapters with {method!r} into {path} ({summary})", highlight=False)
    if ctx.find_root().obj.get("verbose"):
        for name, keys in unused.items():
            for key in keys:
                click.echo(f"  unused key of {name}: {key}")


def describe(path: str, *, allow_pickle: bool = False, skip_unknown: bool = False) -> dict[str, Any]:
    """What `inspect` reports about one adapter, as plain data."""
    from ..io import load_adapter, model_family
    from ..lowrank import norm

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
@json_option
@allow_pickle_option
@skip_unknown_option
def inspect(path: str, as_json: bool, allow_pickle: bool, skip_unknown: bool) -> None:
    """Show an adapter's format, base model, modules, ranks, scales, size and per-module update norms.

    Norms are computed on the factors (Frobenius norm of scale·B·A), so this is fast even for large adapters.
    """
    from ..bundle import is_bundle

    if is_bundle(path):
        from ._rmm import show_bundle

        return show_bundle(path, as_json=as_json)
    info = describe(path, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
    if as_json:
        return print_json(info)
    out = console(report=True)
    out.print(
        f"[bold]{info['path']}[/bold]  format={info['format']}  family={info['family'] or '?'}  "
        f"base_model={info['base_model'] or '?'}  "
        f"dtype={info['dtype']}  modules={info['modules']}  parameters={info['parameters']:,}  ranks={info['ranks']}",
        highlight=False,
    )
    modules = [m["module"] for m in info["per_module"]]
    prefix = shared_prefix(modules)
    if prefix:
        out.print(f"Every module name starts with [bold]{prefix}[/bold], left out below.", highlight=False)
    dora = any(m["dora"] for m in info["per_module"])
    columns = ["module", "shape", "rank", "scale", "alpha", "‖ΔW‖"] + (["DoRA"] if dora else [])
    rows = table(*columns, fold=["module"], right=["rank", "scale", "alpha", "‖ΔW‖"])
    for m in info["per_module"]:
        rows.add_row(
            m["module"].removeprefix(prefix),
            "×".join(map(str, m["shape"])),
            str(m["rank"]),
            f"{m['scale']:.4g}",
            f"{m['scale'] * m['rank']:.4g}",
            f"{m['norm']:.4g}",
            *(["yes" if m["dora"] else ""] if dora else []),
        )
    out.print(rows)
    out.print("alpha = scale × rank; ‖ΔW‖ = Frobenius norm of the update scale·B·A.", style="dim")
    if info["side_cars"]:
        heading = "side-car tensor (dense, summed by every method)"
        cars = table(heading, "shape", "‖·‖", fold=[heading], right=["‖·‖"])
        for car in info["side_cars"]:
            cars.add_row(car["name"], "×".join(map(str, car["shape"])), f"{car['norm']:.4g}")
        out.print(cars)
    if info["unused_keys"]:
        out.print(f"{len(info['unused_keys'])} unused keys: {', '.join(info['unused_keys'])}", highlight=False)


@click.command()
@click.argument("path")
@output_format_option("required")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
@dtype_option
@overwrite_option
@allow_pickle_option
@renamed_option("--to", "--format", "output_format", type=click.Choice(FORMATS))
def convert(
    path: str, output_format: str | None, output: Path, dtype: str | None, overwrite: bool, allow_pickle: bool
) -> None:
    """Convert the adapter at PATH to another format; every module's update is kept exactly.

    \b
    Example:
      adaptermerge convert style.safetensors --format peft -o style_peft/
    """
    from ..io import check_not_input, load_adapter, save_adapter

    if output_format is None:
        raise click.UsageError(f"Missing option '--format' (one of: {', '.join(FORMATS)}).")
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    check_not_input(output, [path, *([adapter.metadata.source] if adapter.metadata.source else [])])
    with spinner(f"writing {output}"):
        written = save_adapter(adapter, output, format=output_format, overwrite=overwrite, dtype=torch_dtype(dtype))
    click.echo(f"Wrote {written} ({output_format}, {len(adapter)} modules)")


@click.command()
@json_option
def methods(as_json: bool) -> None:
    """List the merge methods with their parameters and papers."""
    catalog = load_catalog()
    if as_json:
        return print_json([dataclasses.asdict(m) for m in catalog])
    out = console(report=True)
    for method in catalog:  # one block per method, so the paper's link is never cut, however narrow the terminal
        params = ", ".join(p.name for p in method.params) or "-"
        paper = f"  paper: {method.reference_url}"
        if len(paper) > out.width:
            paper = f"  paper:\n{method.reference_url}"
        out.print(f"[bold]{method.name}[/bold] · {method.pretty_name}", highlight=False)
        for text in (method.summary, f"parameters: {params}"):
            out.print(textwrap.fill(text, out.width, initial_indent="  ", subsequent_indent="  "), highlight=False)
        out.print(paper, highlight=False, overflow="ignore", crop=False)
    out.print(textwrap.fill(TRY_FIRST, out.width), highlight=False)


COMMANDS = [merge, inspect, convert, methods]
