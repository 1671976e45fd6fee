"""The `adaptermerge` command line: one click group, each family of verbs in its own module.

Errors from bad input leave as one line and exit code 2; `-vv` shows the traceback. The verbs' modules import torch
and the host libraries inside the commands, so `--help`, `methods` and argument errors answer at once.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import AdapterMergeError, OutputExistsError
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
            if isinstance(err, OutputExistsError) and err.path is not None:
                err = f"{err.path} exists; choose another output path or pass --overwrite"
            click.echo("Error: " + " ".join(str(err).split()), err=True)  # one line, whatever the message holds
            sys.exit(2)


def _configure_logging(settings: dict) -> None:
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    level = logging.ERROR if settings["quiet"] else levels[min(settings["verbose"], 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _after_verb(ctx: click.Context, param: click.Parameter, value: int | bool) -> None:
    """`-q`/`-v` given after the verb count as if given before it."""
    settings = ctx.find_root().obj
    if not value or settings is None:
        return
    if param.name == "quiet":
        settings["quiet"] = True
    else:
        settings["verbose"] += value
    _configure_logging(settings)


def _add_verbosity_options(command: click.Command) -> None:
    """Accept `-v`/`-q` on every verb as well as before it."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_verbosity_options(sub)
        return
    command.params += [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_after_verb, hidden=True),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_after_verb, hidden=True),
    ]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More output; -vv also shows tracebacks (also after the verb).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars (also after the verb).")
@click.version_option(package_name="adaptermerge")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Merge LoRA adapters in low-rank form: from files to a file in seconds, no base model needed.

    \b
    Examples:
      adaptermerge demo                   what merging keeps, and how fast
      adaptermerge merge a.safetensors b.safetensors -w 0.7,0.3 -o mix.safetensors
      adaptermerge merge lora_a/ lora_b/ -m ties --density 0.5 -r 16 -o merged/
      adaptermerge inspect merged/
      adaptermerge methods
    """
    ctx.obj = {"verbose": verbose, "quiet": quiet}
    _configure_logging(ctx.obj)


commands = _adapters.COMMANDS + _batch.COMMANDS + _bench.COMMANDS + _rmm.COMMANDS + _ui.COMMANDS + _env.COMMANDS
for command in commands:
    _add_verbosity_options(command)
    main.add_command(command)
