"""The Gradio page over a :class:`~adaptermerge.ui.workbench.Workbench`: sliders, method and parameters, preview,
heatmap, upload and export. Method parameter controls are generated from the registered parameter dataclasses.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import threading
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AdapterMergeError
from ..io import FORMATS
from ..methods import list_methods
from .diffusion import DIFFUSION_ADAPTERS, PipelinePreview
from .fusion import fusion_section
from .workbench import (
    DEMO,
    MAX_ADAPTERS,
    MAX_UPLOAD_BYTES,
    SuitePreview,
    TextPreview,
    Workbench,
    export,
    make_workbench,
    parse_weight_specs,
    upload,
)

__all__ = ["build_app", "launch"]

logger = logging.getLogger(__name__)
WEIGHT_RANGE = (-1.0, 2.0)


@dataclasses.dataclass(frozen=True)
class ParamControl:
    """One method parameter shown in the page: its name, widget kind, choices and help."""

    name: str
    kind: str  # "float", "int", "optional_int", "bool" or "choice"
    choices: tuple[str, ...] = ()
    help: str = ""


def _methods() -> dict[str, Any]:
    """The methods the app offers: those that return one adapter (whole-model ones such as knots too)."""
    return {m.name: m for m in list_methods() if m.returns_adapter}


def _param_controls(methods: Mapping[str, Any]) -> list[ParamControl]:
    """One control per parameter name across the methods, its kind read from the dataclass type hints."""
    controls: dict[str, ParamControl] = {}
    for method in methods.values():
        hints = typing.get_type_hints(method.params_cls)
        for field in dataclasses.fields(method.params_cls):
            if field.name in controls:
                continue
            hint, args = hints[field.name], typing.get_args(hints[field.name])
            if typing.get_origin(hint) is typing.Literal:
                kind, choices = "choice", tuple(str(a) for a in args)
            elif hint is bool:
                kind, choices = "bool", ()
            elif hint is int:
                kind, choices = "int", ()
            elif int in args and type(None) in args:
                kind, choices = "optional_int", ()
            else:
                kind, choices = "float", ()
            controls[field.name] = ParamControl(field.name, kind, choices, field.metadata.get("help", ""))
    return list(controls.values())


def _coerce(control: ParamControl, value: Any) -> Any:
    if control.kind in ("int", "optional_int"):
        return int(value)
    if control.kind == "float":
        return float(value)
    if control.kind == "bool":
        return bool(value)
    return str(value)


CSS = """
.am-preview td, .am-preview th, .am-heatmap td, .am-heatmap th {padding: 2px 8px; text-align: right}
.am-heatmap-wrap {max-width: 100%; overflow-x: auto} .am-heatmap th.am-name {text-align: left; white-space: nowrap}
.am-barcell {width: 200px} .am-bar {height: 12px; background: #e07b00}
#preview-image img {min-width: 256px; min-height: 256px; object-fit: contain; image-rendering: pixelated}
"""

# A number typed into a slider's box applies on Enter as it does on Tab (Gradio applies it when the box loses focus).
JS = """
() => document.addEventListener("keydown", (event) => {
  const box = event.target;
  const weight = box instanceof HTMLInputElement && box.type === "number"
    && box.closest("[id^='weight-'], [id^='diffusion-weight-']");
  if (event.key === "Enter" && weight) box.blur();
})
"""


def advanced_placeholder(bench: Workbench) -> str:
    """An example for the advanced-weights box, written with the loaded adapters' own name and module."""
    if not bench.adapters:
        return '{"adapter name": {"q_proj": 0.5, "default": 1.0}}'
    first = bench.adapters[0]
    module = next(iter(first), "q_proj").rsplit(".", 1)[-1]
    return json.dumps({first.name: {module: 0.5, "default": 1.0}})


def _diffusion_section(gr: Any) -> None:
    """A collapsed section with the embedded tiny diffusion pipeline: a slider per LoRA and the rendered image.

    The pipeline is built on first use (opening the section, or a call to `/diffusion_preview`), so diffusers is
    imported only then; slider moves re-weight the loaded merge in place and re-render.
    """
    holder: dict[str, Any] = {}
    lock = threading.Lock()

    def on_render(*weights: float) -> tuple[Any, str]:
        from .diffusion import DiffusionPreview

        with lock:
            if "preview" not in holder:
                holder["preview"] = DiffusionPreview()
        start = time.perf_counter()
        try:
            image = holder["preview"].render([float(w or 0.0) for w in weights])
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None
        elapsed = time.perf_counter() - start
        # nearest-neighbour ×8 so the 32-pixel image is visible
        return image.repeat(8, axis=0).repeat(8, axis=1), f"re-weight + render: {1000 * elapsed:.0f} ms"

    title = "diffusion: a tiny Stable Diffusion pipeline with three LoRAs"
    with gr.Accordion(title, open=False, elem_id="diffusion-section") as section:
        gr.Markdown(
            "A toy pipeline with random weights, built in memory: the image changes with the weights, it is not "
            "meant to look like anything. Weights re-weight one loaded linear merge in place."
        )
        with gr.Row():
            with gr.Column(scale=1):
                sliders = [
                    gr.Slider(*WEIGHT_RANGE, value=0.0, step=0.05, label=name, elem_id=f"diffusion-weight-{i}")
                    for i, name in enumerate(DIFFUSION_ADAPTERS)
                ]
            with gr.Column(scale=1):
                timing = gr.Markdown(elem_id="diffusion-timing")
                image = gr.Image(label="rendered", format="png", type="numpy", elem_id="diffusion-image")
    gr.on(
        [section.expand] + [s.release for s in sliders],
        on_render,
        sliders,
        [image, timing],
        api_name="diffusion_preview",
        trigger_mode="always_last",
    )


def build_app(bench: Workbench, *, diffusion: bool = False) -> Any:
    """The Gradio Blocks of the app over `bench`, with the tiny diffusion pipeline's section when `diffusion`.

    Endpoints for `gradio_client`:
    - `/preview` (method, weights×MAX_ADAPTERS, parameters…, advanced weights text) → (preview HTML, preview image
      (a diffusion base's, else None), heatmap HTML, timing text);
    - `/select_method` (method) → parameter controls; `/upload` (files) → sliders, status;
    - `/export` (method, weights…, parameters…, format, advanced weights text) → file;
    - `/full_evaluation` (as `/preview`) → the score table on each task's whole test split (an embedded suite);
    - `/set_prompt` (text) for a text or diffusion base;
    - `/diffusion_preview` (one weight per embedded diffusion LoRA) → (image, timing text) when `diffusion`.
    """
    import gradio as gr

    methods = _methods()
    controls = _param_controls(methods)

    def params_of(method: str, values: Sequence[Any]) -> dict[str, Any]:
        names = set(methods[method].param_names)
        # an empty box means the method's default (or None for an optional rank)
        return {c.name: _coerce(c, v) for c, v in zip(controls, values) if c.name in names and v not in (None, "")}

    def split(values: Sequence[Any]) -> tuple[list[float], list[Any]]:
        return [float(w or 0.0) for w in values[:MAX_ADAPTERS]], list(values[MAX_ADAPTERS:])

    def on_preview(method: str, *values: Any) -> tuple[str, Any, str, str]:
        *values, advanced = values
        weights, param_values = split(values)
        start = time.perf_counter()
        try:
            specs = parse_weight_specs(advanced, bench.names)
            shown = bench.show(weights, method, params_of(method, param_values), specs)
            heatmap = bench.heatmap(weights, specs)
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None
        elapsed = time.perf_counter() - start
        if isinstance(shown, str):
            return shown, None, heatmap, f"merge + preview: {1000 * elapsed:.0f} ms"
        return "", shown, heatmap, f"merge + render: {1000 * elapsed:.0f} ms"

    def on_full(method: str, *values: Any) -> str:
        *values, advanced = values
        weights, param_values = split(values)
        try:
            specs = parse_weight_specs(advanced, bench.names)
            return bench.evaluate_full(weights, method, params_of(method, param_values), specs)
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None

    def on_method(method: str) -> list[Any]:
        defaults = {f.name: f.default for f in dataclasses.fields(methods[method].params_cls)}
        doc = f"**{methods[method].pretty_name}**: {methods[method].summary} [paper]({methods[method].reference_url})"
        updates = [gr.update(visible=c.name in defaults, value=defaults.get(c.name)) for c in controls]
        return [doc, *updates]

    def slider_updates() -> list[Any]:
        return [
            gr.update(visible=i < len(bench.adapters), label=bench.names[i] if i < len(bench.adapters) else "")
            for i in range(MAX_ADAPTERS)
        ]

    def on_upload(files: list[str] | None) -> list[Any]:
        if not files:
            return [*slider_updates(), "No file uploaded."]
        try:
            added = upload(bench, files)
        except (AdapterMergeError, ValueError, OSError) as err:
            gr.Warning(f"Adapter refused: {err}")
            return [*slider_updates(), f"Adapter refused: {html.escape(str(err))}"]
        return [*slider_updates(), f"Added {html.escape(added.name)} ({len(added)} modules)."]

    def set_prompt(text: str) -> None:
        if prompted:
            bench.preview_fn.prompt = text

    def on_export(method: str, *values: Any) -> str:
        *values, fmt, advanced = values
        weights, param_values = split(values)
        try:
            specs = parse_weight_specs(advanced, bench.names)
            return str(export(bench, weights, method, params_of(method, param_values), fmt, specs))
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None

    initial = [1.0 / max(len(bench.adapters), 1)] * len(bench.adapters)
    image_base = isinstance(bench.preview_fn, PipelinePreview)
    prompted = image_base or isinstance(bench.preview_fn, TextPreview)
    with gr.Blocks(title="adaptermerge") as app:
        gr.Markdown("# adaptermerge\nMix LoRA adapters with sliders; negative weights subtract an adapter.")
        with gr.Row():
            with gr.Column(scale=1):
                sliders = [
                    gr.Slider(
                        *WEIGHT_RANGE,
                        value=initial[i] if i < len(initial) else 0.0,
                        step=0.05,
                        label=bench.names[i] if i < len(bench.adapters) else "",
                        visible=i < len(bench.adapters),
                        elem_id=f"weight-{i}",
                    )
                    for i in range(MAX_ADAPTERS)
                ]
                method = gr.Dropdown(list(methods), value="linear", label="method", elem_id="method")
                method_doc = gr.Markdown()
                widgets = []
                for c in controls:
                    kwargs = {"label": c.name, "info": c.help, "visible": False, "elem_id": f"param-{c.name}"}
                    if c.kind == "choice":
                        widgets.append(gr.Dropdown(list(c.choices), value=c.choices[0], **kwargs))
                    elif c.kind == "bool":
                        widgets.append(gr.Checkbox(**kwargs))
                    else:
                        widgets.append(gr.Number(precision=None if c.kind == "float" else 0, **kwargs))
                advanced = gr.Textbox(
                    "",
                    lines=2,
                    label="advanced weights (JSON or YAML)",
                    info="adapter name → per-module weights, times its slider: module patterns "
                    '({"fc1": 0.5, "default": 1.0}), diffusers blocks ({"unet": {"up": 0.0}}) or A1111 block '
                    'weights ({"lbw": "OUTD"}); empty: the sliders alone',
                    placeholder=advanced_placeholder(bench),
                    elem_id="advanced-weights",
                )
                uploads = gr.File(label="add an adapter (.safetensors)", file_count="multiple", elem_id="upload")
                upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Row():
                    fmt = gr.Dropdown(list(FORMATS), value="peft", label="export format", elem_id="format")
                    export_button = gr.Button("Export merged adapter", elem_id="export")
                exported = gr.File(label="merged adapter", elem_id="exported")
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    bench.preview_fn.prompt if prompted else "", label="prompt", visible=prompted, elem_id="prompt"
                )
                timing = gr.Markdown(elem_id="timing")
                preview = gr.HTML(visible=not image_base, elem_id="preview")
                image = gr.Image(
                    label="preview", format="png", type="numpy", visible=image_base, elem_id="preview-image"
                )
                sampled = isinstance(bench.preview_fn, SuitePreview) and bench.preview_fn.sampled
                full_button = gr.Button(
                    "Full evaluation (whole test split)", visible=sampled, elem_id="full-evaluation"
                )
                full_scores = gr.HTML(elem_id="full-scores")
                heatmap = gr.HTML(elem_id="heatmap")
        refresh_fusion = fusion_section(gr, bench.preview_fn, lambda: bench.adapters) if image_base else None
        if diffusion:
            _diffusion_section(gr)

        inputs = [method, *sliders, *widgets, advanced]
        outputs = [preview, image, heatmap, timing]
        preview_args = {"fn": on_preview, "inputs": inputs, "outputs": outputs, "api_visibility": "private"}
        changes = [s.release for s in sliders] + [w.input for w in widgets] + [advanced.blur, advanced.submit]
        gr.on(changes, on_preview, inputs, outputs, api_name="preview", trigger_mode="always_last")
        # a full evaluation describes the merge it was asked for: it goes when the merge changes
        gr.on([*changes, method.change], lambda: "", None, full_scores, api_visibility="private")
        method.change(on_method, method, [method_doc, *widgets], api_name="select_method").then(**preview_args)
        app.load(on_method, method, [method_doc, *widgets], api_visibility="private").then(**preview_args)
        prompt.submit(set_prompt, prompt, None, api_name="set_prompt").then(**preview_args)
        uploaded = uploads.upload(on_upload, uploads, [*sliders, upload_status], api_name="upload")
        if refresh_fusion is not None:
            uploaded.then(**refresh_fusion)  # the fusion section's dropdowns list the new adapter
        full_button.click(on_full, inputs, full_scores, api_name="full_evaluation")
        export_button.click(on_export, [*inputs[:-1], fmt, advanced], exported, api_name="export")
    return app


def launch(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    base: str | None = None,
    adapters_dir: str | Path | None = None,
    steps: int = 20,
    size: int | None = None,
    suite: str | None = None,
    prevent_thread_lock: bool = False,
) -> Any:
    """Build the workbench and start the app; warns when `host` is not a loopback address.

    `steps` and `size` (pixels; the pipeline's default when None) set the image preview of a diffusion `base`;
    `suite` picks the embedded bench when there is no `base` or `adapters_dir` (`"text"` by default, or `"digits"`).

    Returns:
        `gradio.Blocks`: the running app (call `.close()` to stop it when `prevent_thread_lock` is set).
    """
    import gradio as gr

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: anyone who can reach this address can use the app and its files", host)
    bench = make_workbench(base, adapters_dir, steps=steps, size=size, suite=suite, progressbar=True)
    app = build_app(bench, diffusion=base in (None, DEMO) and adapters_dir is None)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=MAX_UPLOAD_BYTES,
        css=CSS,
        js=JS,
        theme=gr.themes.Default(),
        quiet=prevent_thread_lock,
    )
    return app
