"""Installed versions of the libraries adaptermerge works with, read from package metadata (nothing is imported).

`report()` is what `adaptermerge env` prints; `version()` and `at_least()` serve the integrations' checks of
host-library combinations that refuse each other.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

from packaging.version import Version

__all__ = ["PACKAGES", "at_least", "report", "version"]

#: The libraries whose versions change what adaptermerge does, in the order `adaptermerge env` lists them.
PACKAGES = (
    "adaptermerge",
    "torch",
    "peft",
    "transformers",
    "diffusers",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "gradio",
    "scikit-learn",
    "numpy",
)


def version(package: str) -> str | None:
    """The installed version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def at_least(package: str, minimum: str) -> bool:
    """Whether `package` is installed at `minimum` or later (local tags such as ``+cpu`` ignored)."""
    installed = version(package)
    return installed is not None and Version(installed).release >= Version(minimum).release


def _torch_build() -> dict[str, str | None]:
    """torch's CUDA / ROCm build from ``torch/version.py``, read as text: importing torch takes seconds."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    build = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
                    build[target.id] = node.value.value
    return build


def _accelerators() -> str:
    """What torch could run on here, told without importing it: its build, and the devices the OS shows."""
    build = _torch_build()
    found = []
    if build.get("cuda"):
        gpus = len(list(Path("/dev").glob("nvidia[0-9]*")))
        found.append(f"CUDA {build['cuda']} build, {gpus} NVIDIA device(s) visible")
    if build.get("hip"):
        kfd = "/dev/kfd present" if Path("/dev/kfd").exists() else "no /dev/kfd"
        found.append(f"ROCm {build['hip']} build, {kfd}")
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.append("MPS (Apple silicon)")
    return "; ".join(found) or "CPU only (a CPU build of torch)"


def report() -> dict[str, str]:
    """Versions and platform facts to paste into a bug report, as ``diffusers-cli env`` prints them."""
    facts = {
        "Python": platform.python_version(),
        "Platform": platform.platform(),
        "CPUs": str(os.cpu_count()),
    }
    for package in PACKAGES:
        facts[package] = version(package) or "not installed"
    if version("torch"):
        facts["torch accelerators"] = _accelerators()
    return facts
