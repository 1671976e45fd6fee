"""Finding the LoRA layers peft injected into a model, and the names adapters use for them.

Works on a `PeftModel`, on a model with adapters injected by peft's `inject_adapter_in_model`, and on diffusers
models after `add_adapter`: a LoRA layer is any module with a `lora_A` `ModuleDict`. Names are the dotted paths in
the model with peft's `base_model.model.` prefix removed, as in the keys of a saved PEFT adapter, so statistics and
allocations recorded on one model line up with the modules of the saved adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import InvalidParameterError

PEFT_PREFIX = "base_model.model."


def module_key(name: str) -> str:
    """The adapter-file name of a module: the dotted path without peft's `base_model.model.` prefix."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".base_layer")


def lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Module key → LoRA layer holding an adapter called `adapter_name`.

    Raises:
        InvalidParameterError: when the model holds no LoRA layer with that adapter (listing the adapters it has).
    """
    found, names = {}, set()
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict):
            names.update(lora_A.keys())
            if adapter_name in lora_A:
                found[module_key(name)] = module
    if not found:
        have = f"it has adapters {sorted(names)}" if names else "it has no peft LoRA layers"
        raise InvalidParameterError(
            f"the model has no LoRA layer with adapter {adapter_name!r} ({have}); add one with peft's "
            "get_peft_model/add_adapter (diffusers: model.add_adapter) and pass its adapter_name"
        )
    return found


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its base model: every peft layer's adapters off, trainable flags restored afterwards."""
    # peft's BaseTunerLayer (not transformers' model-level enable_adapters/disable_adapters methods)
    layers = [m for m in model.modules() if hasattr(m, "adapter_layer_names") and hasattr(m, "enable_adapters")]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    states = [(m, m.disable_adapters) for m in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)
        for param, flag in flags.items():
            param.requires_grad_(flag)


def lora_A_weight(layer: nn.Module, adapter_name: str) -> torch.Tensor:
    """The `lora_A` weight of one adapter in a LoRA layer (Linear `(r, in)` or conv `(r, in, kh, kw)`)."""
    return layer.lora_A[adapter_name].weight
