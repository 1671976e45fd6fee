"""`recover` says how well each module came back and warns when a module is poorly recovered."""

import json

from click.testing import CliRunner

from adaptermerge import save_adapter
from adaptermerge.cli import main
from tests.factories import make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.up_proj": (32, 16)}


def invoke(*args):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _bundle(tmp_path, basis_size):
    paths = [save_adapter(make_adapter(SHAPES, rank=3, seed=s), tmp_path / f"task{s}") for s in range(3)]
    bundle = tmp_path / f"bundle{basis_size}"
    invoke("-q", "merge", *paths, "-m", "rmm", "--basis-size", basis_size, "-o", bundle)
    return bundle


def test_exact_recovery_reports_every_module_exact_and_no_warning(tmp_path):
    output = invoke("recover", _bundle(tmp_path, 3), "--task", "task1", "-o", tmp_path / "r").output
    assert "2 of 2 exact" in output and "Warning" not in output


def test_poor_recovery_warns_with_the_worst_modules(tmp_path):
    bundle = _bundle(tmp_path, 1)
    output = invoke("recover", bundle, "--task", "task1", "-o", tmp_path / "r").output
    assert "relative recovery error per module: median" in output
    assert "Warning: 2 of 2 modules recovered with a relative error above 10%" in output
    assert "--basis-size" in output
    quiet = invoke("recover", bundle, "--task", "task1", "-o", tmp_path / "r2", "--warn-above", "1").output
    assert "Warning" not in quiet
    report = json.loads(invoke("recover", bundle, "--task", "task1", "-o", tmp_path / "r3", "--json").output)
    assert set(report["relative_error"]) == set(SHAPES) and len(report["above_threshold"]) == 2
    assert all(0.1 < e < 1 for e in report["relative_error"].values())
