"""The `adaptermerge` command line: one click group, each family of verbs in its own module.

Errors from bad input leave as one line and exit code 2; `-vv` shows the traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import AdapterMergeError
from . import _adapters, _batch, _bench, _env, _rmm, _ui

__all__ = ["main"]


class _Group(click.Group):
    """Turns adaptermerge's errors and I/O errors (a missing file, a full disk) into one line with exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (AdapterMergeError, OSError) as err:
            if ctx.obj and ctx.obj.get("verbose", 0) >= 2:
                raise
            click.echo("Error: " + " ".join(str(err).split()), err=True)  # one line, whatever the message holds
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More output; -vv also shows tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.version_option(package_name="adaptermerge")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Merge LoRA adapters in low-rank form: from files to a file in seconds, no base model needed.

    \b
    Examples:
      adaptermerge merge style.safetensors character.safetensors --weights 0.7,0.3 -o mix.safetensors
      adaptermerge merge lora_a/ lora_b/ --method ties --density 0.5 --rank 16 -o merged/
      adaptermerge inspect merged/
      adaptermerge methods
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"verbose": verbose, "quiet": quiet}


for command in _adapters.COMMANDS + _batch.COMMANDS + _bench.COMMANDS + _rmm.COMMANDS + _ui.COMMANDS + _env.COMMANDS:
    main.add_command(command)
