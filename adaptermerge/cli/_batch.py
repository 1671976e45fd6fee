"""The batch verbs: `run RECIPE.yaml` and the `library` group (`scan`, `similarity`).

Exit codes: 0 when everything succeeded (skipped outputs count as success), 1 when a job failed, 2 for an
invalid recipe or other bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..batch import BACKENDS, JobResult


def _quiet(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


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
    table = Table("merge", "status", "output", "time", "details", title="summary")
    for r in results:
        seconds = f"{r.seconds:.2f} s" if r.status != "skipped" else ""
        table.add_row(r.name, f"[{styles[r.status]}]{r.status}[/]", _shown(r.output, folder), seconds, r.message)
    return table


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate the recipe and list what would run, without merging.")
@click.option("--force", is_flag=True, help="Redo merges whose output already exists (they are skipped otherwise).")
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
@click.pass_context
def run(
    ctx: click.Context,
    recipe: Path,
    dry_run: bool,
    force: bool,
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
    console = Console(stderr=False, quiet=_quiet(ctx))
    if dry_run:
        table = Table("merge", "method", "adapters", "weights", "output", "status", title=f"{recipe} (dry run)")
        for job in loaded.jobs:
            status = "exists: skip" if job.output.exists() and not force else "would run"
            weights = ", ".join(map(str, job.weights))
            adapters = "\n".join(_shown(a, recipe.parent) for a in job.adapters)
            table.add_row(job.name, job.method, adapters, weights, _shown(job.output, recipe.parent), status)
        console.print(table)
        return
    results = run_jobs(
        loaded.jobs,
        force=force,
        backend=backend,
        workers=workers,
        ray_address=ray_address,
        progressbar=not _quiet(ctx),
    )
    console.print(_summary(results, recipe.parent))
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()))
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
@click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt/.ckpt pickle checkpoints (only for files you trust)."
)
@click.pass_context
def scan(ctx: click.Context, folder: Path, output: Path | None, allow_pickle: bool) -> None:
    """Index the adapters in FOLDER (any format, searched recursively): base model, ranks, modules, size.

    Only file headers are read. Files that cannot be read are listed with the reason.
    """
    from ..library import scan_library

    if output is not None and output.suffix not in (".json", ".csv"):
        raise click.BadParameter("the index is written as .json or .csv", param_hint="--output")
    index = scan_library(folder, allow_pickle=allow_pickle)
    console = Console(quiet=_quiet(ctx))
    table = Table("adapter", "format", "family", "base model", "modules", "ranks", "size", title=str(folder))
    for e in index.entries:
        ranks = " ".join(map(str, e.ranks))
        size = f"{e.size_bytes / 2**20:.1f} MiB"
        table.add_row(e.path, e.format, e.family or "?", e.base_model or "?", str(e.modules), ranks, size)
    console.print(table)
    for path, reason in index.unreadable:
        console.print(f"[red]unreadable[/] {path}: {reason}", markup=True, highlight=False)
    console.print(f"{len(index.entries)} adapters, {len(index.unreadable)} unreadable")
    if output is not None:
        console.print(f"Wrote {index.write(output)}")


@library.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("similarity.csv"),
    help="Where to write the matrix (.csv or .json).",
)
@click.option(
    "--heatmap",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to save the heatmap PNG; OUTPUT with a .png suffix by default.",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=5, help="How many most similar and interfering pairs to list."
)
@click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt/.ckpt pickle checkpoints (only for files you trust)."
)
@backend_option
@ray_address_option
@workers_option
@click.pass_context
def similarity(
    ctx: click.Context,
    folder: Path,
    output: Path,
    heatmap: Path | None,
    top: int,
    allow_pickle: bool,
    backend: str,
    ray_address: str | None,
    workers: int | None,
) -> None:
    """Cosine similarity of every pair of adapters' updates in FOLDER, over the modules both adapt.

    Computed on the low-rank factors (no full-size update is built). Near 1: near-duplicates; strongly negative:
    the pair pulls the same weights in opposite directions and interferes when merged; near 0: independent.
    """
    from ..library import adapter_similarity

    if output.suffix not in (".json", ".csv"):
        raise click.BadParameter("the matrix is written as .csv or .json", param_hint="--output")
    result = adapter_similarity(
        folder,
        allow_pickle=allow_pickle,
        backend=backend,
        workers=workers,
        ray_address=ray_address,
        progressbar=not _quiet(ctx),
    )
    console = Console(quiet=_quiet(ctx))
    for path, reason in result.unreadable:
        console.print(f"[red]skipped[/] {path}: {reason}", markup=True, highlight=False)
    if len(result.names) < 2:
        raise click.UsageError(f"{folder}: need at least two readable adapters; found {len(result.names)}")
    for most in ("similar", "interfering"):
        pairs = result.pairs(most=most, top=top)
        table = Table("adapter", "adapter", "cosine", title=f"most {most} pairs")
        for a, b, value in pairs:
            table.add_row(a, b, f"{value:+.4f}")
        console.print(table if pairs else f"no {most} pairs" + (" (no negative cosine)" if most != "similar" else ""))
    written = result.write(output)
    picture = result.heatmap(heatmap or output.with_suffix(".png"))
    console.print(f"Wrote {written} and {picture}")


COMMANDS = [run, library]
