"""Subject + style fusion on a diffusion base: the mode (`linear`, `np_lora` with its `mu`, `k_lora`, a start/stop
schedule), and XY grids of previews exported as one PNG.

:class:`FusionSettings` holds what the page's controls set; :func:`render_fusion` turns it into an image through
:meth:`~adaptermerge.ui.diffusion.PipelinePreview.fuse`, :func:`xy_grid` renders one image per pair of values of two
axes (a weight, `mu`, a start or stop) and :func:`compose_grid` tiles them, with the values written in the margins.
:func:`fusion_section` builds the page's section (gradio is imported there only).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import AdapterMergeError, InvalidParameterError

__all__ = [
    "AXES",
    "FUSION_MODES",
    "FusionSettings",
    "compose_grid",
    "fusion_section",
    "pair_choices",
    "render_fusion",
    "xy_grid",
]

FUSION_MODES = ("linear", "np_lora", "k_lora", "schedule")
# XY axis label → the FusionSettings field it sets.
AXES = {
    "subject weight": "subject_weight",
    "style weight": "style_weight",
    "mu": "mu",
    "subject stop": "subject_stop",
    "style start": "style_start",
}


@dataclass(frozen=True)
class FusionSettings:
    """The fusion of a (subject, style) pair the page shows.

    Args:
        mode (`str`): `linear` (the weighted sum), `np_lora` (with `mu`), `k_lora`, or `schedule` (the weighted sum
            with each adapter active from its start to its stop, as fractions of the denoising steps).
        subject_weight, style_weight (`float`): the adapters' weights.
        mu (`float`): `np_lora`'s projection strength in `[0, 1]`.
        subject_start, subject_stop, style_start, style_stop (`float`): the schedule, in `[0, 1]`, start < stop.
    """

    mode: str = "np_lora"
    subject_weight: float = 1.0
    style_weight: float = 1.0
    mu: float = 1.0
    subject_start: float = 0.0
    subject_stop: float = 1.0
    style_start: float = 0.0
    style_stop: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise InvalidParameterError(f"unknown fusion mode {self.mode!r}; modes: {', '.join(FUSION_MODES)}")
        for name in ("subject", "style"):
            start, stop = getattr(self, f"{name}_start"), getattr(self, f"{name}_stop")
            if not 0.0 <= start < stop <= 1.0:
                raise InvalidParameterError(
                    f"the {name}'s start and stop need 0 <= start < stop <= 1; got {start}, {stop}"
                )

    def weights(self) -> list[Any]:
        """The weights for `load_merged_adapters`: numbers, or keyframes for the `schedule` mode."""
        pairs = [
            (self.subject_weight, self.subject_start, self.subject_stop),
            (self.style_weight, self.style_start, self.style_stop),
        ]
        if self.mode != "schedule":
            return [weight for weight, _, _ in pairs]
        return [[[start, weight]] + ([[stop, 0.0]] if stop < 1.0 else []) for weight, start, stop in pairs]

    def method(self) -> tuple[str, dict[str, Any]]:
        """The merge method and its parameters."""
        if self.mode == "np_lora":
            return "np_lora", {"mu": self.mu}
        return ("k_lora" if self.mode == "k_lora" else "linear"), {}

    def with_axis(self, axis: str, value: float) -> FusionSettings:
        """These settings with the field of XY `axis` set to `value`."""
        if axis not in AXES:
            raise InvalidParameterError(f"unknown grid axis {axis!r}; axes: {', '.join(AXES)}")
        return dataclasses.replace(self, **{AXES[axis]: float(value)})


def render_fusion(preview: Any, pair: Sequence[Adapter], settings: FusionSettings) -> np.ndarray:
    """The image of `pair` (subject, style) fused as `settings` says, from a `PipelinePreview`."""
    method, params = settings.method()
    return preview.fuse(pair, settings.weights(), method, **params)


def xy_grid(
    preview: Any,
    pair: Sequence[Adapter],
    settings: FusionSettings,
    x: tuple[str, Sequence[float]],
    y: tuple[str, Sequence[float]],
) -> np.ndarray:
    """One image per `(x value, y value)`, tiled by :func:`compose_grid` (rows follow `y`, columns `x`).

    Args:
        x, y (`tuple[str, list[float]]`): an axis name from `AXES` and its values.
    """
    (x_axis, x_values), (y_axis, y_values) = x, y
    rows = [
        [render_fusion(preview, pair, settings.with_axis(x_axis, xv).with_axis(y_axis, yv)) for xv in x_values]
        for yv in y_values
    ]
    return compose_grid(rows, [f"{x_axis} {v:g}" for v in x_values], [f"{y_axis} {v:g}" for v in y_values])


def compose_grid(
    images: Sequence[Sequence[np.ndarray]], x_labels: Sequence[str], y_labels: Sequence[str], *, min_cell: int = 128
) -> np.ndarray:
    """Tile `images[row][column]` (uint8, one size) into one image with the labels in a top and a left margin.

    Cells are enlarged by an integer factor (nearest neighbour) to at least `min_cell` pixels, 4 pixels apart.
    """
    from PIL import Image, ImageDraw

    height, width = images[0][0].shape[:2]
    factor = max(1, -(-min_cell // max(height, width)))
    cell_h, cell_w, gap = height * factor, width * factor, 4
    top, left = 16, 8 + 6 * max(len(label) for label in y_labels)
    canvas = Image.new(
        "RGB", (left + len(x_labels) * (cell_w + gap), top + len(y_labels) * (cell_h + gap)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(x_labels):
        draw.text((left + column * (cell_w + gap) + 2, 2), label, fill=(0, 0, 0))
    for row, (label, line) in enumerate(zip(y_labels, images)):
        y = top + row * (cell_h + gap)
        draw.text((2, y + cell_h // 2 - 5), label, fill=(0, 0, 0))
        for column, image in enumerate(line):
            cell = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(cell, (left + column * (cell_w + gap), y))
    return np.asarray(canvas)


def _values(text: str, axis: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InvalidParameterError(f"{axis}: give comma-separated numbers such as 0, 0.5, 1; got {text!r}") from None
    if not values or len(values) > 6:
        raise InvalidParameterError(f"{axis}: give 1 to 6 values; got {len(values)}")
    return values


def pair_choices(names: Sequence[str], subject: str | None, style: str | None) -> tuple[str | None, str | None]:
    """The subject and style picks to show among `names`: the current ones where they still exist, else the first
    adapter for the subject and the last for the style (None when there is none)."""
    first, last = (names[0], names[-1]) if names else (None, None)
    return (subject if subject in names else first), (style if style in names else last)


def fusion_section(gr: Any, preview: Any, adapters: Callable[[], Sequence[Adapter]]) -> dict[str, Any]:
    """The page's "subject + style" section: pick the pair and the mode, render, and render an XY grid as a PNG.

    Endpoints: `/fusion` (subject, style, mode, subject weight, style weight, mu, subject start, subject stop,
    style start, style stop) → (image, timing); `/fusion_grid` (the same, then x axis, x values, y axis, y values)
    → (grid image, PNG file); `/fusion_adapters` (subject, style) → the two dropdowns listing the adapters now.

    Args:
        gr: the gradio module.
        preview (`PipelinePreview`): the pipeline the images come from.
        adapters (`Callable`): the workbench's adapters at the time of a call (uploads included).

    Returns:
        `dict`: the event arguments (`fn`, `inputs`, `outputs`, `api_name`) that refresh the pair dropdowns, for the
        page to run after an upload (`upload_event.then(**refresh)`).
    """
    names = [adapter.name for adapter in adapters()]

    def pair_and_settings(
        subject: str, style: str, mode: str, *numbers: float
    ) -> tuple[list[Adapter], FusionSettings]:
        by_name = {adapter.name: adapter for adapter in adapters()}
        if subject not in by_name or style not in by_name or subject == style:
            raise InvalidParameterError(f"pick two different adapters among {', '.join(by_name)}")
        return [by_name[subject], by_name[style]], FusionSettings(mode, *map(float, numbers))

    def on_fusion(*values: Any) -> tuple[np.ndarray, str]:
        start = time.perf_counter()
        try:
            pair, settings = pair_and_settings(*values)
            image = render_fusion(preview, pair, settings)
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None
        return image, f"{settings.mode}: {1000 * (time.perf_counter() - start):.0f} ms"

    def on_grid(*values: Any) -> tuple[np.ndarray, str]:
        *values, x_axis, x_text, y_axis, y_text = values
        try:
            pair, settings = pair_and_settings(*values)
            x, y = (x_axis, _values(x_text, x_axis)), (y_axis, _values(y_text, y_axis))
            grid = xy_grid(preview, pair, settings, x, y)
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None
        from PIL import Image

        path = Path(tempfile.mkdtemp(prefix="adaptermerge-grid-")) / f"xy_{settings.mode}.png"
        Image.fromarray(grid).save(path)
        return grid, str(path)

    defaults = FusionSettings()
    with gr.Accordion("subject + style", open=False, elem_id="fusion-section"):
        gr.Markdown(
            "Fuse a subject LoRA with a style LoRA: the weighted sum, NP-LoRA (the subject projected away from the "
            "style's principal directions, `mu` from 0 = sum to 1 = hard projection), K-LoRA (each attention layer "
            "uses one of the two, switching over the steps), or a schedule (each adapter active from its start to "
            "its stop, as fractions of the denoising steps)."
        )
        first, last = pair_choices(names, None, None)
        with gr.Row():
            subject = gr.Dropdown(names, value=first, label="subject", elem_id="fusion-subject")
            style = gr.Dropdown(names, value=last, label="style", elem_id="fusion-style")
            mode = gr.Radio(list(FUSION_MODES), value=defaults.mode, label="mode", elem_id="fusion-mode")
        with gr.Row():
            weights = [
                gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label=f"{name} weight", elem_id=f"fusion-{name}-weight")
                for name in ("subject", "style")
            ]
            mu = gr.Slider(0.0, 1.0, value=defaults.mu, step=0.05, label="mu (np_lora)", elem_id="fusion-mu")
        with gr.Row():
            schedule = [
                gr.Slider(0.0, 1.0, value=value, step=0.05, label=f"{name} {end}", elem_id=f"fusion-{name}-{end}")
                for name in ("subject", "style")
                for end, value in (("start", 0.0), ("stop", 1.0))
            ]
        with gr.Row():
            render = gr.Button("Render", elem_id="fusion-render")
            timing = gr.Markdown(elem_id="fusion-timing")
        image = gr.Image(label="fusion", format="png", type="numpy", elem_id="fusion-image")
        with gr.Row():
            x_axis = gr.Dropdown(list(AXES), value="style weight", label="x axis", elem_id="grid-x-axis")
            x_values = gr.Textbox("0, 0.5, 1", label="x values", elem_id="grid-x-values")
            y_axis = gr.Dropdown(list(AXES), value="mu", label="y axis", elem_id="grid-y-axis")
            y_values = gr.Textbox("0, 1", label="y values", elem_id="grid-y-values")
            grid_button = gr.Button("Render XY grid", elem_id="grid-render")
        grid = gr.Image(label="XY grid", format="png", type="numpy", elem_id="grid-image")
        grid_file = gr.File(label="XY grid (PNG)", elem_id="grid-file")
    inputs = [subject, style, mode, *weights, mu, *schedule]
    render.click(on_fusion, inputs, [image, timing], api_name="fusion")
    grid_button.click(
        on_grid, [*inputs, x_axis, x_values, y_axis, y_values], [grid, grid_file], api_name="fusion_grid"
    )

    def on_adapters(*picks: str | None) -> tuple[Any, Any]:
        names = [adapter.name for adapter in adapters()]
        return tuple(gr.Dropdown(choices=names, value=pick) for pick in pair_choices(names, *picks))

    return {"fn": on_adapters, "inputs": [subject, style], "outputs": [subject, style], "api_name": "fusion_adapters"}
