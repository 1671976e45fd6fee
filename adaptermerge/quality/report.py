"""The quality table three ways: a rich table for the terminal, JSON for machines, a PNG bar chart for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

__all__ = ["print_table", "summary", "to_json", "write_json", "write_png"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _choice(row) -> str:
    """The chosen weight, and `d=<density>` when a density was chosen with it."""
    if row.weight is None:
        return "-"
    return " ".join([f"{row.weight:g}", *(f"{name[0]}={value:g}" for name, value in row.params.items())])


def print_table(results: dict[str, Any], console: Console | None = None) -> Table:
    """Print test accuracy (%) per task, averages, chosen weight (and density `d`), merge time, peak memory.

    When the per-task columns do not fit the console's width (`COLUMNS`, 80 for files and pipes), they are left out
    and the table says so; `write_json` keeps every number.
    """
    console = console or Console()
    tasks = results["tasks"]
    table = _table(results, tasks)
    if Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width:
        table = _table(results, [])
        table.caption = f"per-task accuracy ({len(tasks)} tasks) left out to fit {console.width} columns: see the JSON"
    console.print(table)
    return table


def _table(results: dict[str, Any], tasks: list[str]) -> Table:
    title = f"merge quality on the {results['suite']} suite (test accuracy %, weight w chosen on validation)"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("method", "w", *tasks, "avg", "norm", "ms", "MiB", "note"):
        left = column in ("method", "note")
        table.add_column(column, justify="left" if left else "right", no_wrap=not left, overflow="fold")
    for row in results["rows"]:
        style = "bold" if row.kind == "reference" else ("cyan" if row.kind == "peft" else None)
        table.add_row(
            row.name,
            _choice(row),
            *[_pct(row.accuracy.get(t)) for t in tasks],
            _pct(row.mean_accuracy),
            _pct(row.mean_normalised),
            "-" if row.merge_seconds is None else f"{1000 * row.merge_seconds:.1f}",
            "-" if row.peak_mib is None else f"{row.peak_mib:.1f}",
            row.note,
            style=style,
        )
    return table


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: best registry merge, best peft type, and the worst task of each recovery row."""
    merges = [r for r in results["rows"] if r.kind == "adaptermerge" and r.mean_normalised is not None]
    peft = [r for r in results["rows"] if r.kind == "peft" and r.mean_normalised is not None]
    best = max(merges, key=lambda r: r.mean_normalised, default=None)
    best_peft = max(peft, key=lambda r: r.mean_normalised, default=None)
    return {
        "best_method": best and {"name": best.name, "mean_normalised": best.mean_normalised},
        "best_peft": best_peft and {"name": best_peft.name, "mean_normalised": best_peft.mean_normalised},
        "base_mean_normalised": results["rows"][0].mean_normalised,
        "recovery_min_normalised": {
            r.name: min(r.normalised.values()) for r in results["rows"] if r.kind == "recovery" and r.normalised
        },
    }


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """Every row (with validation curves), the cross-task accuracy of each adapter and the summary, as plain data."""
    return {**results, "rows": [r.to_dict() for r in results["rows"]], "summary": summary(results)}


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`to_json` of the results to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=2))
    return path


def write_png(results: dict[str, Any], path: str | Path) -> Path:
    """A bar chart of average normalised test accuracy per row, with the base and individual levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results["rows"] if r.mean_normalised is not None]
    colours = {"reference": "grey", "adaptermerge": "tab:blue", "peft": "tab:orange", "recovery": "tab:green"}
    figure, axis = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.5))
    axis.bar(range(len(rows)), [r.mean_normalised for r in rows], color=[colours[r.kind] for r in rows])
    axis.axhline(rows[0].mean_normalised, color="black", linestyle=":", linewidth=1, label="base (weight 0)")
    axis.set_xticks(range(len(rows)), [r.name for r in rows], rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("avg normalised accuracy\n(merged / own adapter)")
    axis.set_ylim(0, 1.05)
    axis.set_title(
        f"{results['suite']} suite\nblue adaptermerge, orange peft, green RMM recovery, grey references", fontsize=10
    )
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")  # nothing cut: the title and labels set the bounds
    plt.close(figure)
    return path
