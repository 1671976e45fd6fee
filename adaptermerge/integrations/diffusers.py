"""`load_merged_adapters` for diffusers pipelines: merge, then load through the pipeline's own LoRA loader.

The merged adapter is written as a diffusers LoRA file (with its `lora_adapter_metadata`, so mixed ranks load with
the exact scales) into a temporary folder and read back by `pipe.load_lora_weights`. A state dict passed in memory
would lose that metadata: diffusers only reads it from a safetensors header. Loading through the host means its
`set_adapters`, `fuse_lora`/`unfuse_lora`, `disable_lora`, `delete_adapters` and `save_lora_weights` all work on
the merged adapter, which is one ordinary LoRA named `adapter_name`.

A live merge whose weights change during denoising (step schedules, `k_lora`) is applied by a forward pre-hook on the
pipeline's denoiser (`unet`, `transformer`, `transformer_2`, ...; :class:`DenoisingProgressHook`), so a plain
`pipe(prompt)` follows the schedule: before each denoiser call it reads the step being denoised from the pipeline's
scheduler and writes that progress's weights into the denoiser's LoRA layers, only when they change. The hook is
registered while such a merge is loaded and removed when it is reloaded without a schedule, replaced, deleted or
unloaded.

Which step is being denoised: the scheduler's own step counter, `scheduler.step_index` (Euler, Heun, DPM-Solver,
UniPC, LCM, flow-matching, ...: every scheduler with `step_index`) or `scheduler.counter` (PNDM), is the index of
the step in `scheduler.timesteps`; before the first `scheduler.step` of a call it is `scheduler.begin_index` (set
by img2img and by most flow-matching pipelines), else 0. Schedulers without a counter (DDIM, DDPM) are matched by
value: the `timestep` passed to the denoiser must be exactly one entry of `scheduler.timesteps`, which holds for the
UNet pipelines these schedulers drive; anything else raises rather than guessing. This is exact, whatever the
denoiser's timestep convention (Flux passes `t / 1000`, Lumina `1 - t / 1000`), for classifier-free guidance batched
in one call or run as two calls (true CFG), and for second-order schedulers whose `timesteps` repeat entries (Heun,
KDPM2: their `step_index` counts the repeats). The progress is `index / len(scheduler.timesteps)`: step `i` of a
text-to-image call of `N` steps runs at `i / N`. An img2img call starting at step `k` runs at `k / N` first (the
noise level, as ComfyUI's hook keyframes read it). After the last step the denoiser's weights go back to progress
0. Text-encoder modules always keep the weights of progress 0.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import AdapterMergeWarning, IncompatibleVersionsError, InvalidParameterError
from ..io import diffusers as diffusers_io
from ..merge import AdapterLike
from ..weights import Weight
from ._compat import gate_message, transformers_peft_minimum
from ._live import LiveMerge, build_merge, check_host_modules, host_live

__all__ = [
    "DenoisingProgressHook",
    "MergeScheduleStep",
    "denoiser_components",
    "denoising_step",
    "find_pipeline_module",
    "load_into_pipeline",
    "merge_schedule_callback",
]

logger = logging.getLogger(__name__)
HOOKS_ATTRIBUTE = "_adaptermerge_denoiser_hooks"


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
    for name in [name for name in registry if name == adapter_name or name not in loaded]:  # replaced, or deleted
        DenoisingProgressHook.remove(pipe, registry.pop(name))
    if live is not None:
        live.attach(lambda module: find_pipeline_module(pipe, module))
        live.apply(0.0)
        live.on_set_weights = functools.partial(DenoisingProgressHook.sync, pipe)
        registry[adapter_name] = live
        DenoisingProgressHook.sync(pipe, live)
    logger.info("loaded merged adapter %r (%s, %d modules) into %s", adapter_name, method, len(merged), type(pipe))
    return merged


def denoiser_components(pipe: Any) -> list[str]:
    """The pipeline's LoRA-loadable denoisers: `unet`, `transformer`, `transformer_2`, ... (not text encoders)."""
    names = [name for name in pipe._lora_loadable_modules if name == "unet" or name.startswith("transformer")]
    return [name for name in names if isinstance(getattr(pipe, name, None), torch.nn.Module)]


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    """The one timestep a denoiser call denoises (`timestep` keyword or second positional argument)."""
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is None:
        return None
    values = torch.as_tensor(timestep).detach().flatten()
    if values.numel() == 0 or not bool((values == values[0]).all()):
        return None
    return float(values[0])


def denoising_step(scheduler: Any, args: tuple = (), kwargs: dict | None = None) -> int:
    """The index in `scheduler.timesteps` of the step a denoiser call is part of (see the module docstring).

    Args:
        scheduler: the pipeline's scheduler, after `set_timesteps`.
        args, kwargs: the denoiser call's arguments; read only for schedulers without a step counter.

    Raises:
        InvalidParameterError: when the scheduler keeps no step counter and the call's timestep is not exactly one
            entry of `scheduler.timesteps`.
    """
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None)
        return 0 if index is None else int(index)
    if isinstance(getattr(scheduler, "counter", None), int):
        return scheduler.counter
    value = _timestep_value(args, kwargs or {})
    timesteps = torch.as_tensor(scheduler.timesteps).detach().double().flatten()
    matches = [] if value is None else torch.nonzero(timesteps == value).flatten().tolist()
    if len(matches) != 1:
        raise InvalidParameterError(
            f"cannot tell which denoising step a call with timestep {value} is: {type(scheduler).__name__} keeps no "
            "step index and that timestep is not exactly one entry of scheduler.timesteps, so a step schedule or "
            "k_lora cannot follow it; use a scheduler with a step index (Euler, DPM-Solver, UniPC, flow matching)"
        )
    return matches[0]


@dataclass(eq=False)
class DenoisingProgressHook:
    """Forward hooks on one denoiser of a pipeline that apply a live merge's weights at the step being denoised.

    Registered by :meth:`sync` while the live merge changes with the progress; see the module docstring.

    Args:
        pipe: the pipeline (its `scheduler` is read at each call, so a scheduler swapped later is followed).
        live (`LiveMerge`): the live merge.
        component (`str`): the denoiser's component name (`"unet"`, `"transformer"`); only its modules are written.
    """

    pipe: Any = field(repr=False)
    live: LiveMerge = field(repr=False)
    component: str
    handles: tuple[Any, ...] = ()
    _last_step: bool = False

    @property
    def loaded(self) -> bool:
        """Whether the live merge is still loaded in the denoiser (one of its layers, checked, holds it)."""
        module = next(m for m in self.live.sources if m.startswith(f"{self.component}."))
        layer = find_pipeline_module(self.pipe, module)
        return layer is self.live.layers[module] and self.live.adapter_name in getattr(layer, "lora_B", {})

    @classmethod
    def sync(cls, pipe: Any, live: LiveMerge) -> None:
        """Register the hooks on every denoiser of `pipe` when `live` changes with the progress, else remove them."""
        cls.remove(pipe, live)
        if not live.dynamic:
            return
        hooks = _hooks(pipe)
        components = [c for c in denoiser_components(pipe) if any(m.startswith(f"{c}.") for m in live.sources)]
        if not components:
            warnings.warn(
                f"the live merge {live.adapter_name!r} changes with the denoising progress but adapts no denoiser "
                f"of this {type(pipe).__name__}; its text-encoder modules run before denoising, with the weights "
                "of progress 0",
                AdapterMergeWarning,
                stacklevel=3,
            )
        for component in components:
            hook = cls(pipe, live, component)
            denoiser = getattr(pipe, component)
            hook.handles = (
                denoiser.register_forward_pre_hook(hook.before, with_kwargs=True),
                denoiser.register_forward_hook(hook.after, with_kwargs=True),
            )
            hooks.setdefault(live.adapter_name, []).append(hook)

    @staticmethod
    def remove(pipe: Any, live: LiveMerge) -> None:
        """Remove the hooks of `live` from `pipe`'s denoisers (nothing when there are none)."""
        for hook in _hooks(pipe).pop(live.adapter_name, []):
            for handle in hook.handles:
                handle.remove()

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.loaded:  # deleted or unloaded through diffusers since the last call: stop following it
            if host_live(self.pipe).get(self.live.adapter_name) is self.live:
                del host_live(self.pipe)[self.live.adapter_name]
            self.remove(self.pipe, self.live)
            return
        scheduler = self.pipe.scheduler
        steps = len(scheduler.timesteps)
        index = denoising_step(scheduler, args, kwargs)
        if not 0 <= index < steps:
            raise InvalidParameterError(
                f"step {index} of {type(scheduler).__name__} is outside its {steps} timesteps, so the scheduled merge "
                f"{self.live.adapter_name!r} cannot follow this call; call scheduler.set_timesteps before calling the "
                "denoiser outside the pipeline"
            )
        self._last_step = index == steps - 1
        self.live.apply(index / steps, component=self.component)

    def after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._last_step:  # back to progress 0, as between images
            self.live.apply(0.0, component=self.component)


def _hooks(pipe: Any) -> dict[str, list[DenoisingProgressHook]]:
    """The denoiser hooks registered on `pipe`, per live merge name (created on first use)."""
    hooks = pipe.__dict__.get(HOOKS_ATTRIBUTE)
    if hooks is None:
        hooks = {}
        setattr(pipe, HOOKS_ATTRIBUTE, hooks)
    return hooks


class MergeScheduleStep:
    """The `callback_on_step_end` of :func:`merge_schedule_callback`: checks the live merge is loaded and chains the
    user's callback; the weights themselves are written by the denoiser hook.

    Args:
        adapter_name (`str`): the live merge.
        callback (`Callable`, *optional*): the user's own `callback_on_step_end(pipe, step, timestep, kwargs)`; its
            return value is passed on.
    """

    tensor_inputs: list[str] = []  # what diffusers' `MultiPipelineCallbacks` collects: nothing for this one

    def __init__(self, adapter_name: str = "merged", callback: Callable[..., dict] | None = None) -> None:
        self.adapter_name = adapter_name
        self.callback = callback

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if self.adapter_name not in host_live(pipe):
            raise InvalidParameterError(f"no live merge named {self.adapter_name!r} in this {type(pipe).__name__}")
        return callback_kwargs if self.callback is None else self.callback(pipe, step, timestep, callback_kwargs)


def merge_schedule_callback(
    pipe: Any, callback: Callable[..., dict] | None = None, *, adapter_name: str = "merged"
) -> Callable[..., dict]:
    """A `callback_on_step_end` for code written for the explicit-callback API: schedules no longer need one.

    A step schedule or `k_lora` merge applies itself during a plain `pipe(prompt)` call, through the hook on the
    pipeline's denoiser (see the module docstring), so

    ```py
    pipe.load_merged_adapters([subject, style], weights=[[[0.0, 1.0], [0.6, 0.2]], [[0.3, 1.0]]])
    image = pipe(prompt).images[0]
    ```

    follows the schedule. This callback only checks that the live merge is loaded and chains your own callback: the
    hook alone writes the weights, so passing it changes nothing in the image (nothing is applied twice).

    Args:
        pipe: the diffusers pipeline holding the live merge.
        callback (`Callable` or diffusers `PipelineCallback`, *optional*): your own `callback_on_step_end`, chained
            (a `PipelineCallback` keeps its `tensor_inputs`).
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
