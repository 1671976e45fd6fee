"""Bad input is refused with errors that name the file and module; outputs are atomic; inputs are never touched."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptermerge import Adapter, AdapterMetadata, load_adapter, merge_adapters, save_adapter
from adaptermerge.cli import main
from adaptermerge.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    InvalidTensorError,
    OutputExistsError,
    UnsafeFormatError,
)
from adaptermerge.io import _write, detect_format, diffusers, kohya, peft
from tests.factories import random_lowrank

MODULE = "unet.mid_block.attentions.0.proj_in"
KOHYA = "lora_unet_mid_block_attentions_0_proj_in"


def small_adapter(out_features: int = 8, seed: int = 0) -> Adapter:
    modules = {
        MODULE: random_lowrank(out_features, 8, 2, seed=seed),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": random_lowrank(6, 8, 3, seed=seed + 1),
    }
    return Adapter(modules, AdapterMetadata(), "small")


def digest(path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_unknown_format_names_the_known_ones(tmp_path):
    path = save_adapter(small_adapter(), tmp_path / "a.safetensors", format="kohya")
    with pytest.raises(AdapterFormatError, match="peft, diffusers, kohya"):
        load_adapter(path, format="lycoris")
    other = tmp_path / "model.safetensors"
    save_file({"model.embed.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(AdapterFormatError, match=r"not a LoRA file.*model\.embed\.weight"):
        load_adapter(other)


def test_mismatched_module_shapes_are_refused_naming_the_module(tmp_path):
    a = save_adapter(small_adapter(8), tmp_path / "a.safetensors", format="kohya")
    b = save_adapter(small_adapter(16, seed=5), tmp_path / "b.safetensors", format="diffusers")
    with pytest.raises(IncompatibleAdaptersError, match=re.escape(MODULE)):
        merge_adapters([a, b])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_nan_or_inf_is_refused_naming_file_and_module(tmp_path, fmt, bad):
    adapter = small_adapter()
    lowrank = adapter[MODULE]
    B = lowrank.B.clone()
    B[0, 0] = bad
    broken = Adapter({**adapter.modules, MODULE: type(lowrank)(lowrank.A, B)}, adapter.metadata, "broken")
    path = tmp_path / f"broken_{fmt}.safetensors"  # written past the writers, which refuse NaN and Inf
    if fmt == "kohya":
        save_file(kohya.to_state_dict(broken), str(path))
    elif fmt == "diffusers":
        save_file(diffusers.to_state_dict(broken)[0], str(path))
    else:
        tensors, config = peft.to_state_dict(broken)
        path.mkdir()
        (path / peft.CONFIG_NAME).write_text(json.dumps(config))
        save_file(tensors, str(path / peft.WEIGHTS_NAME))
    loaded = load_adapter(path)  # lazy: headers only
    with pytest.raises(InvalidTensorError, match=re.escape(MODULE)) as info:
        merge_adapters([loaded])
    assert "broken_" in str(info.value)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_empty_and_truncated_files_are_refused(tmp_path, fmt):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="empty"):
        load_adapter(empty, format=fmt)
    whole = save_adapter(small_adapter(), tmp_path / "whole.safetensors", format=fmt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(AdapterFormatError, match="truncated"):
        load_adapter(truncated, format=fmt)


def test_files_of_the_wrong_layout_are_refused():
    with pytest.raises(AdapterFormatError, match="only one of lora_down/lora_up"):
        kohya.from_state_dict({f"{KOHYA}.lora_down.weight": torch.zeros(2, 8)})
    with pytest.raises(AdapterFormatError, match="do not form a LoRA pair"):
        kohya.from_state_dict(
            {f"{KOHYA}.lora_down.weight": torch.zeros(2, 8), f"{KOHYA}.lora_up.weight": torch.zeros(8, 3)}
        )
    with pytest.raises(AdapterFormatError, match="not kohya LoRA weights"):
        kohya.from_state_dict(
            {
                f"{KOHYA}.lora_down.weight": torch.zeros(2, 8),
                f"{KOHYA}.lora_up.weight": torch.zeros(8, 2),
                f"{KOHYA}.bias": torch.zeros(8),
            }
        )
    with pytest.raises(AdapterFormatError, match="LyCORIS"):
        kohya.from_state_dict({f"{KOHYA}.lora_mid.weight": torch.zeros(2, 2, 3, 3)})
    with pytest.raises(AdapterFormatError, match="LoHa module .* lacks some of hada_w1_a/b"):
        kohya.from_state_dict({f"{KOHYA}.hada_w1_a": torch.zeros(2, 8)})
    with pytest.raises(AdapterFormatError, match="Flux/SD3"):
        kohya.from_state_dict(
            {
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2),
            }
        )
    with pytest.raises(AdapterFormatError, match="not diffusers LoRA weights"):
        diffusers.from_state_dict(
            {
                f"{MODULE}.lora_A.weight": torch.zeros(2, 8),
                f"{MODULE}.lora_B.weight": torch.zeros(8, 2),
                "unet.x": torch.zeros(1),
            }
        )


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickles_are_refused_unless_allowed(tmp_path, suffix):
    adapter = small_adapter()
    kohya_pickle = tmp_path / f"kohya{suffix}"
    torch.save(kohya.to_state_dict(adapter), kohya_pickle)
    with pytest.raises(UnsafeFormatError, match="allow_pickle"):
        load_adapter(kohya_pickle, format="kohya")
    loaded = load_adapter(kohya_pickle, format="kohya", allow_pickle=True)
    assert torch.allclose(loaded[MODULE].to_dense(), adapter[MODULE].to_dense(), atol=1e-6)


def test_pickled_diffusers_and_peft_folders_read_only_when_allowed(tmp_path):
    adapter = small_adapter()
    diffusers_folder = tmp_path / "diffusers_lora"
    diffusers_folder.mkdir()
    torch.save(diffusers.to_state_dict(adapter)[0], diffusers_folder / diffusers.PICKLE_WEIGHTS_NAME)
    peft_folder = save_adapter(adapter, tmp_path / "peft_lora", format="peft")
    (peft_folder / peft.WEIGHTS_NAME).unlink()
    torch.save(peft.to_state_dict(adapter)[0], peft_folder / peft.PICKLE_WEIGHTS_NAME)
    for folder, fmt in ((diffusers_folder, "diffusers"), (peft_folder, "peft")):
        assert detect_format(folder) == fmt
        with pytest.raises(UnsafeFormatError):
            load_adapter(folder)
        loaded = load_adapter(folder, allow_pickle=True)
        assert torch.allclose(loaded[MODULE].to_dense(), adapter[MODULE].to_dense(), atol=1e-6)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("kohya", "out.safetensors"), ("diffusers", "out.safetensors"), ("diffusers", "out_dir"), ("peft", "out_dir")],
)
def test_a_failing_writer_leaves_no_partial_output(tmp_path, monkeypatch, fmt, name):
    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_write, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(small_adapter(), tmp_path / name, format=fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fmt", "name"), [("kohya", "out.safetensors"), ("diffusers", "out_dir"), ("peft", "out_dir")]
)
def test_existing_output_is_kept_unless_overwrite(tmp_path, fmt, name):
    path = save_adapter(small_adapter(seed=1), tmp_path / name, format=fmt)
    before = digest(path)
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_adapter(small_adapter(seed=2), path, format=fmt)
    assert digest(path) == before
    save_adapter(small_adapter(seed=2), path, format=fmt, overwrite=True)
    assert digest(path) != before
    assert torch.allclose(load_adapter(path)[MODULE].to_dense(), small_adapter(seed=2)[MODULE].to_dense(), atol=1e-6)


def test_reading_merging_and_converting_never_modify_inputs(tmp_path):
    inputs = [
        save_adapter(small_adapter(seed=1), tmp_path / "a.safetensors", format="kohya"),
        save_adapter(small_adapter(seed=2), tmp_path / "b", format="diffusers"),
        save_adapter(small_adapter(seed=3), tmp_path / "c", format="peft"),
    ]
    before = [digest(p) for p in inputs]
    merged = merge_adapters(inputs, [0.5, 0.3, 0.2])
    for i, fmt in enumerate(("kohya", "diffusers", "peft")):
        save_adapter(merged, tmp_path / f"merged_{i}.safetensors", format=fmt)
        save_adapter(load_adapter(inputs[i]), tmp_path / f"converted_{i}.safetensors", format="kohya")
    assert [digest(p) for p in inputs] == before


def run_cli(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    a = save_adapter(small_adapter(8), tmp_path / "a.safetensors", format="kohya")
    b = save_adapter(small_adapter(16, seed=5), tmp_path / "b.safetensors", format="kohya")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    pickle = tmp_path / "lora.ckpt"
    torch.save(kohya.to_state_dict(small_adapter()), pickle)
    llm = save_adapter(
        Adapter({"model.layers.0.mlp.up_proj": random_lowrank(4, 4, 2)}), tmp_path / "llm", format="peft"
    )
    cases = [
        (("merge", a, b, "-o", tmp_path / "m.safetensors"), MODULE),
        (("convert", empty, "--format", "kohya", "-o", tmp_path / "x.safetensors"), "empty"),
        (("merge", pickle, "-o", tmp_path / "p.safetensors"), "pickle"),
        (("convert", llm, "--format", "kohya", "-o", tmp_path / "l.safetensors"), "--format peft"),
        (("convert", a, "--format", "diffusers", "-o", b), "exists"),
    ]
    for args, expected in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], (args, result.output)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "l.safetensors").exists()
