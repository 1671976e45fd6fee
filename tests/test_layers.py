"""The package's layers import downwards only, and `import adaptermerge` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import adaptermerge

PACKAGE = Path(adaptermerge.__file__).parent
# Layer of each top-level module or subpackage (DESIGN.md); a module may import its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "versions": 0,
    "lowrank": 0,
    "patterns": 0,
    "weights": 0,
    "adapter": 1,
    "io": 2,
    "methods": 3,
    "bundle": 3,
    "merge": 4,
    "training": 5,
    "recipes": 5,
    "library": 5,
    "batch": 5,
    "quality": 6,
    "integrations": 6,
    "cli": 7,
    "ui": 7,
    "__main__": 7,
}
HEAVY = ("transformers", "diffusers", "peft", "gradio", "ray", "matplotlib", "sklearn")


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    units = set()
    package_parts = path.relative_to(PACKAGE).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package_parts[: len(package_parts) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                units.add(target[0])
            else:
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaptermerge."):
            units.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("adaptermerge."))
    return units


def test_every_module_has_a_layer_and_imports_point_down():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        unit = _unit(path)
        assert unit in LAYERS, f"{path}: add {unit!r} to LAYERS in tests/test_layers.py (see DESIGN.md)"
        for imported in _imported_units(path) - {unit}:
            if imported in LAYERS and LAYERS[imported] > LAYERS[unit]:
                problems.append(f"{path.relative_to(PACKAGE)} (layer {LAYERS[unit]}) imports {imported}")
    assert not problems, "imports that point up the layers:\n" + "\n".join(problems)


def test_import_adaptermerge_loads_no_heavy_library():
    code = f"import sys, adaptermerge, adaptermerge.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing adaptermerge loaded {loaded}; import them inside the functions that use them"
