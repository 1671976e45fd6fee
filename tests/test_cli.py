"""The `adaptermerge` command: merge, inspect, convert and methods through click's runner."""

import json

import pytest
import torch
from click.testing import CliRunner

from adaptermerge import load_adapter, save_adapter
from adaptermerge.cli import main
from tests.factories import make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.up_proj": (32, 16)}


@pytest.fixture
def two_adapters(tmp_path):
    paths = []
    for seed, rank in ((1, 4), (2, 8)):
        path = tmp_path / f"lora{seed}"
        save_adapter(make_adapter(SHAPES, rank=rank, seed=seed), path, format="peft")
        paths.append(str(path))
    return paths


def run(*args):
    runner = CliRunner(env={"COLUMNS": "200"})
    return runner.invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


def test_merge_writes_the_weighted_sum(two_adapters, tmp_path):
    out = tmp_path / "merged"
    result = run("merge", *two_adapters, "--weights", "0.7,0.3", "-o", out)
    assert result.exit_code == 0, result.output
    merged, a, b = (load_adapter(p) for p in (out, *two_adapters))
    for name in SHAPES:
        expected = 0.7 * a[name].to_dense() + 0.3 * b[name].to_dense()
        torch.testing.assert_close(merged[name].to_dense(), expected, rtol=1e-5, atol=1e-6)
        assert merged[name].rank == 12


def test_merge_with_rank_truncates(two_adapters, tmp_path):
    out = tmp_path / "merged"
    assert run("merge", *two_adapters, "--rank", "3", "-o", out).exit_code == 0
    assert {lr.rank for lr in load_adapter(out).values()} == {3}


def test_existing_output_needs_overwrite(two_adapters, tmp_path):
    out = tmp_path / "merged"
    assert run("merge", *two_adapters, "-o", out).exit_code == 0
    result = run("merge", *two_adapters, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert run("merge", *two_adapters, "-o", out, "--overwrite").exit_code == 0


def test_unknown_method_is_one_line_with_exit_code_2(two_adapters, tmp_path):
    result = run("merge", *two_adapters, "--method", "lineer", "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Did you mean 'linear'" in result.output


def test_inspect_json_reports_ranks_and_norms(two_adapters):
    result = run("inspect", two_adapters[1], "--json")
    info = json.loads(result.output)
    assert info["format"] == "peft" and info["ranks"] == [8] and info["modules"] == 2
    adapter = load_adapter(two_adapters[1])
    for module in info["per_module"]:
        dense_norm = torch.linalg.matrix_norm(adapter[module["module"]].to_dense())
        assert module["norm"] == pytest.approx(float(dense_norm), rel=1e-6)


def test_inspect_table_and_methods_list(two_adapters):
    shown = run("inspect", two_adapters[0]).output
    assert "starts with model.layers.0." in shown and "mlp.up_proj" in shown and "self_attn.q_proj" in shown
    listing = run("methods").output
    assert "linear" in listing and "Try first for LLM LoRAs: `tsv`" in listing


def test_help_teaches_with_examples():
    result = run("merge", "--help")
    assert "Examples:" in result.output and "--weights" in result.output


def test_pickle_inputs_need_allow_pickle_and_are_then_detected(tmp_path):
    from adaptermerge.io import diffusers as diffusers_format

    adapter = make_adapter({"unet.down_blocks.0.attentions.0.proj_in": (8, 8)}, seed=3)
    tensors, _ = diffusers_format.to_state_dict(adapter)
    torch.save(tensors, tmp_path / "lora.pt")
    refused = run("merge", tmp_path / "lora.pt", "-o", tmp_path / "out.safetensors")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    accepted = run("merge", tmp_path / "lora.pt", "--allow-pickle", "-o", tmp_path / "out.safetensors")
    assert accepted.exit_code == 0, accepted.output
    merged = load_adapter(tmp_path / "out.safetensors")
    torch.testing.assert_close(merged[next(iter(adapter))].to_dense(), next(iter(adapter.values())).to_dense())
