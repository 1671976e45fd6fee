"""The `env` verb: versions and platform facts for a bug report, without importing torch."""

from __future__ import annotations

import click

from ..versions import report
from ._console import print_json
from ._options import json_option

__all__ = ["COMMANDS"]


@click.command("env")
@json_option
def env(as_json: bool) -> None:
    """Print the versions that matter (Python, torch, peft, transformers, diffusers, ...) to paste into an issue.

    \b
    Example:
      adaptermerge env
    """
    facts = report()
    if as_json:
        return print_json(facts)
    width = max(map(len, facts))
    for name, value in facts.items():
        click.echo(f"- {name + ':':<{width + 1}} {value}")


COMMANDS = [env]
