"""The batch verbs: `run RECIPE.yaml` and the `library` group (`scan`, `similarity`).

Exit codes: 0 when everything succeeded (skipped outputs count as success), 1 when a job failed, 2 for an
invalid recipe or other bad input.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..batch import BACKENDS, JobResult
from ..errors import IncompatibleAdaptersError
from ._console import console, is_quiet, print_json, spinner, table
from ._options import allow_pickle_option, json_option, overwrite_option, renamed_option

backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="local",
    help="Run on a local process pool, or on a Ray cluster (pip install 'adaptermerge[ray]').",
)
ray_address_option = click.option(
    "--ray-address",
    default=None,
    help="Ray cluster address (auto, ray://host:10001); a new local Ray instance by default.",
)
workers_option = click.option(
    "--workers",
    "-j",
    type=click.IntRange(min=0),
    default=None,
    help="Worker processes (local: 0 runs in this process; ray: CPUs of a new local instance). CPUs by default.",
)


def _shown(path: str | Path, folder: Path) -> str:
    """A path relative to the recipe's folder when it lies inside it (hub ids unchanged)."""
    path, folder = Path(path), folder.resolve()
    return str(path.relative_to(folder)) if path.is_absolute() and path.is_relative_to(folder) else str(path)


def _summary(results: list[JobResult], folder: Path) -> Table:
    styles = {"done": "green", "skipped": "yellow", "failed": "red"}
    rows = table("merge", "status", "output", "time", "details", fold=["merge", "output", "details"], title="summary")
    for r in results:
        seconds = f"{r.seconds:.2f} s" if r.status != "skipped" else ""
        rows.add_row(r.name, f"[{styles[r.status]}]{r.status}[/]", _shown(r.output, folder), seconds, r.message)
    return rows


def _print_plan(jobs: list, folder: Path, overwrite: bool, out: Console) -> None:
    """`run --dry-run`: one block per merge (its adapters with their weights, one per line), whole paths."""
    for job in jobs:
        status = "exists: skip" if job.output.exists() and not overwrite else "would run"
        rank = f" · rank {job.rank}" if job.rank else ""
        params = "".join(f" · {k}={v}" for k, v in job.params.items())
        out.print(f"[bold]{job.name}[/bold] · {job.method}{params}{rank} · {status}", highlight=False)
        for adapter, weight in zip(job.adapters, job.weights):
            out.print(f"  {weight} × {_shown(adapter, folder)}", highlight=False, overflow="fold")
        out.print(f"  → {_shown(job.output, folder)}", highlight=False, overflow="fold")


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate the recipe and list what would run, without merging.")
@click.option("--overwrite", is_flag=True, help="Redo merges whose output exists (they are skipped otherwise).")
@click.option(
    "--allow-root",
    "allow_roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder the recipe's paths may point into, besides the recipe's own folder (repeatable).",
)
@backend_option
@ray_address_option
@workers_option
@json_option
@renamed_option("--force", "--overwrite", "overwrite", is_flag=True)
@click.pass_context
def run(
    ctx: click.Context,
    recipe: Path,
    dry_run: bool,
    overwrite: bool,
    as_json: bool,
    allow_roots: tuple[Path, ...],
    backend: str,
    ray_address: str | None,
    workers: int | None,
) -> None:
    """Run every merge of a RECIPE (YAML); outputs that already exist are skipped, so a rerun resumes.

    The schema is documented in examples/recipe.yaml. A failed merge is reported and the others still run;
    the exit code is 1 if any failed, 2 if the recipe is invalid.

    \b
    Examples:
      adaptermerge run recipe.yaml --dry-run
      adaptermerge run recipe.yaml --workers 4
      adaptermerge run recipe.yaml --backend ray --ray-address auto
    """
    from ..batch import run_jobs
    from ..recipes import load_recipe

    loaded = load_recipe(recipe, allowed_roots=allow_roots)
    out = console(ctx)
    if dry_run and as_json:
        return print_json([{**dataclasses.asdict(job), "exists": job.output.exists()} for job in loaded.jobs])
    if dry_run:
        out.print(f"{recipe} (dry run): {len(loaded.jobs)} merges", highlight=False)
        return _print_plan(loaded.jobs, recipe.parent, overwrite, out)
    results = run_jobs(
        loaded.jobs,
        force=overwrite,
        backend=backend,
        workers=workers,
        ray_address=ray_address,
        progressbar=not is_quiet(ctx) and not as_json,
    )
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
    else:
        out.print(_summary(results, recipe.parent))
        out.print(", ".join(f"{n} {s}" for s, n in counts.items()))
        if counts["skipped"]:
            out.print("Skipped merges' outputs exist already; --overwrite redoes them.")
    if counts["failed"]:
        for r in results:
            if r.status == "failed":
                click.echo(f"Error: {r.name}: {r.message}", err=True)
        sys.exit(1)


@click.group()
def library() -> None:
    """Index a folder of adapters, and measure how their updates overlap."""


@library.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the index (.json or .csv).",
)
@allow_pickle_option
@json_option
@click.pass_context
def scan(ctx: click.Context, folder: Path, output: Path | None, allow_pickle: bool, as_json: bool) -> None:
    """Index the adapters in FOLDER (any format, searched recursively): base model, ranks, modules, size.

    Only file headers are read. Files that cannot be read are listed with the reason.
    """
    from ..library import scan_library

    if output is not None and output.suffix not in (".json", ".csv"):
        raise click.BadParameter("the index is written as .json or .csv", param_hint="--output")
    index = scan_library(folder, allow_pickle=allow_pickle)
    written = index.write(output) if output is not None else None
    if as_json:
        entries = [dataclasses.asdict(e) for e in index.entries]
        unreadable = [{"path": p, "reason": r} for p, r in index.unreadable]
        return print_json({"folder": str(folder), "adapters": entries, "unreadable": unreadable})
    out = console(ctx)
    columns = ("adapter", "format", "family", "base model", "modules", "ranks", "MiB")
    rows = table(*columns, fold=["adapter", "base model", "ranks"])
    for e in index.entries:
        ranks = " ".join(map(str, e.ranks))
        size = f"{e.size_bytes / 2**20:.1f}"
        rows.add_row(e.path, e.format, e.family or "?", e.base_model or "?", str(e.modules), ranks, size)
    out.print(f"{folder}:", highlight=False)
    out.print(rows)
    for path, reason in index.unreadable:
        out.print(f"[red]unreadable[/] {path}: {reason}", markup=True, highlight=False)
    out.print(f"{len(index.entries)} adapters, {len(index.unreadable)} unreadable")
    if written is not None:
        out.print(f"Wrote {written}")


@library.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder to write the matrix (similarity.csv or .json) and heatmap (similarity.png) into; "
    "only printed by default.",
)
@click.option(
    "--format",
    "matrix_format",
    type=click.Choice(["csv", "json"]),
    default="csv",
    help="File format of the matrix written to OUTPUT.",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=5, help="How many most similar and interfering pairs to list."
)
@overwrite_option
@allow_pickle_option
@backend_option
@ray_address_option
@workers_option
@json_option
@click.pass_context
def similarity(
    ctx: click.Context,
    folder: Path,
    output: Path | None,
    matrix_format: str,
    top: int,
    overwrite: bool,
    as_json: bool,
    allow_pickle: bool,
    backend: str,
    ray_address: str | None,
    workers: int | None,
) -> None:
    """Cosine similarity of every pair of adapters' updates in FOLDER, over the modules both adapt.

    Computed on the low-rank factors (no full-size update is built). Near 1: near-duplicates; strongly negative:
    the pair pulls the same weights in opposite directions and interferes when merged; near 0: independent.

    \b
    Example:
      adaptermerge library similarity loras/ -o loras-similarity/
    """
    from ..library import adapter_similarity

    matrix_path = heatmap_path = None
    if output is not None:
        if output.suffix in (".csv", ".json"):  # the spelling before -o named a folder
            click.echo(
                f"Note: -o FILE{output.suffix} is deprecated and will be removed in the next release; "
                f"-o names a folder (with --format {output.suffix[1:]}).",
                err=True,
            )
            matrix_path, heatmap_path = output, output.with_suffix(".png")
        else:
            matrix_path, heatmap_path = output / f"similarity.{matrix_format}", output / "similarity.png"
        existing = [str(p) for p in (matrix_path, heatmap_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    result = adapter_similarity(
        folder,
        allow_pickle=allow_pickle,
        backend=backend,
        workers=workers,
        ray_address=ray_address,
        progressbar=not is_quiet(ctx) and not as_json,
    )
    if len(result.names) < 2:
        raise IncompatibleAdaptersError(f"{folder}: need at least two readable adapters; found {len(result.names)}")
    pairs = {most: result.pairs(most=most, top=top) for most in ("similar", "interfering")}
    if matrix_path is not None:
        matrix_path.parent.mkdir(parents=True, exist_ok=True)
        with spinner(f"writing {heatmap_path}"):
            written = [result.write(matrix_path), result.heatmap(heatmap_path)]
    if as_json:
        unreadable = [{"path": p, "reason": r} for p, r in result.unreadable]
        most = {f"most_{k}": [{"a": a, "b": b, "cosine": c} for a, b, c in v] for k, v in pairs.items()}
        return print_json({"adapters": list(result.names), **most, "unreadable": unreadable})
    out = console(ctx)
    for path, reason in result.unreadable:
        out.print(f"[red]skipped[/] {path}: {reason}", markup=True, highlight=False)
    for most, found in pairs.items():
        rows = table("adapter", "adapter", "cosine", fold=["adapter"], right=["cosine"], title=f"most {most} pairs")
        for a, b, value in found:
            rows.add_row(a, b, f"{value:+.4f}")
        out.print(rows if found else f"no {most} pairs" + (" (no negative cosine)" if most != "similar" else ""))
    if matrix_path is None:
        out.print("Add -o FOLDER to save the matrix and a heatmap.")
    else:
        out.print(f"Wrote {written[0]} and {written[1]}")


COMMANDS = [run, library]
