"""Reversible bundles (rmm): ΔW-level Gram basis, exact recovery at k = T, error from the spectrum, save/load, CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from adaptermerge import load_adapter, save_adapter
from adaptermerge.adapter import Adapter
from adaptermerge.bundle import ReversibleBundle, is_bundle, load_bundle
from adaptermerge.cli import main
from adaptermerge.errors import InvalidParameterError
from adaptermerge.lowrank import LowRank, gram
from adaptermerge.methods import get_method
from adaptermerge.methods.rmm import rmm_module, task_cores
from tests.factories import make_adapter, random_lowrank

METHOD = get_method("rmm")
SHAPES = {"q_proj": (16, 12), "up_proj": (20, 12)}


def build(adapters, basis_size, weights=None):
    return METHOD.fn(adapters, weights or [1.0] * len(adapters), METHOD.make_params({"basis_size": basis_size}))


def tasks(dtype=torch.float64):
    """Four adapters with different ranks; the last lacks `up_proj`."""
    adapters = [make_adapter(SHAPES, rank=r, seed=s, dtype=dtype, name=f"task{s}") for s, r in enumerate((2, 3, 4, 2))]
    last = adapters[-1]
    adapters[-1] = Adapter({"q_proj": last["q_proj"]}, last.metadata, last.name)
    return adapters


def test_gram_from_factors_equals_dense_gram_and_core_gram():
    updates = [random_lowrank(16, 12, r, seed=r, dtype=torch.float64) for r in (2, 3, 5)]
    flat = torch.stack([u.to_dense().flatten() for u in updates])
    _, _, cores = task_cores(updates)
    torch.testing.assert_close(gram(updates), flat @ flat.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gram(updates), torch.einsum("spq,tpq->st", cores, cores), rtol=1e-10, atol=1e-12)


def test_basis_size_equal_to_task_count_recovers_every_task_exactly():
    adapters = tasks()
    bundle = build(adapters, basis_size=4)
    for adapter in adapters:
        recovered = bundle.recover(adapter.name)
        assert set(recovered) == set(adapter)
        for name, update in adapter.items():
            assert recovered[name].rank == update.rank
            torch.testing.assert_close(recovered[name].to_dense(), update.to_dense(), rtol=1e-10, atol=1e-10)


def test_reconstruction_error_equals_discarded_eigenvalues_and_falls_with_k():
    updates = [random_lowrank(16, 12, 3, seed=s, dtype=torch.float64) for s in range(5)]
    eigenvalues = torch.linalg.eigvalsh(gram(updates)).flip(0)
    errors = []
    for k in range(1, 6):
        U_B, U_A, basis, coefficients, spectrum = rmm_module(updates, k)
        torch.testing.assert_close(spectrum, eigenvalues)
        recovered = torch.einsum("tj,jpq->tpq", coefficients, basis)
        error = sum(((U_B @ core @ U_A.T) - u.to_dense()).pow(2).sum() for core, u in zip(recovered, updates))
        torch.testing.assert_close(error, eigenvalues[k:].sum(), rtol=1e-8, atol=1e-10)
        errors.append(float(error))
        # The basis updates are Frobenius-orthonormal.
        torch.testing.assert_close(torch.einsum("ipq,jpq->ij", basis, basis), torch.eye(k, dtype=torch.float64))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12


def test_bundle_residual_matches_the_recovered_error():
    adapters = tasks()
    bundle = build(adapters, basis_size=2)
    for name in SHAPES:
        module = bundle.modules[name]
        error = sum(
            (bundle.recover(a.name, truncate_rank=False)[name].to_dense() - a[name].to_dense()).pow(2).sum()
            for a in adapters
            if name in a
        )
        assert module.cores.shape[0] == 2
        torch.testing.assert_close(torch.as_tensor(module.residual, dtype=torch.float64), error, rtol=1e-8, atol=1e-10)


def test_duplicated_tasks_keep_fewer_basis_updates_and_stay_exact():
    x = random_lowrank(16, 12, 3, seed=1, dtype=torch.float64)
    twin = LowRank(x.A * 2.0, x.B * 0.5)
    _, _, basis, coefficients, _ = rmm_module([x, twin], basis_size=2)
    assert basis.shape[0] == 1
    torch.testing.assert_close(coefficients[0], coefficients[1])


def test_merge_with_weights_is_the_weighted_sum_at_full_basis():
    adapters = tasks()
    bundle = build(adapters, basis_size=4, weights=[0.5, 0.5, 0.5, 0.5])
    weights = [0.3, -1.0, 0.0, 2.0]
    merged = bundle.merge(weights)
    for name in SHAPES:
        expected = sum(w * a[name].to_dense() for w, a in zip(weights, adapters) if name in a)
        torch.testing.assert_close(merged[name].to_dense(), expected, rtol=1e-10, atol=1e-10)
    default = bundle.merge()
    expected = 0.5 * sum(a["q_proj"].to_dense() for a in adapters)
    torch.testing.assert_close(default["q_proj"].to_dense(), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(InvalidParameterError, match="one per task"):
        bundle.merge([1.0])


def test_bundle_save_load_round_trip(tmp_path):
    bundle = build(tasks(), basis_size=3, weights=[1.0, 0.5, 0.25, 2.0])
    path = bundle.save(tmp_path / "bundle")
    assert is_bundle(path) and not is_bundle(tmp_path)
    loaded = load_bundle(path)
    assert loaded.task_names == bundle.task_names and loaded.weights == bundle.weights
    assert loaded.basis_size == 3
    for name, module in bundle.modules.items():
        for field in ("U_B", "U_A", "cores", "coefficients", "eigenvalues"):
            torch.testing.assert_close(getattr(loaded.modules[name], field), getattr(module, field))
        assert loaded.modules[name].ranks == module.ranks
    torch.testing.assert_close(loaded.recover("task1")["q_proj"].A, bundle.recover("task1")["q_proj"].A)
    with pytest.raises(FileExistsError):
        bundle.save(path)
    with pytest.raises(InvalidParameterError, match="task0, task1"):
        loaded.recover("nope")


def test_basis_size_above_task_count_raises():
    with pytest.raises(InvalidParameterError, match="exceeds the 2 adapters"):
        build(tasks()[:2], basis_size=3)


def test_storage_compares_the_bundle_with_the_separate_adapters():
    info = build(tasks(), basis_size=2).storage()
    # q_proj: four tasks of ranks 2+3+4+2 = 11 on 16+12; up_proj: three tasks of ranks 2+3+4 = 9 on 20+12.
    assert info["separate_parameters"] == 11 * 28 + 9 * 32
    q = next(m for m in info["per_module"] if m["module"] == "q_proj")
    assert q["parameters"] == 16 * 11 + 12 * 11 + 2 * 11 * 11 + 4 * 2


def run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


def test_cli_merge_writes_a_bundle_that_recover_and_inspect_read(tmp_path):
    paths = []
    for seed, rank in ((1, 4), (2, 2), (3, 4)):
        path = tmp_path / f"lora{seed}"
        save_adapter(make_adapter(SHAPES, rank=rank, seed=seed), path, format="peft")
        paths.append(path)
    bundle_path = tmp_path / "bundle"
    result = run("merge", *paths, "--method", "rmm", "--basis-size", "3", "-o", bundle_path)
    assert result.exit_code == 0, result.output
    assert isinstance(load_bundle(bundle_path), ReversibleBundle)

    out = tmp_path / "recovered"
    result = run("recover", bundle_path, "--task", "lora2", "-o", out)
    assert result.exit_code == 0, result.output
    recovered, original = load_adapter(out), load_adapter(paths[1])
    for name in SHAPES:
        assert recovered[name].rank == 2
        torch.testing.assert_close(recovered[name].to_dense(), original[name].to_dense(), rtol=1e-5, atol=1e-5)

    result = run("inspect", bundle_path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["tasks"] == ["lora1", "lora2", "lora3"]
    assert info["separate_parameters"] == (4 + 2 + 4) * (28 + 32)
    assert info["bundle_parameters"] > 0 and info["size_ratio"] > 0
    assert "separate adapters" in run("inspect", bundle_path).output

    result = CliRunner().invoke(main, ["recover", str(bundle_path), "--task", "nope", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "lora1, lora2, lora3" in result.output
