"""The LoRA the training benchmarks train (peft's, initialised by the method under test, read back as an Adapter),
and the dense check of an update on a tiny model."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from adaptermerge import Adapter
from adaptermerge.io import peft as peft_io
from adaptermerge.training import OSRM, BasisAllocator, apply_orthogonal_basis


def lora_model(
    backbone: nn.Module,
    method: str,
    task: str,
    *,
    rank: int,
    targets: Sequence[str],
    osrm: OSRM | None,
    allocator: BasisAllocator,
):
    """A peft model on a copy of `backbone`, its LoRA initialised by `method` (plain, osrm-*, orthogonal)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    model = get_peft_model(copy.deepcopy(backbone), config)
    if method.startswith("osrm"):
        osrm.init_lora(model, task=task)
    elif method == "orthogonal":
        apply_orthogonal_basis(model, allocator.allocate(task, rank))
    return model


def as_adapter(model, name: str) -> Adapter:
    """The trained LoRA of a peft model as an in-memory adaptermerge Adapter (read from peft's state dict)."""
    from peft import get_peft_model_state_dict

    config = model.peft_config["default"]
    return peft_io.from_state_dict(get_peft_model_state_dict(model), config.to_dict(), name=name).materialize()


def with_update(backbone: nn.Module, adapter: Adapter | None) -> nn.Module:
    """A copy of the backbone with the adapter's update added to its weights (the dense check, tiny layers)."""
    model = copy.deepcopy(backbone)
    if adapter is not None:
        with torch.no_grad():
            for name, lowrank in adapter.items():
                model.get_submodule(name).weight += lowrank.to_dense().float()
    return model.eval()
