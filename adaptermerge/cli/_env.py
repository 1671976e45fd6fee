"""The `env` verb: versions and platform facts for a bug report, without importing torch."""

from __future__ import annotations

import json

import click

from ..versions import report

__all__ = ["COMMANDS"]


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the list.")
def env(as_json: bool) -> None:
    """Print the versions that matter (Python, torch, peft, transformers, diffusers, ...) to paste into an issue.

    \b
    Example:
      adaptermerge env
    """
    facts = report()
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(map(len, facts))
    for name, value in facts.items():
        click.echo(f"- {name + ':':<{width + 1}} {value}")


COMMANDS = [env]
