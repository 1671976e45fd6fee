"""`load_merged_adapters` for diffusers pipelines: merge, then load through the pipeline's own LoRA loader.

The merged adapter is written as a diffusers LoRA file (with its `lora_adapter_metadata`, so mixed ranks load with
the exact scales) into a temporary folder and read back by `pipe.load_lora_weights`. A state dict passed in memory
would lose that metadata: diffusers only reads it from a safetensors header. Loading through the host means its
`set_adapters`, `fuse_lora`/`unfuse_lora`, `disable_lora`, `delete_adapters` and `save_lora_weights` all work on
the merged adapter, which is one ordinary LoRA named `adapter_name`.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import IncompatibleVersionsError
from ..io import diffusers as diffusers_io
from ..merge import AdapterLike
from ..weights import Weight
from ._compat import gate_message, transformers_peft_minimum
from ._live import build_merge, check_host_modules, host_live

__all__ = ["find_pipeline_module", "load_into_pipeline"]

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
        adapters, weights, method, adapter_name=adapter_name, dtype=dtype, params=params, find=find
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
        registry[adapter_name] = live
    logger.info("loaded merged adapter %r (%s, %d modules) into %s", adapter_name, method, len(merged), type(pipe))
    return merged
