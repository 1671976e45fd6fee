"""What the verbs print: the quiet switch, spinners for steps that have no count, and the console they print to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click
from rich.console import Console


def is_quiet(ctx: click.Context | None = None) -> bool:
    """Whether `-q` was given, before or after the verb."""
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("quiet"))


def console(ctx: click.Context | None = None) -> Console:
    """The console for tables and results (stdout), silent under `-q`."""
    return Console(quiet=is_quiet(ctx))


@contextlib.contextmanager
def spinner(text: str, ctx: click.Context | None = None) -> Iterator[None]:
    """A spinner on stderr while a step without a count runs (writing a file, loading a model); gone when it ends."""
    if is_quiet(ctx):
        yield
        return
    with Console(stderr=True).status(text):
        yield
