"""Verbs for reversible bundles (the `rmm` method): `recover`, and the bundle summary shown by `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..bundle import load_bundle
from ..io import save_adapter
from ._options import DTYPES, dtype_option, format_option, overwrite_option


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "-t", required=True, help="The task to recover: the name of one of the merged adapters.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the adapter.")
@format_option
@dtype_option
@overwrite_option
def recover(
    bundle: Path, task: str, output: Path, output_format: str | None, dtype: str | None, overwrite: bool
) -> None:
    """Write the adapter of one TASK, rebuilt from the reversible BUNDLE made by `merge --method rmm`.

    Exact when the bundle kept as many basis updates as it has tasks (`--basis-size` = number of adapters);
    otherwise the best approximation the basis allows, brought back to the task's own rank.

    \b
    Example:
      adaptermerge merge a/ b/ c/ --method rmm --basis-size 2 -o bundle/
      adaptermerge recover bundle/ --task b -o b_recovered/
    """
    loaded = load_bundle(bundle)
    adapter = loaded.recover(task)
    path = save_adapter(
        adapter, output, format=output_format, overwrite=overwrite, dtype=DTYPES[dtype] if dtype else None
    )
    click.echo(f"Recovered task {task!r} from {bundle} into {path} ({len(adapter)} modules)")


def show_bundle(path: str, *, as_json: bool) -> None:
    """Print a bundle's tasks, basis size, storage against the separate adapters, and reconstruction errors."""
    info = load_bundle(path).storage()
    if as_json:
        click.echo(json.dumps({"path": str(path), "kind": "rmm_bundle", **info}, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{path}[/bold]  reversible bundle (rmm)  tasks={', '.join(info['tasks'])}  "
        f"basis_size={info['basis_size']}  modules={info['modules']}  dtype={info['dtype']}"
    )
    console.print(
        f"storage: bundle {info['bundle_parameters']:,} parameters ({info['bundle_bytes']:,} bytes) vs "
        f"{len(info['tasks'])} separate adapters {info['separate_parameters']:,} parameters "
        f"({info['separate_bytes']:,} bytes): ratio {info['size_ratio']:.3f}"
    )
    table = Table(
        "module", "shape", "task ranks", "basis kept", "basis rank", "parameters", "separate", "rel. error² (factors)"
    )
    for m in info["per_module"]:
        table.add_row(
            m["module"],
            "×".join(map(str, m["shape"])),
            ",".join(map(str, m["task_ranks"])),
            str(m["basis_kept"]),
            str(m["basis_rank"]),
            f"{m['parameters']:,}",
            f"{m['separate_parameters']:,}",
            f"{m['relative_residual']:.3g}",
        )
    console.print(table)


COMMANDS = [recover]
