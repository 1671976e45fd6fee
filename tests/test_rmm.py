"""Reversible bundles (rmm): k basis adapters per module, exact at k = T, errors from the spectra, sizes, CLI."""

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adaptermerge import load_adapter, save_adapter
from adaptermerge.adapter import Adapter, AdapterMetadata
from adaptermerge.bundle import ReversibleBundle, is_bundle, load_bundle
from adaptermerge.cli import main
from adaptermerge.errors import InvalidParameterError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods import get_method
from tests.factories import make_adapter, random_lowrank

METHOD = get_method("rmm")
SHAPES = {"q_proj": (16, 12), "up_proj": (20, 12)}


def build(adapters, basis_size, weights=None, coefficients="position"):
    params = METHOD.make_params({"basis_size": basis_size, "coefficients": coefficients})
    return METHOD.fn(adapters, weights or [1.0] * len(adapters), params)


def tasks(dtype=torch.float64):
    """Four adapters with different ranks; the last lacks `up_proj`."""
    adapters = [make_adapter(SHAPES, rank=r, seed=s, dtype=dtype, name=f"task{s}") for s, r in enumerate((2, 3, 4, 2))]
    last = adapters[-1]
    adapters[-1] = Adapter({"q_proj": last["q_proj"]}, last.metadata, last.name)
    return adapters


def best_rank_k(rows: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(rows, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def reference_factors(adapters, name: str, k: int, coefficients: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each task's recovered `(B, A)`, written independently with numpy: `layer` is the best rank-`k` fit of the
    tasks' flattened factors (one row per task); `position` the best rank-`k` fit of each row of the `B`s (column of
    the `A`s) across the tasks."""
    rank = max(a[name].rank for a in adapters)
    pairs = [padded(a[name], rank) for a in adapters]
    out = []
    for side in (0, 1):
        stack = np.stack([(p[side] if side == 0 else p[side].T).numpy() for p in pairs])  # (T, P, r)
        if coefficients == "layer":
            fit = best_rank_k(stack.reshape(len(pairs), -1), k).reshape(stack.shape)
        else:
            fit = np.stack([best_rank_k(stack[:, p, :].T, k).T for p in range(stack.shape[1])], axis=1)
        out.append([torch.from_numpy(f if side == 0 else f.T.copy()) for f in fit])
    return list(zip(*out))


def padded(update: LowRank, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = torch.zeros(update.out_features, rank, dtype=torch.float64)
    A = torch.zeros(rank, update.A.shape[1], dtype=torch.float64)
    B[:, : update.rank], A[: update.rank] = update.B, update.A
    return B, A


@pytest.mark.parametrize("coefficients", ["position", "layer"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_recovered_factors_are_the_best_rank_k_fit(k, coefficients):
    adapters = [
        make_adapter(SHAPES, rank=r, seed=s, dtype=torch.float64, name=f"t{s}") for s, r in enumerate((3, 2, 3))
    ]
    bundle = build(adapters, basis_size=k, coefficients=coefficients)
    for name in SHAPES:
        for t, (B, A) in enumerate(reference_factors(adapters, name, k, coefficients)):
            recovered = bundle.modules[name].factors(t)
            torch.testing.assert_close(recovered.B, B, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(recovered.A, A, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("coefficients", ["position", "layer"])
def test_residual_is_the_relative_error_of_the_recovered_updates(coefficients):
    adapters = tasks()
    bundle = build(adapters, basis_size=2, coefficients=coefficients)
    for name, module in bundle.modules.items():
        present = [(t, a) for t, a in enumerate(adapters) if name in a]
        error = sum((module.factors(t).to_dense() - a[name].to_dense()).pow(2).sum() for t, a in present)
        total = sum(a[name].to_dense().pow(2).sum() for _, a in present)
        assert 0 < module.relative_residual == pytest.approx(float(error / total), rel=1e-8)


@pytest.mark.parametrize("coefficients", ["position", "layer"])
def test_basis_size_equal_to_task_count_recovers_every_task_exactly(coefficients):
    adapters = tasks()
    bundle = build(adapters, basis_size=4, coefficients=coefficients)
    for adapter in adapters:
        recovered = bundle.recover(adapter.name)
        assert set(recovered) == set(adapter)
        for name, update in adapter.items():
            assert recovered[name].rank == update.rank
            torch.testing.assert_close(recovered[name].to_dense(), update.to_dense(), rtol=1e-10, atol=1e-10)


def test_duplicated_tasks_keep_fewer_basis_elements_and_stay_exact():
    x = random_lowrank(16, 12, 3, seed=1, dtype=torch.float64)
    twin = LowRank(x.A, x.B * 2.0)
    metadata = AdapterMetadata(dtype=torch.float64)
    adapters = [Adapter({"m": u}, metadata, n) for u, n in ((x, "x"), (twin, "twin"))]
    bundle = build(adapters, basis_size=2, coefficients="layer")
    assert bundle.modules["m"].basis_kept == 1
    torch.testing.assert_close(bundle.recover("twin")["m"].to_dense(), twin.to_dense(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coefficients", ["position", "layer"])
def test_relabelling_tasks_permutes_the_coefficients_not_the_recovery(coefficients):
    adapters = [make_adapter(SHAPES, rank=3, seed=s, dtype=torch.float64, name=f"t{s}") for s in range(4)]
    bundle = build(adapters, basis_size=2, coefficients=coefficients)
    reordered = build(adapters[::-1], basis_size=2, coefficients=coefficients)
    for adapter in adapters:
        for name in SHAPES:
            torch.testing.assert_close(
                bundle.recover(adapter.name)[name].to_dense(), reordered.recover(adapter.name)[name].to_dense()
            )


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
        for side in ("B", "A"):
            for field in ("basis", "coefficients"):
                saved, kept = (
                    getattr(getattr(loaded.modules[name], side), field),
                    getattr(getattr(module, side), field),
                )
                torch.testing.assert_close(saved, kept.to(saved.dtype))
        assert loaded.modules[name].ranks == module.ranks
        assert loaded.modules[name].relative_residual == module.relative_residual
    torch.testing.assert_close(loaded.recover("task1")["q_proj"].A, bundle.recover("task1")["q_proj"].A)
    with pytest.raises(FileExistsError):
        bundle.save(path)
    with pytest.raises(InvalidParameterError, match="task0, task1"):
        loaded.recover("nope")


def test_basis_size_above_task_count_raises():
    with pytest.raises(InvalidParameterError, match="exceeds the 2 adapters"):
        build(tasks()[:2], basis_size=3)


def test_storage_follows_the_formulas_of_both_readings():
    # q_proj: four tasks of ranks 2+3+4+2 = 11 on 16+12, padded to rank 4; up_proj: three tasks of ranks 2+3+4 = 9.
    layer = build(tasks(), basis_size=2, coefficients="layer").storage()
    assert layer["separate_parameters"] == 11 * 28 + 9 * 32
    q = next(m for m in layer["per_module"] if m["module"] == "q_proj")
    assert q["parameters"] == 2 * 4 * 28 + 2 * (2 * 4)  # two basis adapters at rank 4, one (2, 4) C per factor
    position = build(tasks(), basis_size=2, coefficients="position").storage()
    q = next(m for m in position["per_module"] if m["module"] == "q_proj")
    assert q["parameters"] == 28 * 2 * (4 + 4)  # per position k (r + T)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_layer_bundle_of_equal_rank_adapters_is_smaller_than_the_adapters_for_k_below_t(k):
    adapters = [make_adapter(SHAPES, rank=4, seed=s, name=f"t{s}") for s in range(4)]
    info = build(adapters, basis_size=k, coefficients="layer").storage()
    # k float32 basis adapters of rank 4 over both modules, and per module and factor one (k, 4) C
    basis_bytes, coefficient_bytes = k * 4 * (28 + 32) * 4, 2 * 2 * (k * 4) * 4
    assert info["bundle_bytes"] == basis_bytes + coefficient_bytes
    assert info["bundle_bytes"] < info["separate_bytes"] == 4 * 4 * (28 + 32) * 4


def test_a_position_bundle_that_is_not_smaller_than_the_adapters_says_so():
    """Four rank-4 tasks: per-position coefficients are compact only for k < r T / (r + T) = 2."""
    from adaptermerge.errors import AdapterMergeWarning

    adapters = [make_adapter(SHAPES, rank=4, seed=s, name=f"t{s}") for s in range(4)]
    with pytest.warns(AdapterMergeWarning, match=r"--coefficients layer"):
        info = build(adapters, basis_size=2).storage()
    assert info["bundle_parameters"] >= info["separate_parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMergeWarning)
        assert build(adapters, basis_size=1).storage()["size_ratio"] < 1
        assert build(adapters, basis_size=2, coefficients="layer").storage()["size_ratio"] < 1
        build(adapters, basis_size=4)  # exact: k = T is not a compression


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
