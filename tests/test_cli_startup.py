"""The command line starts fast: help, `methods` and argument errors never import torch."""

import subprocess
import sys

import pytest

from adaptermerge.cli._catalog import build_catalog, load_catalog

PROBE = """
import sys
from adaptermerge.cli import main
code = None
try:
    main(sys.argv[1:], prog_name="adaptermerge")
except SystemExit as exit:
    code = exit.code
print(f"torch imported: {'torch' in sys.modules}, exit code: {code}", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["merge", "--help"],
        ["methods"],
        ["env"],
        ["merge"],  # missing arguments
        ["merge", "a", "b", "--density", "high", "-o", "x"],  # a bad option value
        ["convert", "--help"],
        ["run", "--help"],
        ["library", "similarity", "--help"],
        ["bench", "quality", "--help"],
        ["recover", "--help"],
        ["ui", "--help"],
    ],
    ids=" ".join,
)
def test_help_methods_and_argument_errors_do_not_import_torch(argv):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    last = result.stderr.strip().splitlines()[-1]
    assert last in ("torch imported: False, exit code: 0", "torch imported: False, exit code: 2"), result.stderr


def test_method_catalog_matches_the_registry():
    """The table the CLI reads without torch is the registry's; `write_catalog()` rewrites it."""
    fresh = build_catalog()
    stored = [
        {**vars(m), "params": [{**vars(p), "choices": list(p.choices) if p.choices else None} for p in m.params]}
        for m in load_catalog()
    ]
    rewrite = 'python -c "from adaptermerge.cli._catalog import write_catalog; write_catalog()"'
    assert stored == fresh, f"adaptermerge/cli/methods.json is stale: run `{rewrite}`"
