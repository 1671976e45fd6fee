"""The Gradio app: a slider per adapter, a merge method with its parameters, a live preview, a heatmap, export.

Adapters are read once and kept in memory (every module materialised), so moving a slider only merges factors and
re-runs the preview; nothing is read from disk or rebuilt. With no arguments the app opens on the demo: the digits
suite's backbone and its eight task LoRAs (:func:`adaptermerge.quality.load_demo_suite`), whose preview is each
task's test accuracy. File access is limited to the folders given on the command line; uploads are size-limited,
refused when they are pickles, and validated like command-line input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, check_compatible, module_union
from .errors import AdapterMergeError
from .io import FORMATS, load_adapter, save_adapter
from .library import find_adapters
from .lowrank import inner
from .merge import merge_adapters
from .methods import list_methods

__all__ = ["MAX_ADAPTERS", "MAX_UPLOAD_BYTES", "TextPreview", "Workbench", "build_app", "launch"]

logger = logging.getLogger(__name__)
MAX_ADAPTERS = 16
MAX_UPLOAD_BYTES = 256 * 2**20
WEIGHT_RANGE = (-1.0, 2.0)
DEMO = "demo"


@dataclasses.dataclass(frozen=True)
class ParamControl:
    """One method parameter shown in the page: its name, widget kind, choices and help."""

    name: str
    kind: str  # "float", "int", "optional_int", "bool" or "choice"
    choices: tuple[str, ...] = ()
    help: str = ""


def _methods() -> dict[str, Any]:
    """The methods the app offers: those that return one adapter (per-module methods)."""
    return {m.name: m for m in list_methods() if m.per_module}


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


class Workbench:
    """The app's state: adapters held in memory, their pairwise inner products, and the preview function.

    Args:
        adapters (`list[Adapter]`): the adapters offered at start (materialised here).
        preview (`callable`, *optional*): merged adapter (or `None` for the base) → task → score (the demo's
            `Suite.evaluate`) or generated text (:class:`TextPreview`). Without one the page lists the merged modules.
        reference (`dict`, *optional*): task → own adapter's score, shown next to the merge.
        threads (`int`, *optional*): torch threads while merging and previewing; tiny models run several times
            faster on one thread than on contended ones.
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        *,
        preview: Callable[[Adapter | None], dict[str, float] | str] | None = None,
        reference: Mapping[str, float] | None = None,
        threads: int | None = None,
    ) -> None:
        self.adapters: list[Adapter] = []
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.preview_fn = preview
        self.threads = threads
        self.base_scores = {}
        if preview:
            with self._threads():
                self.base_scores = preview(None)
        self.reference = dict(reference or {})
        for adapter in adapters:
            self.add(adapter)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def add(self, adapter: Adapter) -> Adapter:
        """Materialise, check (finite, compatible with the others, room left) and keep `adapter`.

        Raises:
            AdapterMergeError: with a message for the page when the adapter cannot join.
        """
        if len(self.adapters) >= MAX_ADAPTERS:
            raise AdapterMergeError(f"the app holds at most {MAX_ADAPTERS} adapters; merge some first with the CLI")
        adapter = adapter.materialize()
        for update in adapter.values():
            update.check_finite()
        if self.adapters:
            check_compatible([*self.adapters, adapter], module_union([*self.adapters, adapter]))
        if adapter.name in self.names:
            adapter = dataclasses.replace(adapter, name=f"{adapter.name}_{len(self.adapters) + 1}")
        row = torch.tensor(
            [_adapter_inner(adapter, other) for other in [*self.adapters, adapter]], dtype=torch.float64
        )
        size = len(self.adapters)
        gram = torch.zeros(size + 1, size + 1, dtype=torch.float64)
        gram[:size, :size] = self.gram
        gram[size, :], gram[:, size] = row, row
        self.gram = gram
        self.adapters.append(adapter)
        return adapter

    def merge(self, weights: Sequence[float], method: str, params: Mapping[str, Any]) -> Adapter | None:
        """The merge of the adapters with nonzero weight (`None` when every weight is zero)."""
        chosen = [(a, float(w)) for a, w in zip(self.adapters, weights) if w]
        if not chosen:
            return None
        adapters, chosen_weights = zip(*chosen)
        with self._threads():
            return merge_adapters(list(adapters), list(chosen_weights), method, **params)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def preview(self, merged: Adapter | None) -> str:
        """The preview as HTML: per-task scores of base, own adapter and merge, with bars."""
        if self.preview_fn is None:
            if merged is None:
                return "<p>All weights are zero: the base model.</p>"
            rows = "".join(f"<tr><td>{html.escape(m)}</td><td>rank {u.rank}</td></tr>" for m, u in merged.items())
            return f"<table class='am-preview'><tr><th>module</th><th>merged</th></tr>{rows}</table>"
        with self._threads():
            scores = self.preview_fn(merged)
        if isinstance(scores, str):
            return f"<pre class='am-text'>{html.escape(scores)}</pre>"
        rows = []
        for task, score in scores.items():
            own = self.reference.get(task)
            bar = f"<div class='am-bar' style='width:{100 * score:.1f}%'></div>"
            rows.append(
                f"<tr><td>{html.escape(task)}</td><td>{self.base_scores.get(task, float('nan')):.3f}</td>"
                f"<td>{'' if own is None else f'{own:.3f}'}</td><td class='am-merged'>{score:.3f}</td>"
                f"<td class='am-barcell'>{bar}</td></tr>"
            )
        normalised = [s / self.reference[t] for t, s in scores.items() if self.reference.get(t)]
        summary = (
            f"mean normalised accuracy (merged / own): {sum(normalised) / len(normalised):.3f}" if normalised else ""
        )
        head = "<tr><th>task</th><th>base</th><th>own adapter</th><th>merged</th><th></th></tr>"
        return f"<table class='am-preview'>{head}{''.join(rows)}</table><p class='am-summary'>{summary}</p>"

    def heatmap(self, weights: Sequence[float]) -> str:
        """Pairwise cosine of the weighted updates `w_i ΔW_i` of the adapters with nonzero weight, as HTML."""
        index = [i for i, w in enumerate(weights[: len(self.adapters)]) if w]
        if len(index) < 2:
            return "<p>Give two or more adapters a nonzero weight to see how their updates overlap.</p>"
        norms = self.gram.diagonal().clamp_min(1e-30).sqrt()
        cells = ["<tr><th></th>" + "".join(f"<th>{html.escape(self.names[j])}</th>" for j in index) + "</tr>"]
        for i in index:
            row = [f"<th>{html.escape(self.names[i])}</th>"]
            for j in index:
                sign = 1.0 if weights[i] * weights[j] > 0 else -1.0
                cos = sign * float(self.gram[i, j] / (norms[i] * norms[j]))
                colour = f"rgba(220,40,40,{abs(cos):.2f})" if cos > 0 else f"rgba(40,90,220,{abs(cos):.2f})"
                row.append(f"<td style='background:{colour}'>{cos:+.2f}</td>")
            cells.append("<tr>" + "".join(row) + "</tr>")
        note = "cosine of the weighted updates over all modules; red: aligned, blue: opposed"
        return f"<table class='am-heatmap'>{''.join(cells)}</table><p>{note}</p>"


def _adapter_inner(x: Adapter, y: Adapter) -> float:
    """⟨ΔW_x, ΔW_y⟩ summed over the modules both adapters hold, computed on the factors."""
    return sum(float(inner(x[m].to(torch.float64), y[m].to(torch.float64))) for m in x if m in y)


def _read_folder(folder: Path) -> list[Adapter]:
    adapters = []
    for path in find_adapters(folder)[:MAX_ADAPTERS]:
        adapters.append(load_adapter(path))
    if not adapters:
        raise AdapterMergeError(f"no adapters (PEFT folders or .safetensors files) found under {folder}")
    return adapters


def demo_workbench() -> Workbench:
    """The embedded default: the digits suite's task LoRAs, previewed by per-task test accuracy."""
    from .quality import load_demo_suite

    suite = load_demo_suite()
    adapters = suite.adapters()
    reference = {a.name: suite.evaluate(a, tasks=[a.name])[a.name] for a in adapters}
    return Workbench(adapters, preview=suite.evaluate, reference=reference, threads=1)


def make_workbench(base: str | None = None, adapters_dir: str | Path | None = None) -> Workbench:
    """The workbench for the command line's `--base` and `--adapters` (the demo when both are absent).

    Raises:
        AdapterMergeError: for an adapter folder with no readable adapter, or a base the app cannot preview.
    """
    if base in (None, DEMO) and adapters_dir is None:
        return demo_workbench()
    if adapters_dir is None:
        raise AdapterMergeError(f"--base {base} needs --adapters DIR: the folder of adapters trained on it")
    adapters = _read_folder(Path(adapters_dir))
    return Workbench(adapters, preview=TextPreview(base) if base not in (None, DEMO) else None)


class TextPreview:
    """Greedy text from a causal LM with the merged update added to its weights (restored before the next merge).

    The model is loaded once; a preview adds each merged module's `ΔW` to the matching Linear weight in place, so
    nothing is re-read or rebuilt when a slider moves.

    Args:
        base (`str`): a local folder or hub id that `transformers.AutoModelForCausalLM` and `AutoTokenizer` read.
        prompt (`str`): the text to continue.
        max_new_tokens (`int`): the length of the continuation.
    """

    def __init__(self, base: str, *, prompt: str = "the", max_new_tokens: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.model = AutoModelForCausalLM.from_pretrained(base).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError) as err:
            raise AdapterMergeError(
                f"cannot load base model {base!r} as a causal LM with a tokenizer: {err}"
            ) from None
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.linears = {n: m for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.originals: dict[str, torch.Tensor] = {}

    def _key(self, name: str) -> str:
        for candidate in (name, name.removeprefix("base_model.model."), f"model.{name}"):
            if candidate in self.linears:
                return candidate
        raise AdapterMergeError(f"adapter module {name!r} is not a Linear layer of the base model; wrong --base?")

    @torch.no_grad()
    def __call__(self, merged: Adapter | None) -> str:
        for name, original in self.originals.items():
            self.linears[name].weight.copy_(original)
        for name, update in (merged or {}).items():
            key = self._key(name)
            module = self.linears[key]
            self.originals.setdefault(key, module.weight.detach().clone())
            module.weight.add_(update.to_dense().reshape(module.weight.shape).to(module.weight.dtype))
        inputs = self.tokenizer(self.prompt, return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.prompt + " → " + self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def upload(bench: Workbench, files: Sequence[str | Path]) -> Adapter:
    """Validate uploaded files like command-line input and add them as one adapter.

    A single `.safetensors` file is read as a kohya, diffusers or PEFT state dict; `adapter_config.json` with
    `adapter_model.safetensors` as a PEFT folder. Pickles are refused.

    Raises:
        AdapterMergeError: for a file too large, of the wrong kind, unreadable or incompatible.
    """
    paths = [Path(f) for f in files]
    for path in paths:
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise AdapterMergeError(
                f"{path.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB; merge it with the CLI"
            )
        if path.suffix not in (".safetensors", ".json"):
            raise AdapterMergeError(f"{path.name}: upload .safetensors files (and adapter_config.json), not pickles")
    names = {p.name for p in paths}
    if len(paths) == 1 and paths[0].suffix == ".safetensors":
        return bench.add(load_adapter(paths[0]))
    if names == {"adapter_config.json", "adapter_model.safetensors"}:
        folder = Path(tempfile.mkdtemp(prefix="adaptermerge-upload-"))
        for path in paths:
            shutil.copy(path, folder / path.name)
        return bench.add(load_adapter(folder, name=f"upload{len(bench.adapters) + 1}"))
    raise AdapterMergeError(
        f"upload one .safetensors file, or adapter_config.json with adapter_model.safetensors; got {sorted(names)}"
    )


def export(bench: Workbench, weights: Sequence[float], method: str, params: Mapping[str, Any], fmt: str) -> Path:
    """Write the merge in `fmt` to a new temporary folder; a PEFT folder is zipped. Returns the file to download."""
    merged = bench.merge(weights, method, params)
    if merged is None:
        raise AdapterMergeError("every weight is zero: move a slider before exporting")
    folder = Path(tempfile.mkdtemp(prefix="adaptermerge-export-"))
    if fmt == "peft":
        written = save_adapter(merged, folder / "merged", format=fmt)
        return Path(shutil.make_archive(str(folder / "merged-peft"), "zip", written))
    return save_adapter(merged, folder / f"merged-{fmt}.safetensors", format=fmt)


CSS = """
.am-preview td, .am-preview th, .am-heatmap td, .am-heatmap th {padding: 2px 8px; text-align: right}
.am-barcell {width: 200px} .am-bar {height: 12px; background: #e07b00}
"""


def build_app(bench: Workbench) -> Any:
    """The Gradio Blocks of the app over `bench`.

    Endpoints for `gradio_client`: `/preview` (method, weights×MAX_ADAPTERS, parameters…) → (preview HTML, heatmap
    HTML, timing text); `/select_method` (method) → parameter controls; `/upload` (files) → sliders, previews;
    `/export` (method, weights…, parameters…, format) → file.
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

    def on_preview(method: str, *values: Any) -> tuple[str, str, str]:
        weights, param_values = split(values)
        start = time.perf_counter()
        try:
            merged = bench.merge(weights, method, params_of(method, param_values))
            preview = bench.preview(merged)
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None
        elapsed = time.perf_counter() - start
        return preview, bench.heatmap(weights), f"merge + preview: {1000 * elapsed:.0f} ms"

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
        if isinstance(bench.preview_fn, TextPreview):
            bench.preview_fn.prompt = text

    def on_export(method: str, *values: Any) -> str:
        *values, fmt = values
        weights, param_values = split(values)
        try:
            return str(export(bench, weights, method, params_of(method, param_values), fmt))
        except (AdapterMergeError, ValueError) as err:
            raise gr.Error(str(err)) from None

    initial = [1.0 / max(len(bench.adapters), 1)] * len(bench.adapters)
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
                uploads = gr.File(label="add an adapter (.safetensors)", file_count="multiple", elem_id="upload")
                upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Row():
                    fmt = gr.Dropdown(list(FORMATS), value="peft", label="export format", elem_id="format")
                    export_button = gr.Button("Export merged adapter", elem_id="export")
                exported = gr.File(label="merged adapter", elem_id="exported")
            with gr.Column(scale=1):
                text_base = isinstance(bench.preview_fn, TextPreview)
                prompt = gr.Textbox(
                    bench.preview_fn.prompt if text_base else "", label="prompt", visible=text_base, elem_id="prompt"
                )
                timing = gr.Markdown(elem_id="timing")
                preview = gr.HTML(elem_id="preview")
                heatmap = gr.HTML(elem_id="heatmap")

        inputs = [method, *sliders, *widgets]
        outputs = [preview, heatmap, timing]
        preview_args = {"fn": on_preview, "inputs": inputs, "outputs": outputs, "api_visibility": "private"}
        gr.on(
            [s.release for s in sliders] + [w.input for w in widgets],
            on_preview,
            inputs,
            outputs,
            api_name="preview",
            trigger_mode="always_last",
        )
        method.change(on_method, method, [method_doc, *widgets], api_name="select_method").then(**preview_args)
        app.load(on_method, method, [method_doc, *widgets], api_visibility="private").then(**preview_args)
        prompt.submit(set_prompt, prompt, None, api_name="set_prompt").then(**preview_args)
        uploads.upload(on_upload, uploads, [*sliders, upload_status], api_name="upload")
        export_button.click(on_export, [*inputs, fmt], exported, api_name="export")
    return app


def launch(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    base: str | None = None,
    adapters_dir: str | Path | None = None,
    prevent_thread_lock: bool = False,
) -> Any:
    """Build the workbench and start the app; warns when `host` is not a loopback address.

    Returns:
        `gradio.Blocks`: the running app (call `.close()` to stop it when `prevent_thread_lock` is set).
    """
    import gradio as gr

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: anyone who can reach this address can use the app and its files", host)
    bench = make_workbench(base, adapters_dir)
    app = build_app(bench)
    allowed = [str(adapters_dir)] if adapters_dir else []
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=allowed,
        css=CSS,
        theme=gr.themes.Default(),
        quiet=prevent_thread_lock,
    )
    return app
