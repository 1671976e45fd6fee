"""`load_merged_adapters` on diffusers pipelines and transformers/peft models, and live re-weighting.

Two ways to use it:

```py
import adaptermerge

adaptermerge.patch()  # once: adds the methods to every LoRA-capable pipeline, PreTrainedModel and PeftModel
pipe.load_merged_adapters(["style.safetensors", "user/subject-lora"], weights=[0.7, 0.5], method="ties",
                          density=0.5)
pipe.load_merged_adapters(["style.safetensors", "subject.safetensors"], weights=[1.0, 0.0])
pipe.set_merge_weights([0.6, 0.4])  # slider: rewrites lora_B in place, reads no file

# or, without patching anything:
adaptermerge.load_merged_adapters(model, ["./lora_a", "./lora_b"], weights=[0.5, 0.5])
```

`patch()` is explicit rather than a side effect of `import adaptermerge`, so importing the package never imports
diffusers or transformers and never changes their classes behind the user's back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import InvalidParameterError
from ..merge import AdapterLike
from ..weights import Weight
from ._live import set_merge_weights

__all__ = ["load_merged_adapters", "merge_schedule_callback", "patch", "set_merge_weights"]


def _is_instance(host: Any, module: str, name: str) -> bool:
    """`isinstance(host, module.name)` without importing `module` when the host could not come from it."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return cls is not None and isinstance(host, cls)


def load_merged_adapters(
    host: Any,
    adapters: Sequence[AdapterLike],
    weights: Sequence[Weight] | None = None,
    method: str = "linear",
    *,
    adapter_name: str = "merged",
    dtype: torch.dtype | None = None,
    **params: Any,
) -> Adapter:
    """Merge adapters on their low-rank factors and load the result into a pipeline or model as one LoRA.

    The merged adapter goes through the host's own loader (diffusers `load_lora_weights`, transformers
    `load_adapter`, peft `add_adapter`), becomes the active adapter, and replaces any adapter named `adapter_name`.
    A `linear` merge of plain LoRAs without `rank` can then be re-weighted in place with :func:`set_merge_weights`.
    DoRA adapters merge exactly with the host's own base weights (no `base` path needed).

    Args:
        host: a diffusers pipeline with LoRA support, a transformers `PreTrainedModel` or a peft `PeftModel`.
        adapters (`list` of paths, hub ids or `Adapter`): the adapters, routed to the host's components by their
            module names (`unet.…`, `text_encoder.…`, `transformer.…`; module paths for LLMs).
        weights (`list`, *optional*): one weight per adapter (a number or per-module weights, see
            `adaptermerge.weights`); 1.0 each by default. In a diffusers pipeline, with `method="linear"`, any number
            may be a step schedule (keyframes `[[0.0, 1.0], [0.6, 0.2]]` or a callable of the denoising progress,
            see `adaptermerge.integrations.schedule`), applied during denoising by a hook on the pipeline's denoiser.
        method (`str`, defaults to `"linear"`): a registered merge method (see `adaptermerge.list_methods()`), or,
            in a diffusers pipeline, the live mode `"k_lora"` for `[subject, style]` (parameters `pattern`, `alpha`,
            `beta`; see `adaptermerge.integrations.k_lora`), applied the same way.
        adapter_name (`str`, defaults to `"merged"`): the name of the merged adapter in the host.
        dtype (`torch.dtype`, *optional*): the merged adapter's dtype; the host's by default.
        **params: the method's parameters (`density=0.5`, `rank=16`, `seed=0`, ...).

    Returns:
        `Adapter`: the merged adapter (in memory), e.g. to save it with `adaptermerge.save_adapter`.

    Raises:
        InvalidParameterError: for a host that is neither a LoRA-capable pipeline nor a transformers/peft model.
        IncompatibleAdaptersError: when a module of the adapters is missing from the host or has another shape
            (the message names the module), or the adapters disagree with each other.
        UnknownMethodError, InvalidParameterError: for unknown methods, parameters or bad weights.
    """
    kwargs = dict(adapter_name=adapter_name, dtype=dtype, **params)
    if _is_instance(host, "diffusers.loaders.lora_base", "LoraBaseMixin"):
        from .diffusers import load_into_pipeline

        return load_into_pipeline(host, adapters, weights, method, **kwargs)
    if _is_instance(host, "peft", "PeftModel") or _is_instance(host, "transformers", "PreTrainedModel"):
        from .transformers import load_into_model

        return load_into_model(host, adapters, weights, method, **kwargs)
    raise InvalidParameterError(
        f"cannot load adapters into a {type(host).__name__}: pass a diffusers pipeline with LoRA support, a "
        "transformers PreTrainedModel or a peft PeftModel"
    )


def merge_schedule_callback(pipe: Any, callback: Any = None, *, adapter_name: str = "merged") -> Any:
    """A `callback_on_step_end` that chains yours, for code written before schedules applied themselves; see
    :func:`adaptermerge.integrations.diffusers.merge_schedule_callback`."""
    from .diffusers import merge_schedule_callback as callback_for

    return callback_for(pipe, callback, adapter_name=adapter_name)


def patch() -> None:
    """Add `load_merged_adapters` and `set_merge_weights` methods to the host libraries' classes.

    diffusers' `LoraBaseMixin` (so every pipeline that can load LoRAs), transformers' `PreTrainedModel` and peft's
    `PeftModel` get both methods, with the signatures of the functions here minus the first argument; pipelines also
    get `merge_schedule_callback`. Libraries that are not installed are skipped. Calling it twice is harmless.
    """
    targets = [
        ("diffusers.loaders.lora_base", "LoraBaseMixin"),
        ("transformers", "PreTrainedModel"),
        ("peft", "PeftModel"),
    ]
    for module, name in targets:
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except ImportError:
            continue
        cls.load_merged_adapters = load_merged_adapters
        cls.set_merge_weights = set_merge_weights
        if name == "LoraBaseMixin":
            cls.merge_schedule_callback = merge_schedule_callback
