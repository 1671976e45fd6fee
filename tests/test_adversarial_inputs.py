"""The defects an adversarial pass found (issue 18): each bad input ends in one line and exit 2, never in a
traceback, an output holding Inf, a changed input or a leftover temporary; likely mistakes are warned about."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptermerge import load_adapter, merge_adapters, save_adapter
from adaptermerge.batch import run_jobs
from adaptermerge.cli import main
from adaptermerge.errors import (
    AdapterFormatError,
    AdapterMergeWarning,
    IncompatibleAdaptersError,
    InvalidParameterError,
    InvalidTensorError,
)
from adaptermerge.io import peft
from adaptermerge.recipes import RecipeError, load_recipe
from tests.factories import make_adapter

LLM = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.down_proj": (16, 32)}
UNET = {"unet.mid_block.attentions.0.proj_in": (8, 8), "unet.down_blocks.0.resnets.0.conv1": (8, 8)}
PEFT_MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def digest(path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def run(*args: str):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def assert_one_line_exit_2(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output


@pytest.fixture
def loras(tmp_path):
    """Two PEFT LLM adapters, a and b."""
    return [save_adapter(make_adapter(LLM, rank=2, seed=i, name=n), tmp_path / n) for i, n in enumerate("ab")]


# 2. Outputs with Inf are refused before anything is written.


def test_a_weight_that_overflows_float32_is_refused_naming_the_module(loras, tmp_path):
    result = run("merge", *loras, "-w", "1e39,1", "-o", tmp_path / "out")
    assert_one_line_exit_2(result, "merged module 'model.layers.0", "not finite", "overflowed in float32")
    assert not (tmp_path / "out").exists()


def test_a_float16_overflow_is_refused_suggesting_float32_or_bfloat16(loras, tmp_path):
    result = run("merge", *loras, "-w", "1e6,1", "--dtype", "float16", "-o", tmp_path / "out")
    assert_one_line_exit_2(result, "not finite", "float16 cannot hold", "float32 or bfloat16")
    assert not (tmp_path / "out").exists()
    assert run("merge", *loras, "-w", "1e6,1", "--dtype", "bfloat16", "-o", tmp_path / "out").exit_code == 0
    converted = run("convert", loras[0], "--format", "peft", "--dtype", "float16", "-o", tmp_path / "half")
    assert converted.exit_code == 0  # the writers' own check leaves finite outputs alone
    big = make_adapter(LLM, rank=2).with_modules({m: lr.scale(1e6) for m, lr in make_adapter(LLM, rank=2).items()})
    with pytest.raises(InvalidTensorError, match="float32 or bfloat16"):
        save_adapter(big, tmp_path / "big", dtype=torch.float16)
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("fields", [{"weight": 1.0e39}, {"dtype": "float16", "weight": 1.0e6}])
def test_recipe_merges_whose_output_overflows_fail_instead_of_reporting_done(loras, tmp_path, fields):
    weight = fields.pop("weight")
    spec = {"adapters": [{"path": "a", "weight": weight}, "b"], "output": "out", **fields}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merges": [spec]}))
    (result,) = run_jobs(load_recipe(recipe).jobs, workers=0)
    assert result.status == "failed" and "not finite" in result.message
    assert not (tmp_path / "out").exists()


# 3. Ranks below 1 are refused by merge_adapters itself.


@pytest.mark.parametrize("rank", [0, -3, 1.5, True])
def test_merge_adapters_refuses_ranks_that_are_not_positive_integers(loras, rank):
    with pytest.raises(InvalidParameterError, match="rank must be a positive integer"):
        merge_adapters(loras, rank=rank)


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_merge_rank_below_one_is_exit_2_without_output(loras, tmp_path, rank):
    assert_one_line_exit_2(run("merge", *loras, "--rank", rank, "-o", tmp_path / "out"), "rank must be")
    assert not (tmp_path / "out").exists()


# 4. The readers validate what they read; the CLI turns every expected failure into one line and exit 2.


def _peft_folder(path, tensors=None, config=None):
    path.mkdir()
    tensors = tensors or {
        f"{PEFT_MODULE}.lora_A.weight": torch.ones(2, 8),
        f"{PEFT_MODULE}.lora_B.weight": torch.ones(8, 2),
    }
    (path / peft.CONFIG_NAME).write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2} if config is None else config)
    )
    save_file(tensors, str(path / peft.WEIGHTS_NAME))
    return path


KOHYA = "lora_unet_mid_block_attentions_0_proj_in"
BAD_READS = {
    "peft rank 0": lambda p: _peft_folder(
        p, {f"{PEFT_MODULE}.lora_A.weight": torch.ones(0, 8), f"{PEFT_MODULE}.lora_B.weight": torch.ones(8, 0)}
    ),
    "kohya rank 0": lambda p: _kohya(
        p, {f"{KOHYA}.lora_down.weight": torch.ones(0, 8), f"{KOHYA}.lora_up.weight": torch.ones(8, 0)}
    ),
    "lora_A of shape []": lambda p: _peft_folder(
        p, {f"{PEFT_MODULE}.lora_A.weight": torch.tensor(1.0), f"{PEFT_MODULE}.lora_B.weight": torch.ones(8, 2)}
    ),
    "lora_alpha a string": lambda p: _peft_folder(p, config={"r": 2, "lora_alpha": "8"}),
    "lora_alpha null": lambda p: _peft_folder(p, config={"r": 2, "lora_alpha": None}),
    "config a JSON list": lambda p: _peft_folder(p, config=[1, 2]),
    "kohya alpha of shape [2]": lambda p: _kohya(
        p,
        {
            f"{KOHYA}.lora_down.weight": torch.ones(2, 8),
            f"{KOHYA}.lora_up.weight": torch.ones(8, 2),
            f"{KOHYA}.alpha": torch.ones(2),
        },
    ),
    "kohya alpha NaN": lambda p: _kohya(
        p,
        {
            f"{KOHYA}.lora_down.weight": torch.ones(2, 8),
            f"{KOHYA}.lora_up.weight": torch.ones(8, 2),
            f"{KOHYA}.alpha": torch.tensor(float("nan")),
        },
    ),
    "diffusers metadata a JSON list": lambda p: _diffusers_with_metadata(p, "[1]"),
    "diffusers metadata lora_alpha a string": lambda p: _diffusers_with_metadata(p, '{"unet.lora_alpha": "x"}'),
    "alpha_pattern key not a regex": lambda p: _peft_folder(p, config={"r": 2, "alpha_pattern": {"(": 4}}),
    "config not UTF-8": lambda p: _not_utf8(_peft_folder(p, config={}) / peft.CONFIG_NAME).parent,
}


def _not_utf8(path):
    path.write_bytes(b"\xff\xfe{")
    return path


def _kohya(path, tensors):
    file = path.with_suffix(".safetensors")
    save_file(tensors, str(file))
    return file


def _diffusers_with_metadata(path, metadata):
    file = path.with_suffix(".safetensors")
    module = "unet.mid_block.attentions.0.proj_in"
    tensors = {f"{module}.lora_A.weight": torch.ones(2, 8), f"{module}.lora_B.weight": torch.ones(8, 2)}
    save_file(tensors, str(file), metadata={"lora_adapter_metadata": metadata})
    return file


@pytest.mark.parametrize("case", list(BAD_READS))
def test_malformed_adapters_are_one_line_and_exit_2(tmp_path, case):
    path = BAD_READS[case](tmp_path / "bad")
    with pytest.raises(AdapterFormatError):
        load_adapter(path)
    assert_one_line_exit_2(run("inspect", path))
    assert_one_line_exit_2(run("merge", path, "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_header_that_maps_more_than_memory_is_exit_2(tmp_path):
    size = 2**40  # float32 values: 4 TiB, a sparse file whose map does not fit in memory
    header = json.dumps(
        {f"{KOHYA}.lora_down.weight": {"dtype": "F32", "shape": [1, size], "data_offsets": [0, 4 * size]}}
    )
    header = header.encode() + b" " * (-len(header) % 8)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    try:
        os.truncate(path, 8 + len(header) + 4 * size)
    except OSError:
        pytest.skip("this file system has no sparse files of 4 TiB")
    assert_one_line_exit_2(run("inspect", path), "not a readable safetensors file")


@pytest.mark.parametrize(("name", "text"), [("w.json", "[1, 2"), ("w.yaml", "[1, 2"), ("w.json", b"\xff[1]")])
def test_a_weights_file_that_does_not_parse_is_exit_2(loras, tmp_path, name, text):
    weights = tmp_path / name
    weights.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_exit_2(run("merge", *loras, "-w", weights, "-o", tmp_path / "out"), "does not parse")


def test_a_recipe_that_is_not_utf8_is_exit_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"merges: \xff\xfe")
    assert_one_line_exit_2(run("run", recipe), "cannot read the recipe")


def test_a_full_disk_is_exit_2(loras, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from adaptermerge.io import _write

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(_write, "save_file", full)
    assert_one_line_exit_2(run("merge", *loras, "-o", tmp_path / "out"), "No space left on device")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_overwriting_a_folder_with_a_file_output_is_exit_2(tmp_path):
    file = save_adapter(make_adapter(UNET, rank=2), tmp_path / "a.safetensors", format="diffusers")
    folder = tmp_path / "out.safetensors"
    (folder / "keep").mkdir(parents=True)
    assert_one_line_exit_2(run("convert", file, "--format", "kohya", "-o", folder, "--overwrite"), "is a folder")
    assert (folder / "keep").is_dir()


# 5. Temporaries and backups do not outlive the command; a rerun removes what a killed run left.


def test_a_rerun_removes_the_temporary_a_killed_write_left(tmp_path):
    out = tmp_path / "out"
    killed = (
        "import os, signal, sys\n"
        "from adaptermerge.io._write import atomic_path\n"
        f"with atomic_path({str(out)!r}, directory=True) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'half').write_bytes(b'0' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", killed], env={**os.environ, "PYTHONPATH": os.getcwd()}, check=False)
    (left,) = tmp_path.glob(".out.*.tmp")
    foreign = [tmp_path / ".out.mine.tmp", tmp_path / f".out.adaptermerge-{os.getpid()}.live.tmp"]
    for path in foreign:  # not ours, or a write still running: kept
        path.mkdir()
    save_adapter(make_adapter(LLM, rank=2), out)
    assert not left.exists() and all(path.is_dir() for path in foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.mine.tmp", foreign[1].name, "out"])


@pytest.mark.parametrize("old", ["file", "symlink"])
def test_overwriting_leaves_no_backup(tmp_path, old):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    if old == "file":
        out.write_text("old")
    else:
        out.symlink_to(elsewhere)
    save_adapter(make_adapter(LLM, rank=2), out, overwrite=True)
    assert out.is_dir() and not out.is_symlink() and len(load_adapter(out)) == len(LLM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert (elsewhere / "keep").read_text() == "x"


# 6. An output never is, contains or lies inside an input.


@pytest.mark.parametrize("output", ["a", "a/sub", "."])
def test_an_output_that_would_change_an_input_is_exit_2(loras, tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    before = [digest(path) for path in loras]
    assert_one_line_exit_2(run("merge", "a/", "b", "-o", output, "--overwrite"), "choose an output path outside")
    assert_one_line_exit_2(run("convert", "a", "--format", "peft", "-o", output, "--overwrite"), "the input")
    assert [digest(path) for path in loras] == before and not (tmp_path / "a" / "sub").exists()


def test_a_recipe_whose_output_is_an_input_is_exit_2(loras, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merges": [{"adapters": ["a", "b"], "output": "a"}]}))
    with pytest.raises(RecipeError, match=r"merges\[0\]\.output: the output .* is the input"):
        load_recipe(recipe)
    before = digest(loras[0])
    assert_one_line_exit_2(run("run", recipe, "--overwrite"), "is the input")
    assert digest(loras[0]) == before


# 7. Adapters of different models are refused, naming both.


def test_an_llm_lora_and_a_diffusion_lora_are_refused_naming_both(loras, tmp_path):
    unet = save_adapter(
        make_adapter(UNET, rank=2, name="unet_style"), tmp_path / "unet_style.safetensors", format="diffusers"
    )
    result = run("merge", loras[0], unet, "-o", tmp_path / "out")
    assert_one_line_exit_2(result, "'a' and 'unet_style'", "no module in common")
    with pytest.raises(IncompatibleAdaptersError, match="adapt different models"):
        merge_adapters([unet, loras[1]])


def test_adapters_of_one_model_on_different_modules_still_merge(tmp_path):
    attention = make_adapter({"model.layers.0.self_attn.q_proj": (16, 16)}, name="attention")
    mlp = make_adapter({"model.layers.0.mlp.down_proj": (16, 32)}, seed=1, name="mlp")
    assert len(merge_adapters([attention, mlp])) == 2
    text = make_adapter({"text_encoder.text_model.encoder.layers.0.mlp.fc1": (8, 8)}, name="text")
    assert len(merge_adapters([make_adapter(UNET, name="unet"), text])) == 3


# 8. Input that is legal but likely a mistake is read with a warning.


@pytest.mark.parametrize(
    ("config", "tensors", "warning"),
    [
        ({"r": 2, "lora_alpha": 0}, None, "alpha 0, so their updates are zero"),
        ({"r": 8, "lora_alpha": 8}, None, "another rank than their tensors"),
        ({"r": 2, "lora_alpha": 2, "alpha_pattern": ["q_proj"]}, None, "alpha_pattern is a JSON list"),
        ({"r": 2, "lora_alpha": 2, "use_dora": True}, None, "use_dora but no module has a lora_magnitude_vector"),
    ],
)
def test_likely_mistakes_are_warned_about(tmp_path, config, tensors, warning):
    path = _peft_folder(tmp_path / "odd", tensors, config)
    with pytest.warns(AdapterMergeWarning, match=warning):
        load_adapter(path)


def test_a_zero_diffusers_alpha_is_warned_about(tmp_path):
    module = "unet.mid_block.attentions.0.proj_in"
    file = tmp_path / "zero.safetensors"
    save_file(
        {
            f"{module}.lora_A.weight": torch.ones(2, 8),
            f"{module}.lora_B.weight": torch.ones(8, 2),
            f"{module}.alpha": torch.tensor(0.0),
        },
        str(file),
    )
    with pytest.warns(AdapterMergeWarning, match="alpha 0"):
        load_adapter(file)
