"""Lazy access to a base model's weights, one layer at a time, for merges that need `W0` (DoRA).

A base is a transformers model folder (`model.safetensors` or shards), a diffusers pipeline folder (one folder per
component: `unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors`, ...), a single
safetensors file, or a hub id of either (only `*.safetensors` and `*.json` are downloaded). Only the headers are read
up front; a layer's weight is read when asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import DIFFUSION_COMPONENTS
from ..errors import AdapterFormatError, IncompatibleAdaptersError
from ._source import SafetensorsSource

__all__ = ["BaseWeights"]


class BaseWeights:
    """Module name → base weight tensor, read lazily from a model's safetensors files.

    Args:
        path (`str` or `Path`): a local model folder or file, or a hub id.
    """

    def __init__(self, path: str | Path) -> None:
        from . import resolve_path

        root = resolve_path(path)
        if not root.exists():
            raise AdapterFormatError(f"base model {path}: no such file or folder")
        files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
        if not files:
            raise AdapterFormatError(f"base model {path}: no .safetensors weights found (pickle bases are not read)")
        self.name = str(path)
        self._keys: dict[str, tuple[SafetensorsSource, str]] = {}
        for file in files:
            source = SafetensorsSource(file)
            folder = file.parent.relative_to(root).parts if root.is_dir() else ()
            prefix = f"{folder[0]}." if folder and folder[0] in DIFFUSION_COMPONENTS else ""
            for key in source.keys():
                self._keys[prefix + key] = (source, key)

    def _locate(self, module: str) -> tuple[SafetensorsSource, str]:
        key = f"{module}.weight"
        if key in self._keys:
            return self._keys[key]
        # peft names a transformers model's modules from the model class (`model.layers.0…`) while checkpoints of
        # some classes omit or add a leading prefix: accept one unique match on a dotted tail either way.
        matches = [k for k in self._keys if k.endswith(f".{key}") or key.endswith(f".{k}")]
        if len(matches) == 1:
            return self._keys[matches[0]]
        raise IncompatibleAdaptersError(
            f"base model {self.name} has no weight for module {module!r} "
            f"({'several candidates' if matches else 'no key'} {key!r}); is it the adapters' base model?"
        )

    def __getitem__(self, module: str) -> torch.Tensor:
        source, key = self._locate(module)
        return source.get(key)
