"""One set of option names across verbs: old spellings still work with a note, -q/-v after the verb."""

import csv
import logging

import pytest
import yaml
from click.testing import CliRunner

from adaptermerge import load_adapter, save_adapter
from adaptermerge.cli import main
from tests.factories import make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (24, 12)}


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    for seed in range(2):
        save_adapter(make_adapter(SHAPES, rank=2, seed=seed), folder / f"lora_{seed}")
    return folder


def invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_convert_takes_format_and_still_takes_to_with_a_note(loras, tmp_path):
    new = invoke("convert", loras / "lora_0", "--format", "peft", "-o", tmp_path / "new")
    assert new.exit_code == 0 and "deprecated" not in new.output
    old = invoke("convert", loras / "lora_0", "--to", "peft", "-o", tmp_path / "old")
    assert old.exit_code == 0, old.output
    assert "--to is deprecated" in old.output and "use --format" in old.output
    assert load_adapter(tmp_path / "old").metadata.format == "peft"
    missing = invoke("convert", loras / "lora_0", "-o", tmp_path / "x")
    assert missing.exit_code == 2 and "--format" in missing.output


def test_run_takes_overwrite_and_still_takes_force_with_a_note(loras, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merges": [{"name": "ab", "adapters": ["loras/lora_*"], "output": "out/ab"}]}))
    assert "1 done" in invoke("run", recipe, "--workers", "0").output
    skipped = invoke("run", recipe, "--workers", "0")
    assert "1 skipped" in skipped.output and "--overwrite redoes them" in skipped.output
    assert "1 done" in invoke("run", recipe, "--workers", "0", "--overwrite").output
    old = invoke("run", recipe, "--workers", "0", "--force")
    assert "1 done" in old.output and "--force is deprecated" in old.output


def test_quiet_and_verbose_are_accepted_after_the_verb(loras, tmp_path):
    args = ("merge", loras / "lora_0", loras / "lora_1", "-o", tmp_path / "m")
    loud = invoke(*args)
    assert "Merged 2 adapters" in loud.output
    quiet = invoke(*args, "--overwrite", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert invoke("-q", *args, "--overwrite").output == ""
    invoke(*args, "--overwrite", "-vv")
    assert logging.getLogger().level == logging.DEBUG


def test_library_similarity_writes_only_into_the_folder_it_is_given(loras, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = invoke("library", "similarity", loras, "--workers", "0")
    assert printed.exit_code == 0 and "most similar pairs" in printed.output and "-o FOLDER" in printed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras"]
    written = invoke("library", "similarity", loras, "--workers", "0", "-o", "report")
    assert written.exit_code == 0, written.output
    rows = list(csv.reader((tmp_path / "report" / "similarity.csv").open()))
    assert rows[0] == ["adapter", "lora_0", "lora_1"]
    assert (tmp_path / "report" / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    again = invoke("library", "similarity", loras, "--workers", "0", "-o", "report")
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "--overwrite" in again.output
    assert invoke("library", "similarity", loras, "--workers", "0", "-o", "report", "--overwrite").exit_code == 0
    old = invoke("library", "similarity", loras, "--workers", "0", "-o", "sim.json")
    assert old.exit_code == 0 and "deprecated" in old.output and (tmp_path / "sim.json").is_file()
