"""Batch runs: correct merges, failures isolated, resumable outputs, process pool and Ray backends."""

import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from adaptermerge import load_adapter, save_adapter
from adaptermerge.batch import map_tasks, run_jobs
from adaptermerge.cli import main
from adaptermerge.recipes import MergeJob, load_recipe
from tests.factories import TOLERANCES, dense, make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (24, 12)}


@pytest.fixture
def library(tmp_path):
    """Three PEFT adapters and one corrupt file."""
    for i in range(3):
        save_adapter(make_adapter(SHAPES, rank=2 + i, seed=i), tmp_path / "loras" / f"lora_{i}")
    (tmp_path / "loras" / "broken.safetensors").write_bytes(b"\x00" * 16)
    return tmp_path


def _jobs(folder):
    loras = folder / "loras"
    return [
        MergeJob("ab", (str(loras / "lora_0"), str(loras / "lora_1")), (0.7, 0.3), folder / "out" / "ab"),
        MergeJob(
            "bad", (str(loras / "broken.safetensors"), str(loras / "lora_2")), (1.0, 1.0), folder / "out" / "bad"
        ),
        MergeJob("all", tuple(str(loras / f"lora_{i}") for i in range(3)), (1.0,) * 3, folder / "out" / "all", rank=3),
    ]


def test_run_jobs_writes_exact_merges_and_isolates_a_broken_adapter(library):
    results = run_jobs(_jobs(library), workers=0)
    assert [(r.name, r.status) for r in results] == [("ab", "done"), ("bad", "failed"), ("all", "done")]
    assert "broken.safetensors" in results[1].message and "safetensors" in results[1].message
    assert not (library / "out" / "bad").exists()
    inputs = [dense(load_adapter(library / "loras" / f"lora_{i}")) for i in range(3)]
    merged = dense(load_adapter(library / "out" / "ab"))
    for module in SHAPES:
        expected = 0.7 * inputs[0][module] + 0.3 * inputs[1][module]
        torch.testing.assert_close(merged[module], expected, rtol=TOLERANCES[torch.float32], atol=1e-6)
    truncated = load_adapter(library / "out" / "all")
    assert all(lr.rank == 3 for lr in truncated.values())
    for module in SHAPES:  # rank-3 truncation of the sum is its best rank-3 approximation (Eckart–Young)
        total = sum(x[module] for x in inputs)
        best = torch.linalg.svdvals(total)[3:].square().sum().sqrt()
        assert torch.linalg.matrix_norm(truncated[module].to_dense() - total) <= best * (1 + 1e-4)


def test_a_rerun_skips_written_outputs_unless_forced(library):
    jobs = [_jobs(library)[0]]
    run_jobs(jobs, workers=0)
    written = (library / "out" / "ab" / "adapter_model.safetensors").stat().st_mtime_ns
    (again,) = run_jobs(jobs, workers=0)
    assert again.status == "skipped"
    assert (library / "out" / "ab" / "adapter_model.safetensors").stat().st_mtime_ns == written
    (forced,) = run_jobs(jobs, workers=0, force=True)
    assert forced.status == "done"
    assert (library / "out" / "ab" / "adapter_model.safetensors").stat().st_mtime_ns != written


def _die_on_two(x: int) -> int:
    if x == 2:
        os._exit(3)  # a worker that dies outright, as an out-of-memory kill would
    if x == 3:
        raise ValueError("three is bad")
    return x * 10


def test_process_pool_survives_a_dying_worker_and_reports_only_that_task():
    outcomes = dict(map_tasks(_die_on_two, [0, 1, 2, 3, 4], workers=2))
    assert {k: v for k, v in outcomes.items() if k not in (2, 3)} == {0: 0, 1: 10, 4: 40}
    assert isinstance(outcomes[2], RuntimeError) and "worker process died" in str(outcomes[2])
    assert isinstance(outcomes[3], ValueError)


def test_cli_run_reports_failures_with_exit_1_and_resumes(library):
    recipe = {
        "merges": [
            {"name": "ab", "adapters": ["loras/lora_0", {"path": "loras/lora_1", "weight": 0.5}], "output": "out/ab"},
            {"name": "bad", "adapters": ["loras/broken.safetensors"], "output": "out/bad"},
            {"name": "glob", "adapters": ["loras/lora_*"], "method": "linear", "rank": 2, "output": "out/glob"},
        ]
    }
    path = library / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner(env={"COLUMNS": "200"})
    first = runner.invoke(main, ["run", str(path), "--workers", "2"])
    assert first.exit_code == 1, first.output
    assert "2 done, 0 skipped, 1 failed" in first.output and "Error: bad:" in first.output
    assert (library / "out" / "glob").is_dir() and (library / "out" / "ab").is_dir()
    fixed = {"merges": [m for m in recipe["merges"] if m["name"] != "bad"]}
    path.write_text(yaml.safe_dump(fixed))
    second = runner.invoke(main, ["run", str(path), "--workers", "0"])
    assert second.exit_code == 0, second.output
    assert "0 done, 2 skipped, 0 failed" in second.output


def test_ray_backend_runs_jobs_and_similarity_on_a_local_instance(library):
    ray = pytest.importorskip("ray", reason="the ray backend is an optional extra: pip install 'adaptermerge[ray]'")
    from adaptermerge.library import adapter_similarity

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        results = run_jobs(_jobs(library), backend="ray")
        similarity = adapter_similarity(library / "loras", backend="ray", workers=1)
    finally:
        ray.shutdown()
    assert [r.status for r in results] == ["done", "failed", "done"]
    merged, a, b = (dense(load_adapter(library / p)) for p in ("out/ab", "loras/lora_0", "loras/lora_1"))
    for module in SHAPES:
        torch.testing.assert_close(merged[module], 0.7 * a[module] + 0.3 * b[module], rtol=1e-5, atol=1e-6)
    assert similarity.names == ("lora_0", "lora_1", "lora_2")
    reference = adapter_similarity(library / "loras", workers=0)
    torch.testing.assert_close(similarity.cosine, reference.cosine)


def test_recipe_jobs_run_as_written(library):
    path = library / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"merges": [{"adapters": ["loras/lora_0"], "output": "out/one", "dtype": "float16"}]})
    )
    (result,) = run_jobs(load_recipe(path).jobs, workers=0)
    assert result.status == "done"
    one = load_adapter(library / "out" / "one")
    assert one.metadata.dtype == torch.float16
