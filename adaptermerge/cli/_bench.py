"""The benchmark verbs: `bench quality` (every method on real task suites) and `demo` (the README's first command)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ._console import print_json
from ._options import json_option, renamed_option

DEMO_METHODS = ("linear", "ties", "tsv", "iso_c", "rmm")
DEMO_PEFT_TYPES = ("linear", "svd")


def _cache_option(command):
    return click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Where trained suites are cached; $ADAPTERMERGE_CACHE or ~/.cache/adaptermerge/quality by default.",
    )(command)


def _load_suites(names: list[str], cache_dir: Path | None, console: Console, seed: int = 0) -> list:
    from ..quality.digits import digits_config, load_digits_suite

    suites = []
    for name in names:
        if name == "digits":
            console.print("[dim]digits suite: training (or reading cached) task LoRAs...[/dim]")
            suites.append(load_digits_suite(digits_config(seed=seed), cache_dir=cache_dir))
            continue
        from ..quality.wordnet import TextSuiteUnavailable, load_text_suite, text_config

        console.print("[dim]text suite: training (or reading cached) task LoRAs on MiniLM...[/dim]")
        try:
            suites.append(load_text_suite(text_config(seed=seed), cache_dir=cache_dir))
        except TextSuiteUnavailable as err:
            console.print(f"[yellow]text suite skipped: {err}[/yellow]")
    return suites


@click.group()
def bench() -> None:
    """Benchmarks on real, offline data."""


@bench.command()
@click.option("--suite", "suite_name", type=click.Choice(["digits", "text", "all"]), default="digits", help="Suite.")
@click.option("--methods", default=None, help="Comma-separated registered methods; every registered one by default.")
@click.option("--peft-types", default="cat,linear,ties,svd,ties_svd", help="peft combination types ('' for none).")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=Path("bench-quality"), help="Folder for JSON/PNG."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    help="Seed of the data splits, heads and LoRA initialisation; another seed trains (and caches) another suite, "
    "to see which differences between methods hold up.",
)
@_cache_option
@json_option
@renamed_option("--out", "-o/--output", "output", type=click.Path(path_type=Path))
def quality(
    suite_name: str,
    methods: str | None,
    peft_types: str,
    output: Path,
    seed: int,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Merge each suite's task LoRAs with every method and peft's types; print and save the quality table.

    Weights are one uniform weight per adapter, chosen on a validation split from one grid shared by every method
    (peft's included), jointly with the density of sparsifying methods (ours and peft's ties/dare types); peft's SVD
    types keep the same output rank as ours. Writes OUTPUT/quality-<suite>.json and OUTPUT/quality-<suite>.png.
    """
    from ..quality.bench import run_quality_bench
    from ..quality.report import print_table, to_json, write_json, write_png

    console = Console(stderr=as_json)  # with --json, stdout holds only the JSON
    names = ["digits", "text"] if suite_name == "all" else [suite_name]
    payloads = []
    for suite in _load_suites(names, cache_dir, console, seed):
        results = run_quality_bench(
            suite,
            methods=methods.split(",") if methods else None,
            peft_types=[t for t in peft_types.split(",") if t],
            progress=lambda line: console.print(f"[dim]{line}[/dim]"),
        )
        if as_json:
            payloads.append(to_json(results))
        else:
            print_table(results, console)
        name = suite.config.name
        json_path = write_json(results, output / f"quality-{name}.json")
        console.print(f"Wrote {json_path} and {write_png(results, output / f'quality-{name}.png')}")
    if as_json:
        print_json(payloads)


@click.command()
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=Path("adaptermerge-demo"), help="Output folder."
)
@_cache_option
@renamed_option("--out", "-o/--output", "output", type=click.Path(path_type=Path))
def demo(output: Path, cache_dir: Path | None) -> None:
    """Train small LoRAs on scikit-learn's digits (cached), merge them with a few methods, show what each keeps."""
    from ..io import save_adapter
    from ..merge import merge_adapters
    from ..methods import list_methods
    from ..quality.bench import run_quality_bench
    from ..quality.report import print_table, write_json, write_png

    console = Console()
    (suite,) = _load_suites(["digits"], cache_dir, console)
    registered = {m.name for m in list_methods()}
    methods = [m for m in DEMO_METHODS if m in registered]
    results = run_quality_bench(suite, methods=methods, peft_types=DEMO_PEFT_TYPES)
    print_table(results, console)
    paths = [suite.adapter_paths[t] for t in suite.tasks]
    written = []
    for row in results["rows"]:
        if row.kind == "adaptermerge" and row.weight is not None:
            merged = merge_adapters(paths, [row.weight] * len(paths), row.name, adapter_name=row.name, **row.params)
            written.append(save_adapter(merged, output / row.name, format="peft", overwrite=True))
    write_json(results, output / "quality.json")
    write_png(results, output / "quality.png")
    tasks = ", ".join(f"{t} ({suite.descriptions[t]})" for t in suite.tasks)
    console.print(
        f"""
[bold]What you see.[/bold] A small MLP was pretrained on scikit-learn's 8×8 digits, upright at the centre of a
16×16 canvas; its own digit head reads every task (as CLIP's zero-shot heads do in the task-arithmetic papers).
Then one rank-{suite.config.rank} LoRA per task was trained with peft, each task a new place and view of the digit:
{tasks}.
Each row merges those {len(paths)} LoRAs into one adapter; columns are test accuracy (%), [bold]norm[/bold] the average
of merged / own-adapter accuracy. [bold]w[/bold] is the uniform weight per adapter (and d the density of sparsifying
methods) chosen on a validation split from one grid for every row, peft's included.
"base (weight 0)" is the model with no adapter (near chance: the tasks need their adapters), "individual" each task's
own LoRA: a useful merge lands between them, as close to "individual" as possible. Rows [cyan]peft:*[/cyan] are
peft's add_weighted_adapter types; "rmm" rows show each task recovered from a reversible basis of half as many
elements as tasks.

Merged adapters (PEFT folders, loadable with PeftModel.from_pretrained) were written to:
  {chr(10).join("  " + str(p) for p in written).strip()}
Table as JSON and PNG: {output / "quality.json"}, {output / "quality.png"}. Task LoRAs cached in {suite.folder}.
Next: `adaptermerge merge {paths[0]} {paths[1]} -m ties -o my-merge/` merges any LoRAs the same way."""
    )


COMMANDS = [bench, demo]
