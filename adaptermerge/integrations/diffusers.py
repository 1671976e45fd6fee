"""`load_merged_adapters` for diffusers pipelines: merge, then load through the pipeline's own LoRA loader.

The merged adapter is written as a diffusers LoRA file (with its `lora_adapter_metadata`, so mixed ranks load with
the exact scales) into a temporary folder and read back by `pipe.load_lora_weights`. A state dict passed in memory
would lose that metadata: diffusers only reads it from a safetensors header. Loading through the host means its
`set_adapters`, `fuse_lora`/`unfuse_lora`, `disable_lora`, `delete_adapters` and `save_lora_weights` all work on
the merged adapter, which is one ordinary LoRA named `adapter_name`.

A live merge whose weights change during denoising (step schedules, `k_lora`) is driven by the callback of
:func:`merge_schedule_callback`, passed as the pipeline's `callback_on_step_end`.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import IncompatibleVersionsError, InvalidParameterError
from ..io import diffusers as diffusers_io
from ..merge import AdapterLike
from ..weights import Weight
from ._compat import gate_message, transformers_peft_minimum
from ._live import build_merge, check_host_modules, host_live

__all__ = ["MergeScheduleStep", "find_pipeline_module", "load_into_pipeline", "merge_schedule_callback"]

logger = logging.getLogger(__name__)


def find_pipeline_module(pipe: Any, module: str) -> torch.nn.Module | None:
    """The layer of `pipe` an adapter module name points at (`unet.down_blocks…`), or None when there is none."""
    split = diffusers_io.split_component(module)
    if split is None or split[0] not in getattr(pipe, "_lora_loadable_modules", ()):
        return None
    component, path = split
    model = getattr(pipe, component, None)
    if model is None:
        return None
    if component.startswith("text_encoder") and not hasattr(model, "text_model"):
        path = path.removeprefix(diffusers_io.TEXT_MODEL)
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _pipeline_dtype(pipe: Any) -> torch.dtype:
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if model is not None:
            return next(model.parameters()).dtype
    return torch.float32


def _check_text_encoder_loader(merged: Adapter) -> None:
    """diffusers loads text-encoder LoRAs through transformers' PEFT integration: say first when that refuses."""
    encoders = sorted({name.split(".")[0] for name in merged if name.startswith("text_encoder")})
    minimum = transformers_peft_minimum() if encoders else None
    if minimum is not None:
        raise IncompatibleVersionsError(
            f"{gate_message(minimum)}, and diffusers loads the merge's {' and '.join(encoders)} LoRA through "
            f"transformers: pip install 'peft>={minimum}' or a transformers release that accepts your peft "
            "(`adaptermerge env` shows what is installed)"
        )


def load_into_pipeline(
    pipe: Any,
    adapters: Sequence[AdapterLike],
    weights: Sequence[Weight] | None = None,
    method: str = "linear",
    *,
    adapter_name: str = "merged",
    dtype: torch.dtype | None = None,
    **params: Any,
) -> Adapter:
    """Merge `adapters` and load the result into a diffusers pipeline as the active LoRA `adapter_name`.

    An adapter already loaded under `adapter_name` is replaced. See :func:`adaptermerge.load_merged_adapters`.
    """
    dtype = dtype or _pipeline_dtype(pipe)
    find = functools.partial(find_pipeline_module, pipe)
    merged, live = build_merge(
        adapters,
        weights,
        method,
        adapter_name=adapter_name,
        dtype=dtype,
        params=params,
        find=find,
        allow_schedules=True,
    )
    check_host_modules(merged, find, type(pipe).__name__)
    _check_text_encoder_loader(merged)
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    if adapter_name in loaded:
        pipe.delete_adapters(adapter_name)
    with tempfile.TemporaryDirectory(prefix="adaptermerge_") as tmp:
        folder = diffusers_io.save(merged, Path(tmp) / adapter_name, dtype=dtype)
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name])
    registry = host_live(pipe)
    registry.pop(adapter_name, None)
    if live is not None:
        live.attach(lambda module: find_pipeline_module(pipe, module))
        live.apply(0.0)
        registry[adapter_name] = live
    logger.info("loaded merged adapter %r (%s, %d modules) into %s", adapter_name, method, len(merged), type(pipe))
    return merged


class MergeScheduleStep:
    """A `callback_on_step_end` that moves a live merge to the next step's weights (see `merge_schedule_callback`).

    Args:
        adapter_name (`str`): the live merge to drive.
        callback (`Callable`, *optional*): the user's own `callback_on_step_end(pipe, step, timestep, kwargs)`, called
            after the weights are written; its return value is passed on.
    """

    tensor_inputs: list[str] = []  # what diffusers' `MultiPipelineCallbacks` collects: nothing for this one

    def __init__(self, adapter_name: str = "merged", callback: Callable[..., dict] | None = None) -> None:
        self.adapter_name = adapter_name
        self.callback = callback

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        live = host_live(pipe).get(self.adapter_name)
        if live is None:
            raise InvalidParameterError(f"no live merge named {self.adapter_name!r} in this {type(pipe).__name__}")
        total = pipe.num_timesteps
        live.apply((step + 1) / total if step + 1 < total else 0.0)  # after the last step: ready for the next image
        return callback_kwargs if self.callback is None else self.callback(pipe, step, timestep, callback_kwargs)


def merge_schedule_callback(
    pipe: Any, callback: Callable[..., dict] | None = None, *, adapter_name: str = "merged"
) -> Callable[..., dict]:
    """The `callback_on_step_end` that applies a live merge's step schedule (or `k_lora` choices) during denoising.

    ```py
    pipe.load_merged_adapters([subject, style], weights=[[[0.0, 1.0], [0.6, 0.2]], [[0.3, 1.0]]])
    image = pipe(prompt, callback_on_step_end=pipe.merge_schedule_callback()).images[0]
    ```

    At the end of step `i` of `N` it writes the weights of progress `(i + 1) / N` into the loaded `lora_B` factors in
    place (only modules whose weights changed; no file is read), and after the last step those of progress 0, so the
    next call starts right. Without this callback the pipeline runs with the weights of progress 0 throughout.

    Args:
        pipe: the diffusers pipeline holding the live merge.
        callback (`Callable` or diffusers `PipelineCallback`, *optional*): your own `callback_on_step_end`, chained
            after the weights are written (a `PipelineCallback` keeps its `tensor_inputs`).
        adapter_name (`str`, defaults to `"merged"`): the live merge's name.

    Raises:
        InvalidParameterError: when `pipe` holds no live merge named `adapter_name`.
    """
    if adapter_name not in host_live(pipe):
        raise InvalidParameterError(
            f"no live merge named {adapter_name!r} in this {type(pipe).__name__}: step schedules and k_lora need "
            "load_merged_adapters(..., method='linear' or 'k_lora') first"
        )
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
        return MultiPipelineCallbacks([MergeScheduleStep(adapter_name), callback])
    return MergeScheduleStep(adapter_name, callback)
