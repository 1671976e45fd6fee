"""What the verbs print: the quiet switch, spinners for steps that have no count, and the console they print to."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence

import click
from rich import box
from rich.console import Console
from rich.table import Table


def is_quiet(ctx: click.Context | None = None) -> bool:
    """Whether `-q` was given, before or after the verb."""
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("quiet"))


def console(ctx: click.Context | None = None, *, report: bool = False) -> Console:
    """The console for tables and results (stdout): silent under `-q`, except for a verb whose output is the
    `report` asked for (`inspect`, `methods`)."""
    return Console(quiet=is_quiet(ctx) and not report)


@contextlib.contextmanager
def spinner(text: str, ctx: click.Context | None = None) -> Iterator[None]:
    """A spinner on stderr while a step without a count runs (writing a file, loading a model); gone when it ends."""
    if is_quiet(ctx):
        yield
        return
    with Console(stderr=True).status(text):
        yield


def shared_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name starts with (`model.layers.`), never a whole name; `""` when there is none."""
    if len(names) < 2:
        return ""
    split = [name.split(".") for name in names]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    common = common[: min(len(parts) for parts in split) - 1]
    return ".".join(common) + "." if common else ""


def table(*columns: str, fold: Sequence[str] = (), right: Sequence[str] = (), title: str | None = None) -> Table:
    """A compact table for narrow terminals: columns in `fold` wrap anywhere (names, paths: never cut), the
    others keep their values on one line (numbers, shapes), numbers in `right` are right-aligned."""
    result = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        folded = column in fold
        result.add_column(
            column,
            overflow="fold" if folded else "ellipsis",
            no_wrap=not folded,
            justify="right" if column in right else "left",
        )
    return result


def print_json(data: object) -> None:
    """`--json`: the same content as the table, for machines."""
    click.echo(json.dumps(data, indent=2, default=str))
