"""The UI's state: adapters held in memory, their similarities, the preview, uploads and export.

Adapters are read once and every module materialised, so moving a slider only merges factors and re-runs the
preview; nothing is read from disk or rebuilt. With no arguments the workbench is the demo: the digits suite's
backbone and its eight task LoRAs (:func:`adaptermerge.quality.load_demo_suite`), previewed by each task's test
accuracy; with `--base` a causal LM, previewed by generated text, or a diffusers pipeline, previewed by an image
(:class:`~adaptermerge.ui.diffusion.PipelinePreview`, which re-weights linear merges in place). Uploads are
size-limited, refused when they are pickles, and validated like command-line input.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, check_compatible, module_union
from ..errors import AdapterMergeError, InvalidParameterError
from ..io import load_adapter, save_adapter
from ..library import find_adapters
from ..lowrank import inner
from ..merge import merge_adapters
from ..weights import ModuleWeights, check_weights
from .diffusion import PipelinePreview, is_pipeline, load_pipeline, torch_threads

__all__ = [
    "DEMO",
    "MAX_ADAPTERS",
    "MAX_UPLOAD_BYTES",
    "TextPreview",
    "Workbench",
    "export",
    "make_workbench",
    "parse_weight_specs",
    "upload",
]

logger = logging.getLogger(__name__)
MAX_ADAPTERS = 16
MAX_UPLOAD_BYTES = 256 * 2**20
DEMO = "demo"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class Workbench:
    """The app's state: adapters held in memory, their per-module inner products, and the preview function.

    Args:
        adapters (`list[Adapter]`): the adapters offered at start (materialised here).
        preview (`callable`, *optional*): merged adapter (or `None` for the base) → task → score (the demo's
            `Suite.evaluate`), generated text (:class:`TextPreview`) or an image (:class:`PipelinePreview`, which
            also re-weights linear merges in place, see :meth:`show`). Without one the page lists the merged modules.
        reference (`dict`, *optional*): task → own adapter's score, shown next to the merge.
        threads (`int`, *optional*): torch threads while merging and previewing; tiny models run several times
            faster on one thread than on contended ones.
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        *,
        preview: Callable[[Adapter | None], dict[str, float] | str | np.ndarray] | None = None,
        reference: Mapping[str, float] | None = None,
        threads: int | None = None,
    ) -> None:
        self.adapters: list[Adapter] = []
        self.modules: dict[str, int] = {}  # module name → index along the last axis of `module_gram`
        self.module_gram = torch.zeros(0, 0, 0, dtype=torch.float64)
        self.preview_fn = preview
        self.threads = threads
        self.base_scores: dict[str, float] | None = None  # the base model's scores, on the first score preview
        self.reference = dict(reference or {})
        self._folded: dict[tuple[str, str], Adapter] = {}
        with torch_threads(threads):
            for adapter in adapters:
                self.add(adapter)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def add(self, adapter: Adapter) -> Adapter:
        """Materialise, check (finite, compatible with the others and a pipeline base, room left) and keep `adapter`.

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
        if isinstance(self.preview_fn, PipelinePreview):
            self.preview_fn.check(adapter)
        if adapter.name in self.names:
            adapter = dataclasses.replace(adapter, name=f"{adapter.name}_{len(self.adapters) + 1}")
        for module in adapter:
            self.modules.setdefault(module, len(self.modules))
        size, count = len(self.adapters), len(self.modules)
        gram = torch.zeros(size + 1, size + 1, count, dtype=torch.float64)
        gram[:size, :size, : self.module_gram.shape[2]] = self.module_gram
        for index, other in enumerate([*self.adapters, adapter]):
            row = _module_inners(adapter, other, self.modules)
            gram[size, index], gram[index, size] = row, row
        self.module_gram = gram
        self.adapters.append(adapter)
        return adapter

    def resolve(self, adapter: Adapter, spec: Mapping[str, Any]) -> ModuleWeights:
        """An advanced weight `spec` of `adapter` as a module → weight function, checked on each of its modules.

        Raises:
            InvalidParameterError: for a weight mapping that names no valid modules, blocks or preset.
        """
        try:
            resolver = check_weights([spec], 1)[0]
            for module in adapter:  # nested block values are checked when a module resolves
                resolver(module)
        except InvalidParameterError as err:
            raise InvalidParameterError(f"advanced weights of {adapter.name!r}: {err}") from None
        return resolver

    def merge(
        self,
        weights: Sequence[float],
        method: str,
        params: Mapping[str, Any],
        specs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Adapter | None:
        """The merge of the adapters with nonzero weight (`None` when every weight is zero).

        Args:
            specs (`dict`, *optional*): adapter name → per-module weight (see `adaptermerge.weights`). Such an
                adapter's factors are scaled by its slider weight and the mapping is passed as its weight, so the
                module weights are the mapping times the slider whatever the mapping's form.

        Raises:
            InvalidParameterError: for a weight mapping that names no valid modules, blocks or preset.
        """
        chosen = []
        for adapter, weight in zip(self.adapters, weights):
            if not weight:
                continue
            spec = (specs or {}).get(adapter.name)
            if spec is None:
                chosen.append((adapter, float(weight)))
                continue
            if adapter.is_dora:
                raise InvalidParameterError(
                    f"advanced weights of {adapter.name!r}: a DoRA adapter's update is not its factors times a "
                    "weight, so per-module weights are not folded into it; use its slider"
                )
            self.resolve(adapter, spec)
            scaled = adapter.with_modules({m: u.scale(float(weight)) for m, u in adapter.items()})
            chosen.append((scaled, spec))
        if not chosen:
            return None
        adapters, chosen_weights = zip(*chosen)
        base = None
        if isinstance(self.preview_fn, PipelinePreview | TextPreview) and any(a.is_dora for a in adapters):
            base = self.preview_fn.base_weights(module_union(list(adapters)))
        with torch_threads(self.threads):
            return merge_adapters(list(adapters), list(chosen_weights), method, base=base, **params)

    def folded(self, specs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Adapter]:
        """Every adapter with its advanced weight folded into its factors (`w(m) ΔW_m`), in slider order.

        The same objects come back while `specs` stay the same, so a live preview sees that nothing changed.

        Raises:
            InvalidParameterError: for a weight mapping that names no valid modules, blocks or preset.
        """
        kept, folded = {}, []
        for adapter in self.adapters:
            spec = (specs or {}).get(adapter.name)
            if spec is None:
                folded.append(adapter)
                continue
            key = (adapter.name, json.dumps(spec, sort_keys=True, default=str))
            if key not in self._folded:
                resolver = self.resolve(adapter, spec)
                self._folded[key] = adapter.with_modules({m: u.scale(resolver(m)) for m, u in adapter.items()})
            kept[key] = self._folded[key]
            folded.append(kept[key])
        self._folded = kept
        return folded

    def show(
        self,
        weights: Sequence[float],
        method: str,
        params: Mapping[str, Any],
        specs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> str | np.ndarray:
        """The preview of a merge: HTML (see :meth:`preview`), or an image (`uint8`, `(H, W, 3)`) for a pipeline.

        A `linear` merge of plain LoRAs without parameters on a :class:`PipelinePreview` is not computed here: the
        pipeline's loaded merge is re-weighted in place. Everything else, DoRA adapters included (merged with the
        pipeline's own base weights), is merged by :meth:`merge`, then previewed.

        Raises:
            AdapterMergeError: for bad parameters or advanced weights, with a message for the page.
        """
        weights = [float(w) for w in weights[: len(self.adapters)]]
        live = not any(a.is_dora for a in self.adapters)  # a DoRA merge's magnitudes depend on the weights
        if isinstance(self.preview_fn, PipelinePreview) and method == "linear" and not params and live:
            folded = self.folded(specs)
            with torch_threads(self.threads):
                return self.preview_fn.reweight(folded, weights)
        return self.preview(self.merge(weights, method, params, specs))

    def preview(self, merged: Adapter | None) -> str | np.ndarray:
        """The preview of `merged`: per-task scores of base, own adapter and merge with bars, generated text or an
        image, as the preview function gives; without one, the merged modules."""
        if self.preview_fn is None:
            if merged is None:
                return "<p>All weights are zero: the base model.</p>"
            rows = "".join(f"<tr><td>{html.escape(m)}</td><td>rank {u.rank}</td></tr>" for m, u in merged.items())
            return f"<table class='am-preview'><tr><th>module</th><th>merged</th></tr>{rows}</table>"
        with torch_threads(self.threads):
            scores = self.preview_fn(merged)
            if isinstance(scores, dict) and self.base_scores is None:
                self.base_scores = self.preview_fn(None)
        if isinstance(scores, np.ndarray):
            return scores
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

    def cosines(
        self, weights: Sequence[float], specs: Mapping[str, Mapping[str, Any]] | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """The adapters with nonzero weight and the pairwise cosines of their weighted updates, as the merge uses
        them: module `m` of adapter `i` counts as `w_i · spec_i(m) · ΔW_i,m` (slider times advanced weight).

        Returns:
            `tuple`: the adapters' indices and the `(k, k)` float64 cosine matrix, from per-module inner products
            computed once on the factors.
        """
        index = [i for i, w in enumerate(weights[: len(self.adapters)]) if w]
        scale = torch.zeros(len(index), len(self.modules), dtype=torch.float64)
        for row, i in enumerate(index):
            adapter = self.adapters[i]
            spec = (specs or {}).get(adapter.name)
            resolver = self.resolve(adapter, spec) if spec is not None else None
            for module in adapter:
                scale[row, self.modules[module]] = float(weights[i]) * (resolver(module) if resolver else 1.0)
        gram = torch.einsum("im,jm,ijm->ij", scale, scale, self.module_gram[index][:, index])
        norms = gram.diagonal().clamp_min(1e-30).sqrt()
        return index, gram / torch.outer(norms, norms)

    def heatmap(self, weights: Sequence[float], specs: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """:meth:`cosines` of the adapters with nonzero weight as an HTML table."""
        index, cosines = self.cosines(weights, specs)
        if len(index) < 2:
            return "<p>Give two or more adapters a nonzero weight to see how their updates overlap.</p>"
        # columns are numbered (the name in a tooltip) so the table keeps to its column however long the names
        header = "".join(f"<th title='{html.escape(self.names[j])}'>{n}</th>" for n, j in enumerate(index, 1))
        cells = [f"<tr><th></th>{header}</tr>"]
        for row, i in enumerate(index):
            line = [f"<th class='am-name'>{row + 1} {html.escape(self.names[i])}</th>"]
            for cos in cosines[row].tolist():
                colour = f"rgba(220,40,40,{abs(cos):.2f})" if cos > 0 else f"rgba(40,90,220,{abs(cos):.2f})"
                line.append(f"<td style='background:{colour}'>{cos:+.2f}</td>")
            cells.append("<tr>" + "".join(line) + "</tr>")
        weighted = "sliders × advanced weights" if specs else "sliders"
        note = f"cosine of the weighted updates ({weighted}) over all modules; red: aligned, blue: opposed"
        table = f"<table class='am-heatmap'>{''.join(cells)}</table>"
        return f"<div class='am-heatmap-wrap'>{table}</div><p>{note}</p>"


def _module_inners(x: Adapter, y: Adapter, modules: Mapping[str, int]) -> torch.Tensor:
    """⟨ΔW_x, ΔW_y⟩ per module (zero where either lacks it) at `modules[name]`, computed on the factors."""
    row = torch.zeros(len(modules), dtype=torch.float64)
    for module in x:
        if module in y:
            row[modules[module]] = float(inner(x[module].to(torch.float64), y[module].to(torch.float64)))
    return row


def _read_folder(folder: Path) -> list[Adapter]:
    adapters = []
    for path in find_adapters(folder)[:MAX_ADAPTERS]:
        # diffusers' save_lora_weights names every file alike: call such an adapter by its folder
        adapters.append(load_adapter(path, name=path.parent.name if path.name == DIFFUSERS_FILE else None))
    if not adapters:
        raise AdapterMergeError(f"no adapters (PEFT folders or .safetensors files) found under {folder}")
    return adapters


def demo_workbench() -> Workbench:
    """The embedded default: the digits suite's task LoRAs, previewed by per-task test accuracy."""
    from ..quality import load_demo_suite

    with torch_threads(1):
        suite = load_demo_suite()
        adapters = suite.adapters()
        reference = {a.name: suite.evaluate(a, tasks=[a.name])[a.name] for a in adapters}
    return Workbench(adapters, preview=suite.evaluate, reference=reference, threads=1)


def make_workbench(
    base: str | None = None, adapters_dir: str | Path | None = None, *, steps: int = 20, size: int | None = None
) -> Workbench:
    """The workbench for the command line's `--base` and `--adapters` (the demo when both are absent).

    `steps` and `size` set a diffusion base's preview: denoising steps and image side in pixels (the pipeline's
    default when None).

    Raises:
        AdapterMergeError: for an adapter folder with no readable adapter, a base the app cannot preview, or
            adapters whose modules the base lacks.
    """
    if base in (None, DEMO) and adapters_dir is None:
        return demo_workbench()
    if adapters_dir is None:
        raise AdapterMergeError(f"--base {base} needs --adapters DIR: the folder of adapters trained on it")
    adapters = _read_folder(Path(adapters_dir))
    if base in (None, DEMO):
        return Workbench(adapters)
    if not is_pipeline(base):
        return Workbench(adapters, preview=TextPreview(base))
    preview = PipelinePreview(load_pipeline(base), steps=steps, size=size, prompt="a photo of a cat")
    bench = Workbench(adapters, preview=preview)
    if not any(a.is_dora for a in bench.adapters):  # DoRA adapters are merged per preview, never loaded live
        preview.load(bench.adapters)  # now rather than at the first slider move
    return bench


class TextPreview:
    """Greedy text from a causal LM with the merged update added to its weights (restored before the next merge).

    The model is loaded once; a preview adds each merged module's `ΔW` to the matching Linear weight in place (a
    DoRA module sets the weight to `m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row`), so nothing is re-read or rebuilt when a slider
    moves. Its weights before any preview are the `W0` that DoRA merges use.

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

    def base_weights(self, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own base weights `W0` of `modules` (before any preview changed them), for DoRA merges."""
        weights = {}
        for name in modules:
            key = self._key(name)
            weights[name] = self.originals.get(key, self.linears[key].weight.detach())
        return weights

    @torch.no_grad()
    def __call__(self, merged: Adapter | None) -> str:
        for name, original in self.originals.items():
            self.linears[name].weight.copy_(original)
        for name, update in (merged or {}).items():
            key = self._key(name)
            module = self.linears[key]
            W0 = self.originals.setdefault(key, module.weight.detach().clone())
            weight = W0.double() + update.to_dense().reshape(W0.shape)
            if update.magnitude is not None:  # DoRA: each row rescaled to its magnitude
                weight = weight * (update.magnitude.double() / weight.norm(dim=1))[:, None]
            module.weight.copy_(weight.to(module.weight.dtype))
        inputs = self.tokenizer(self.prompt, return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.prompt + " → " + self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def parse_weight_specs(text: str | None, names: Sequence[str]) -> dict[str, Mapping[str, Any]]:
    """The "advanced weights" box: JSON or YAML mapping adapter names to per-module weight mappings.

    Each value is a module-pattern mapping (`{"fc1": 0.5, "default": 1.0}`), a diffusers block dict
    (`{"unet": {"up": 0.0}}`) or an A1111 block-weight vector (`{"lbw": "OUTD"}`); an empty box gives `{}`.

    Raises:
        InvalidParameterError: for text that is not JSON/YAML, not a mapping, names no held adapter, or gives a
            number where a mapping is expected.
    """
    import yaml

    if not text or not text.strip():
        return {}
    try:
        specs = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidParameterError(f"advanced weights are not valid JSON or YAML: {err}") from None
    if not isinstance(specs, Mapping):
        raise InvalidParameterError(
            'advanced weights take a mapping from adapter name to weights, e.g. {"digit": {"fc1": 0.5}}'
        )
    unknown = sorted(str(name) for name in specs if name not in names)
    if unknown:
        raise InvalidParameterError(f"advanced weights name unknown adapters {unknown}; adapters: {', '.join(names)}")
    for name, spec in specs.items():
        if not isinstance(spec, Mapping):
            raise InvalidParameterError(
                f"advanced weights of {name!r}: give a mapping (module patterns, blocks or 'lbw'); the slider gives "
                f"a single number, got {spec!r}"
            )
    return dict(specs)


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


def export(
    bench: Workbench,
    weights: Sequence[float],
    method: str,
    params: Mapping[str, Any],
    fmt: str,
    specs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the merge in `fmt` to a new temporary folder; a PEFT folder is zipped. Returns the file to download."""
    merged = bench.merge(weights, method, params, specs)
    if merged is None:
        raise AdapterMergeError("every weight is zero: move a slider before exporting")
    folder = Path(tempfile.mkdtemp(prefix="adaptermerge-export-"))
    if fmt == "peft":
        written = save_adapter(merged, folder / "merged", format=fmt)
        return Path(shutil.make_archive(str(folder / "merged-peft"), "zip", written))
    return save_adapter(merged, folder / f"merged-{fmt}.safetensors", format=fmt)
