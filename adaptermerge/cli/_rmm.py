"""Verbs for reversible bundles (the `rmm` method): `recover`, and the bundle summary shown by `inspect`."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ._console import console, print_json, shared_prefix, spinner, table
from ._options import dtype_option, format_option, json_option, overwrite_option, torch_dtype

WARN_ABOVE = 0.1


def _relative_errors(info: dict) -> dict[str, float]:
    """Module → predicted relative reconstruction error `‖ΔW − ΔŴ‖ / ‖ΔW‖` over the bundle's tasks."""
    return {m["module"]: math.sqrt(max(m["relative_residual"], 0.0)) for m in info["per_module"]}


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "-t", required=True, help="The task to recover: the name of one of the merged adapters.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the adapter.")
@format_option
@dtype_option
@overwrite_option
@click.option(
    "--warn-above",
    type=click.FloatRange(min=0),
    default=WARN_ABOVE,
    help="Warn when a module's relative recovery error exceeds this (0.1 = 10 %).",
)
@json_option
@click.pass_context
def recover(
    ctx: click.Context,
    bundle: Path,
    task: str,
    output: Path,
    output_format: str | None,
    dtype: str | None,
    overwrite: bool,
    warn_above: float,
    as_json: bool,
) -> None:
    """Write the adapter of one TASK, rebuilt from the reversible BUNDLE made by `merge --method rmm`.

    Exact when the bundle kept as many basis updates as it has tasks (`--basis-size` = number of adapters);
    otherwise the best approximation the basis allows, brought back to the task's own rank. Prints how well each
    module is recovered (the relative error the bundle predicts over its tasks) and warns above --warn-above.

    \b
    Example:
      adaptermerge merge a/ b/ c/ --method rmm --basis-size 2 -o bundle/
      adaptermerge recover bundle/ --task b -o b_recovered/
    """
    from ..bundle import load_bundle
    from ..io import save_adapter
    from ..io._write import check_writable

    check_writable(output, overwrite, directory=True)  # exists? before any work (the writer checks the rest)
    loaded = load_bundle(bundle)
    adapter = loaded.recover(task)
    with spinner(f"writing {output}", ctx):
        path = save_adapter(adapter, output, format=output_format, overwrite=overwrite, dtype=torch_dtype(dtype))
    errors = {m: e for m, e in _relative_errors(loaded.storage()).items() if m in adapter}
    poor = {m: e for m, e in sorted(errors.items(), key=lambda item: -item[1]) if e > warn_above}
    if as_json:
        return print_json({"task": task, "output": str(path), "relative_error": errors, "above_threshold": list(poor)})
    values = sorted(errors.values())
    out = console(ctx)
    out.print(f"Recovered task {task!r} from {bundle} into {path} ({len(adapter)} modules)", highlight=False)
    if values:
        out.print(
            f"relative recovery error per module: median {values[len(values) // 2]:.2%}, max {values[-1]:.2%} "
            f"({sum(e <= 1e-6 for e in values)} of {len(values)} exact)",
            highlight=False,
        )
    if poor:
        worst = ", ".join(f"{m} {e:.1%}" for m, e in list(poor.items())[:3])
        click.echo(
            f"Warning: {len(poor)} of {len(errors)} modules recovered with a relative error above {warn_above:.0%} "
            f"(worst: {worst}); a bundle with a larger --basis-size recovers them better.",
            err=True,
        )


def show_bundle(path: str, *, as_json: bool) -> None:
    """Print a bundle's tasks, basis size, storage against the separate adapters, and reconstruction errors."""
    from ..bundle import load_bundle

    info = load_bundle(path).storage()
    if as_json:
        return print_json({"path": str(path), "kind": "rmm_bundle", **info})
    out = console(report=True)
    out.print(
        f"[bold]{path}[/bold]  reversible bundle (rmm)  tasks={', '.join(info['tasks'])}  "
        f"basis_size={info['basis_size']}  modules={info['modules']}  dtype={info['dtype']}",
        highlight=False,
    )
    out.print(
        f"storage: bundle {info['bundle_parameters']:,} parameters ({info['bundle_bytes']:,} bytes) vs "
        f"{len(info['tasks'])} separate adapters {info['separate_parameters']:,} parameters "
        f"({info['separate_bytes']:,} bytes): ratio {info['size_ratio']:.3f}",
        highlight=False,
    )
    prefix = shared_prefix([m["module"] for m in info["per_module"]])
    if prefix:
        out.print(f"Every module name starts with [bold]{prefix}[/bold], left out below.", highlight=False)
    wide = out.width >= 120
    columns = ["module", "shape", "task ranks", "kept"] + (["basis rank", "parameters", "separate"] if wide else [])
    rows = table(*columns, "rel. error", fold=["module", "task ranks"], right=["kept", "rel. error"])
    errors = _relative_errors(info)
    for m in info["per_module"]:
        sizes = [str(m["basis_rank"]), f"{m['parameters']:,}", f"{m['separate_parameters']:,}"]
        rows.add_row(
            m["module"].removeprefix(prefix),
            "×".join(map(str, m["shape"])),
            ",".join(map(str, m["task_ranks"])),
            str(m["basis_kept"]),
            *(sizes if wide else []),
            f"{errors[m['module']]:.2%}",
        )
    out.print(rows)
    out.print(
        "rel. error: ‖ΔW − ΔŴ‖ / ‖ΔW‖ over the tasks, predicted by the basis"
        + ("" if wide else "; sizes per module: --json or a wider terminal"),
        style="dim",
    )


COMMANDS = [recover]
