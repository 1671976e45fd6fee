"""The merge-quality suite machinery on a reduced digits configuration (3 tasks, few epochs)."""

import json

import numpy as np
import pytest
import torch

from adaptermerge import merge_adapters
from adaptermerge.quality.bench import DENSITIES, GRID, run_quality_bench
from adaptermerge.quality.digits import DIGITS_TASKS, digits_config, load_digits_suite
from adaptermerge.quality.report import print_table, write_json, write_png

pytest.importorskip("peft")
TASKS = ("digit", "parity", "inverted")


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    cache = tmp_path_factory.mktemp("quality-cache")
    config = digits_config(TASKS, epochs=8, pretrain_epochs=15)
    return load_digits_suite(config, cache_dir=cache), config, cache


def test_suite_is_reused_from_cache_without_training(small_suite):
    suite, config, cache = small_suite
    assert suite.trained
    mtimes = {t: (p / "adapter_model.safetensors").stat().st_mtime_ns for t, p in suite.adapter_paths.items()}
    again = load_digits_suite(config, cache_dir=cache)
    assert not again.trained
    assert {t: (p / "adapter_model.safetensors").stat().st_mtime_ns for t, p in again.adapter_paths.items()} == mtimes
    for task in suite.tasks:
        torch.testing.assert_close(again.heads[task].weight, suite.heads[task].weight)
    assert again.evaluate(None) == suite.evaluate(None)


def test_base_model_is_near_chance_and_each_adapter_carries_its_task(small_suite):
    suite, _, _ = small_suite
    base = suite.evaluate(None)
    for task, adapter in zip(suite.tasks, suite.adapters()):
        chance = 1 / DIGITS_TASKS[task][3]
        own = suite.evaluate(adapter, tasks=[task])[task]
        assert base[task] < chance + 0.2, (task, base[task])
        assert own > base[task] + 0.3, (task, own, base[task])


def test_heads_are_the_pretraining_head_read_through_the_label_map(small_suite):
    suite, _, _ = small_suite
    digit, parity = suite.heads["digit"], suite.heads["parity"]
    features = torch.rand(5, digit.in_features)
    logits = digit(features)
    expected = torch.stack([logits[:, 0::2].mean(1), logits[:, 1::2].mean(1)], 1)
    torch.testing.assert_close(parity(features), expected)
    assert not any(p.requires_grad for p in (*digit.parameters(), *parity.parameters()))


def test_linear_merge_from_files_equals_merge_in_memory(small_suite):
    suite, _, _ = small_suite
    paths = [suite.adapter_paths[t] for t in suite.tasks]
    from_files = merge_adapters(paths, [0.3] * len(paths))
    in_memory = merge_adapters([a.materialize() for a in suite.adapters()], [0.3] * len(paths))
    assert from_files.keys() == in_memory.keys() == {"fc1", "fc2", "fc3"}
    for module in from_files:
        torch.testing.assert_close(from_files[module].to_dense(), in_memory[module].to_dense())
    assert suite.evaluate(from_files) == suite.evaluate(in_memory)


def test_bench_rows_table_json_and_png(small_suite, tmp_path):
    suite, _, _ = small_suite
    results = run_quality_bench(suite, methods=["linear"], peft_types=["cat"], grid=(0.2, 0.5, 1.0))
    names = [row.name for row in results["rows"]]
    assert names == ["base (weight 0)", "individual (own adapter)", "linear", "peft:cat"]
    base, individual, linear, cat = results["rows"]
    assert individual.mean_normalised == pytest.approx(1.0)
    assert base.mean_normalised < 1.0
    # peft's cat is the exact weighted sum, so it must match our linear merge at every weight
    assert linear.val_curve == pytest.approx(cat.val_curve)
    assert linear.weight in (0.2, 0.5, 1.0) and linear.merge_seconds > 0 and linear.params == {}
    print_table(results)
    payload = json.loads(write_json(results, tmp_path / "q.json").read_text())
    assert [r["name"] for r in payload["rows"]] == names
    assert payload["summary"]["best_peft"]["name"] == "peft:cat"
    png = write_png(results, tmp_path / "q.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_density_is_chosen_with_the_weight_on_validation_for_ours_and_peft(small_suite):
    suite, _, _ = small_suite
    grid = (0.5, 1.0)
    results = run_quality_bench(suite, methods=["ties"], peft_types=["ties_svd"], grid=grid)
    ours, theirs = results["rows"][2:]
    for row in (ours, theirs):
        assert len(row.val_curve) == len(grid) * len(DENSITIES)
        assert row.params["density"] in DENSITIES and row.weight in grid
        assert row.val_curve[f"{row.weight:g} density={row.params['density']:g}"] == max(row.val_curve.values())
    total_rank = sum(a["fc1"].rank for a in suite.adapters())
    assert theirs.note == f"svd_rank={total_rank}"
    assert GRID[0] < 0.1 and GRID[-1] >= 3.0  # wide enough for sums (small λ) and disjoint means (large λ)


def test_bench_quality_cli_trains_the_suite_of_the_seed_it_is_given(small_suite, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import adaptermerge.quality.digits as digits
    from adaptermerge.cli import main

    suite, _, _ = small_suite
    asked = []

    def fake_load(config, *, cache_dir=None, progressbar=False):
        asked.append(config)
        return suite

    monkeypatch.setattr(digits, "load_digits_suite", fake_load)
    args = ["bench", "quality", "--seed", "3", "--methods", "linear", "--peft-types", "", "-o", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [c.seed for c in asked] == [3]
    assert asked[0].key() != digits_config().key()  # another seed is another cached suite
    assert (tmp_path / "quality-digits.json").is_file()


def test_quality_png_keeps_its_title_and_axis_labels_inside_the_picture(small_suite, tmp_path):
    from PIL import Image

    suite, _, _ = small_suite
    results = run_quality_bench(suite, methods=["linear"], peft_types=[], grid=(0.5,))
    pixels = np.asarray(Image.open(write_png(results, tmp_path / "q.png")).convert("L"))
    ink = pixels < 250
    assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()), "something touches the edge"
