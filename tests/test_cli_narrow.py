"""Readable at 80 columns: no line longer than the terminal, names and links never cut, `--json` beside tables."""

import json

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from adaptermerge import save_adapter
from adaptermerge.cli import main
from adaptermerge.quality.bench import BenchRow
from adaptermerge.quality.report import print_table
from tests.factories import make_adapter

PREFIX = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
SHAPES = {f"{PREFIX}{name}": (40, 32) for name in ("attn1.to_q", "attn1.to_k", "attn2.to_out.0", "ff.net.0.proj")}


@pytest.fixture
def loras(tmp_path):
    for seed in range(3):
        save_adapter(make_adapter(SHAPES, rank=2 + seed, seed=seed), tmp_path / "loras" / f"lora_{seed}")
    return tmp_path / "loras"


def invoke(*args) -> str:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def narrow(*args) -> str:
    output = invoke(*args)
    too_long = [line for line in output.splitlines() if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    return output


def as_json(*args):
    return json.loads(invoke(*args, "--json"))


def test_inspect_states_the_shared_prefix_and_keeps_what_tells_modules_apart(loras):
    output = narrow("inspect", loras / "lora_0")
    assert f"starts with {PREFIX}" in output.replace("\n", "")
    for name in SHAPES:
        assert name.removeprefix(PREFIX) in output
    info = as_json("inspect", loras / "lora_0")
    assert {m["module"] for m in info["per_module"]} == set(SHAPES)
    assert all(f"{m['norm']:.4g}" in output for m in info["per_module"]), "norms are shown in full"


def test_methods_keep_every_paper_link_whole():
    output = narrow("methods")
    catalog = as_json("methods")
    assert catalog and all(m["reference_url"] in output.splitlines() or m["reference_url"] in output for m in catalog)
    assert "…" not in output


def test_dry_run_bundle_recover_and_library_tables_fit(loras, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    merges = [{"name": "all_three", "adapters": ["loras/lora_*"], "output": "out/a-rather-long-output-folder-name"}]
    recipe.write_text(yaml.safe_dump({"merges": merges}))
    plan = narrow("run", recipe, "--dry-run")
    assert "out/a-rather-long-output-folder-name" in plan and "loras/lora_2" in plan
    assert as_json("run", recipe, "--dry-run")[0]["name"] == "all_three"
    bundle = tmp_path / "bundle"
    invoke("merge", *(loras / f"lora_{i}" for i in range(3)), "-m", "rmm", "--basis-size", "3", "-o", bundle)
    shown = narrow("inspect", bundle)
    assert all(name.removeprefix(PREFIX) in shown for name in SHAPES)
    invoke("recover", bundle, "--task", "lora_1", "-o", tmp_path / "recovered")
    narrow("library", "scan", loras)
    assert len(as_json("library", "scan", loras)["adapters"]) == 3
    narrow("-q", "library", "similarity", loras, "--workers", "0")
    pairs = as_json("library", "similarity", loras, "--workers", "0")
    assert len(pairs["most_similar"]) == 3


def test_quality_table_leaves_out_per_task_columns_that_do_not_fit():
    tasks = [f"noun.task_{i}" for i in range(8)]
    rows = [
        BenchRow(name, "adaptermerge", {t: 0.9 for t in tasks}, {t: 0.95 for t in tasks}, 0.5, 0.01, 1.0, note)
        for name, note in (("linear", ""), ("peft:ties_svd", "svd_rank=64"), ("rmm", "recovery of each task, k=4"))
    ]
    results = {"suite": "text", "tasks": tasks, "rows": rows}
    narrow_console = Console(width=80, record=True, file=open("/dev/null", "w"))
    print_table(results, narrow_console)
    text = narrow_console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "noun.task_0" not in text and "see the JSON" in text
    wide_console = Console(width=200, record=True, file=open("/dev/null", "w"))
    print_table(results, wide_console)
    assert "noun.task_7" in wide_console.export_text()


@pytest.mark.parametrize(
    "verb",
    [[], ["merge"], ["convert"], ["run"], ["library", "similarity"], ["recover"], ["demo"], ["bench", "quality"]],
    ids=" ".join,
)
def test_help_fits_80_columns(verb):
    narrow(*verb, "--help")
