"""The `ui` verb: start the Gradio app (the demo's text suite: MiniLM and its task LoRAs, unless told otherwise)."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]


@click.command("ui")
@click.option("--host", default="127.0.0.1", help="Address to bind; anything but loopback is reachable by others.")
@click.option("--port", type=int, default=None, help="Port to listen on; the first free one from 7860 by default.")
@click.option(
    "--base",
    default=None,
    help="Base model (local path or hub id): a causal LM, previewed by generated text, or a diffusers pipeline "
    "(a folder with model_index.json), previewed by an image; the embedded bench (--suite) by default.",
)
@click.option(
    "--adapters",
    "adapters_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of adapters to offer (the only folder the app reads); the embedded bench's (--suite) by default.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Denoising steps of an image preview."
)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=None,
    help="Side in pixels of an image preview (a multiple of 8); the pipeline's default by default.",
)
@click.option(
    "--suite",
    type=click.Choice(["text", "digits"]),
    default=None,
    help="The embedded bench when neither --base nor --adapters is given: the demo's text suite (MiniLM, 4 task "
    "LoRAs, trained once then cached; the default) or the digits suite (a small MLP, 8 conflicting tasks).",
)
def ui(
    host: str,
    port: int | None,
    base: str | None,
    adapters_dir: str | None,
    steps: int,
    size: int | None,
    suite: str | None,
) -> None:
    """Mix adapters with sliders in the browser, see the merge's effect live, and export it."""
    from ..ui import launch

    if suite is not None and (base is not None or adapters_dir is not None):
        raise click.UsageError("--suite opens an embedded bench; leave out --base and --adapters")
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: binding to {host}; anyone who can reach it can use the app.", err=True)
    launch(host=host, port=port, base=base, adapters_dir=adapters_dir, steps=steps, size=size, suite=suite)


COMMANDS = [ui]
