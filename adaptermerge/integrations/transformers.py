"""`load_merged_adapters` for transformers models and peft `PeftModel`s, through their own adapter loaders.

A transformers `PreTrainedModel` receives the merged adapter by `model.load_adapter(adapter_name=…,
peft_config=…, adapter_state_dict=…)`; a `PeftModel` by `add_adapter` + `set_peft_model_state_dict`. Either way it
is an ordinary peft LoRA adapter afterwards: `set_adapter`, `disable_adapters`, `delete_adapter(s)`,
`merge_and_unload` and `save_pretrained` work on it. Module names are the adapters' PEFT names
(`model.layers.0.self_attn.q_proj`), relative to the transformers model.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import AdapterMergeWarning, IncompatibleAdaptersError, IncompatibleVersionsError
from ..io import peft as peft_io
from ..merge import AdapterLike
from ..weights import Weight
from ._compat import gate_message, transformers_peft_minimum
from ._live import build_merge, check_host_modules, host_live

__all__ = ["load_into_model"]

logger = logging.getLogger(__name__)


def _find(model: torch.nn.Module, module: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(module)
    except AttributeError:
        return None


def _check_filled(result: Any, adapter_name: str) -> None:
    """Refuses a load that left some of the merge's LoRA tensors at their initial values."""
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key and "lora_" in key]
    if missing:
        raise IncompatibleAdaptersError(f"peft did not fill {missing[0]} (and {len(missing) - 1} more) from the merge")


def _load_into_peft_model(model: Any, state_dict: dict, config: dict, adapter_name: str) -> None:
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    if adapter_name in model.peft_config:
        model.delete_adapter(adapter_name)
    model.add_adapter(adapter_name, LoraConfig(**config))
    _check_filled(set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name), adapter_name)
    model.set_adapter(adapter_name)


def _load_through_peft(model: Any, state_dict: dict, config: dict, adapter_name: str, minimum: str) -> None:
    """Loads the merge with peft's own API where transformers refuses the installed peft (its version gate).

    This is what transformers' `load_adapter` does after its gate: inject the LoRA layers, fill them and record the
    config, so the model computes with the merge and `set_merge_weights` works. transformers' own adapter methods
    (`set_adapter`, `disable_adapters`, ...) still refuse the model until the versions agree; the warning says so.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    found = gate_message(minimum)
    warnings.warn(
        f"{found}: adaptermerge loads the merged adapter through peft's own API; transformers' adapter methods "
        f"(set_adapter, disable_adapters, ...) refuse this model until you pip install 'peft>={minimum}' or a "
        "transformers release that accepts your peft",
        AdapterMergeWarning,
        stacklevel=5,
    )
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer) and adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    configs = dict(getattr(model, "peft_config", {}))
    configs.pop(adapter_name, None)
    if not configs and hasattr(model, "peft_config"):
        del model.peft_config  # else peft warns of "multiple adapters" when one replaces itself
    peft_config = LoraConfig(**config)
    try:
        inject_adapter_in_model(peft_config, model, adapter_name)
        model.peft_config = {**configs, adapter_name: peft_config}
        relative = {key.removeprefix(peft_io.PREFIX): value for key, value in state_dict.items()}
        _check_filled(set_peft_model_state_dict(model, relative, adapter_name=adapter_name), adapter_name)
    except (TypeError, AttributeError, KeyError, ValueError) as err:
        raise IncompatibleVersionsError(
            f"{found}, and loading through peft's own API failed too ({err}); pip install 'peft>={minimum}' or a "
            "transformers release that accepts your peft (`adaptermerge env` shows what is installed)"
        ) from err
    model._hf_peft_config_loaded = True
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(adapter_name)


def _load_into_transformers_model(model: Any, state_dict: dict, config: dict, adapter_name: str) -> None:
    from peft import LoraConfig

    minimum = transformers_peft_minimum()
    if minimum is not None:
        _load_through_peft(model, state_dict, config, adapter_name, minimum)
        return
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in model.peft_config:
        model.delete_adapter(adapter_name)
    # transformers renames `<layer>.lora_magnitude_vector` (peft's file key) to a key without `.weight` and then drops
    # it as unexpected, leaving DoRA magnitudes at their initial values; the explicit `.weight` key is renamed right
    suffix = ".lora_magnitude_vector"
    state_dict = {(f"{key}.weight" if key.endswith(suffix) else key): value for key, value in state_dict.items()}
    model.load_adapter(adapter_name=adapter_name, peft_config=LoraConfig(**config), adapter_state_dict=state_dict)
    model.set_adapter(adapter_name)


def load_into_model(
    model: Any,
    adapters: Sequence[AdapterLike],
    weights: Sequence[Weight] | None = None,
    method: str = "linear",
    *,
    adapter_name: str = "merged",
    dtype: torch.dtype | None = None,
    **params: Any,
) -> Adapter:
    """Merge `adapters` and load the result into a transformers model or `PeftModel` as the active `adapter_name`.

    An adapter already loaded under `adapter_name` is replaced. See :func:`adaptermerge.load_merged_adapters`.
    """
    from peft import PeftModel

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    dtype = dtype or base.dtype
    find = functools.partial(_find, base)
    merged, live = build_merge(
        adapters, weights, method, adapter_name=adapter_name, dtype=dtype, params=params, find=find
    )
    check_host_modules(merged, find, type(base).__name__)
    state_dict, config = peft_io.to_state_dict(merged, dtype)
    config = {k: v for k, v in config.items() if k != "peft_type"}
    if is_peft:
        _load_into_peft_model(model, state_dict, config, adapter_name)
    else:
        _load_into_transformers_model(model, state_dict, config, adapter_name)
    registry = host_live(model)
    registry.pop(adapter_name, None)
    if live is not None:
        live.attach(base.get_submodule)
        registry[adapter_name] = live
    logger.info("loaded merged adapter %r (%s, %d modules) into %s", adapter_name, method, len(merged), type(base))
    return merged
