"""Core Space methods against dense references of the same methods, applied in the same aligned basis.

Each reference below is written independently with numpy on dense matrices: it builds every task's dense update
`ΔW_t`, projects it on the Core Space bases (`U_Bᵀ ΔW_t U_A`), applies the method and maps back with
`U_B M* U_Aᵀ`. Only the bases (from `lowrank.orthonormal_bases`) and DARE's random draws are shared with the code
under test; `svd` is checked against a full-space truncated SVD, which needs no basis at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge import merge_adapters
from adaptermerge.errors import InvalidParameterError
from adaptermerge.lowrank import LowRank, orthonormal_bases
from adaptermerge.methods import get_method
from adaptermerge.methods.core_space import align
from adaptermerge.methods.sparsify import dare_generator
from tests.factories import TOLERANCES, make_adapter, random_lowrank

TOL = TOLERANCES[torch.float64]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: OpenMP threads only add waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def updates_of(out_features: int, in_features: int, ranks, seed: int = 0) -> list[LowRank]:
    return [
        random_lowrank(out_features, in_features, r, seed=seed * 100 + t, dtype=torch.float64)
        for t, r in enumerate(ranks)
    ]


def run(method: str, updates, weights, **params) -> np.ndarray:
    merge = get_method(method)
    return merge.fn(updates, weights, merge.make_params(params)).to_dense().numpy()


def dense_cores(updates):
    U_B, U_A = (u.numpy() for u in orthonormal_bases(updates))
    return U_B, U_A, np.stack([U_B.T @ u.to_dense().numpy() @ U_A for u in updates])


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = TOL) -> None:
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


# Dense references (numpy, loops, sorting instead of topk).


def ref_prune_magnitude(x: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return x.copy()
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        flat = x[t].ravel()
        keep = np.argsort(-np.abs(flat), kind="stable")[: int(density * flat.size)]
        out[t].flat[keep] = flat[keep]
    return out


def ref_disjoint(pruned: np.ndarray, weights, method: str) -> np.ndarray:
    signs = np.sign(pruned)
    votes = pruned.sum(0) if method == "total" else signs.sum(0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    total, count = np.zeros(pruned.shape[1:]), np.zeros(pruned.shape[1:])
    for t, w in enumerate(weights):
        agree = signs[t] == elected
        total += np.where(agree, w * pruned[t], 0.0)
        count += agree
    return total / np.maximum(count, 1)


def ref_dare_drop(cores: np.ndarray, density: float, seed: int, updates) -> np.ndarray:
    draws = torch.rand(cores.shape, generator=dare_generator(seed, updates), dtype=torch.float64).numpy()
    return np.where(draws < density, cores / density, 0.0)


def ref_polar(x: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def ref_numerical_rank(s: np.ndarray, shape) -> int:
    return max(int((s > max(shape) * np.finfo(float).eps * s[0]).sum()), 1)


def dense_reference(method: str, updates, weights, **params) -> np.ndarray:
    """The method on dense matrices in the Core Space basis (or, for `svd`, in full space)."""
    weights = list(weights)
    w = np.array(weights)[:, None, None]
    if method == "svd":
        total = sum(wt * u.to_dense().numpy() for wt, u in zip(weights, updates))
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        k = params.get("rank") or max(x.rank for x in updates)
        return (u[:, :k] * s[:k]) @ vh[:k]
    U_B, U_A, cores = dense_cores(updates)
    density = params.get("density", 1.0)
    sign = params.get("majority_sign_method", "total")
    if method == "ties":
        merged = ref_disjoint(ref_prune_magnitude(cores, density), weights, sign)
    elif method == "magnitude_prune":
        merged = (ref_prune_magnitude(cores, density) * w).sum(0)
    elif method == "dare_linear":
        merged = (ref_dare_drop(cores, density, params.get("seed", 0), updates) * w).sum(0)
    elif method == "dare_ties":
        dropped = ref_dare_drop(cores, density, params.get("seed", 0), updates)
        merged = ref_disjoint(ref_prune_magnitude(dropped, params.get("trim_density", 0.2)), weights, sign)
    elif method == "tsv":
        parts = [np.linalg.svd(wt * c, full_matrices=False) for wt, c in zip(weights, cores)]
        width = min(cores.shape[1:])
        q = (
            [u.rank for u in updates]
            if sum(u.rank for u in updates) <= width
            else [min(width // len(updates), u.rank) for u in updates]
        )
        Ut = np.concatenate([p[0][:, :k] for p, k in zip(parts, q)], axis=1)
        st_ = np.concatenate([p[1][:k] for p, k in zip(parts, q)])
        Vt = np.concatenate([p[2][:k] for p, k in zip(parts, q)], axis=0)
        merged = ref_polar(Ut) @ np.diag(st_) @ ref_polar(Vt)
    elif method == "iso_c":
        u, s, vh = np.linalg.svd((cores * w).sum(0), full_matrices=False)
        k = ref_numerical_rank(s, cores.shape[1:])
        merged = s[:k].mean() * u[:, :k] @ vh[:k]
    else:
        raise AssertionError(method)
    return U_B @ merged @ U_A.T


CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("ties", {"density": 1.0}),
    ("magnitude_prune", {"density": 0.25}),
    ("dare_linear", {"density": 0.6, "seed": 3}),
    ("dare_ties", {"density": 0.4, "seed": 7}),
    ("dare_ties", {"density": 0.7, "seed": 1, "majority_sign_method": "frequency"}),
    ("dare_ties", {"density": 0.6, "seed": 2, "trim_density": 1.0}),
    ("svd", {}),
    ("svd", {"rank": 3}),
    ("tsv", {}),
    ("iso_c", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_method_in_core_space_matches_dense_reference(method, params):
    updates = updates_of(23, 17, [2, 5, 3], seed=1)  # mixed ranks, R = 10
    weights = [0.8, -0.5, 1.3]
    assert_close(run(method, updates, weights, **params), dense_reference(method, updates, weights, **params))


@pytest.mark.parametrize("method", ["ties", "tsv", "iso_c", "dare_ties"])
def test_method_matches_reference_when_stacked_rank_exceeds_a_side(method):
    updates = updates_of(6, 40, [4, 3, 2], seed=2)  # R = 9 > out = 6: cores are 6 × 9
    params = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    assert_close(
        run(method, updates, [1.0, 0.5, 0.7], **params), dense_reference(method, updates, [1.0, 0.5, 0.7], **params)
    )


def test_tsv_takes_no_more_of_a_task_than_its_rank_when_the_core_is_narrow():
    updates = updates_of(6, 20, [1, 6], seed=4)  # R = 7 > out = 6: width // T = 3 slots, but task 0 has rank 1
    assert_close(run("tsv", updates, [1.0, 0.8]), dense_reference("tsv", updates, [1.0, 0.8]))


def test_cores_hold_each_update_exactly():
    updates = updates_of(31, 12, [1, 4, 6, 2], seed=3)  # R = 13 > in = 12
    space, cores = align(updates)
    assert cores.shape == (4, 13, 12)
    for update, core in zip(updates, cores):
        assert_close((space.U_B @ core @ space.U_A.T).numpy(), update.to_dense().numpy())


def test_core_space_task_arithmetic_equals_plain_sum():
    updates = updates_of(64, 48, [8, 4, 8, 2], seed=4)
    weights = [0.25, -1.0, 0.5, 2.0]
    space, cores = align(updates)
    merged = space.to_lowrank(sum(w * c for w, c in zip(weights, cores)))
    plain = sum(w * u.to_dense() for w, u in zip(weights, updates))
    assert_close(merged.to_dense().numpy(), plain.numpy())
    assert merged.rank <= 22


def test_core_space_keeps_updates_of_very_different_scales_exact():
    """Adapters a million times apart in scale (different learning rates or alphas) are all held exactly."""
    updates = [LowRank(u.A, u.B * scale) for u, scale in zip(updates_of(60, 45, [5, 3, 4], seed=8), [1.0, 1e-4, 1e-9])]
    space, cores = align(updates)
    for update, core in zip(updates, cores):
        dense = update.to_dense().numpy()
        assert_close((space.U_B @ core @ space.U_A.T).numpy() / np.abs(dense).max(), dense / np.abs(dense).max())
    weights = [1.0, 1e4, 1e9]
    plain = sum(w * u.to_dense() for w, u in zip(weights, updates)).numpy()
    merged = space.to_lowrank(sum(w * c for w, c in zip(weights, cores))).to_dense().numpy()
    assert_close(merged, plain)


def test_core_space_sum_is_independent_of_the_basis():
    """QR bases instead of the SVD ones give the same task-arithmetic update."""
    updates = updates_of(20, 15, [3, 3], seed=5)
    Q_B, _ = torch.linalg.qr(torch.cat([u.B for u in updates], dim=1))
    Q_A, _ = torch.linalg.qr(torch.cat([u.A for u in updates], dim=0).T)
    via_qr = sum(Q_B @ (Q_B.T @ u.B) @ (u.A @ Q_A) @ Q_A.T for u in updates)
    space, cores = align(updates)
    assert_close(via_qr.numpy(), space.to_lowrank(cores.sum(0)).to_dense().numpy())


def test_to_lowrank_truncation_is_the_best_low_rank_approximation():
    updates = updates_of(30, 25, [4, 4], seed=6)
    space, cores = align(updates)
    truncated = space.to_lowrank(cores.sum(0), rank=3)
    assert truncated.rank == 3
    u, s, vh = np.linalg.svd(sum(x.to_dense().numpy() for x in updates))
    assert_close(truncated.to_dense().numpy(), (u[:, :3] * s[:3]) @ vh[:3])


def test_ties_of_agreeing_tasks_at_full_density_is_the_mean():
    base = random_lowrank(12, 10, 3, seed=7, dtype=torch.float64)
    updates = [base.scale(1.0), base.scale(2.0), base.scale(3.0)]  # same signs everywhere
    assert_close(run("ties", updates, [1.0, 1.0, 1.0], density=1.0), 2.0 * base.to_dense().numpy())


def test_iso_c_flattens_the_spectrum():
    updates = updates_of(20, 16, [3, 2], seed=8)
    singular = np.linalg.svd(run("iso_c", updates, [1.0, 1.0]), compute_uv=False)
    nonzero = singular[singular > 1e-9]
    assert len(nonzero) == 5
    np.testing.assert_allclose(nonzero, nonzero[0], rtol=1e-10)
    summed = np.linalg.svd(sum(u.to_dense().numpy() for u in updates), compute_uv=False)[:5]
    np.testing.assert_allclose(nonzero[0], summed.mean(), rtol=1e-10)


def test_tsv_of_mutually_orthogonal_tasks_is_task_arithmetic():
    Q_out, _ = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    Q_in, _ = torch.linalg.qr(torch.randn(18, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    updates = [
        LowRank(Q_in[:, 3 * t : 3 * t + 3].T.contiguous(), Q_out[:, 3 * t : 3 * t + 3] * (t + 1.5)) for t in (0, 1)
    ]
    assert_close(run("tsv", updates, [1.0, 0.5]), sum(w * u.to_dense().numpy() for w, u in zip([1.0, 0.5], updates)))


def test_dare_at_full_density_is_task_arithmetic():
    updates = updates_of(15, 11, [2, 3], seed=9)
    expected = sum(w * u.to_dense().numpy() for w, u in zip([0.3, 0.9], updates))
    assert_close(run("dare_linear", updates, [0.3, 0.9], density=1.0), expected)


def test_dare_masks_follow_the_seed_and_the_contents_not_the_module_order():
    shapes = {"a": (16, 12), "b": (16, 12), "c": (9, 12)}
    adapters = [make_adapter(shapes, 3, seed=s, dtype=torch.float64) for s in (1, 2)]
    reordered = [a.with_modules({k: a[k] for k in reversed(list(a))}) for a in adapters]
    first = merge_adapters(adapters, method="dare_ties", density=0.5, seed=11)
    again = merge_adapters(reordered, method="dare_ties", density=0.5, seed=11)
    other = merge_adapters(adapters, method="dare_ties", density=0.5, seed=12)
    for module in shapes:
        torch.testing.assert_close(first[module].to_dense(), again[module].to_dense(), rtol=0, atol=0)
        assert not torch.allclose(first[module].to_dense(), other[module].to_dense())
    # modules of equal shape still get their own masks
    assert not torch.allclose(first["a"].to_dense(), merge_adapters(adapters, method="linear")["a"].to_dense())


def test_mixed_ranks_and_partial_module_overlap_through_merge_adapters():
    first = make_adapter({"q": (14, 10), "v": (14, 10)}, {"q": 2, "v": 4}, seed=1, dtype=torch.float64, name="x")
    second = make_adapter({"v": (14, 10), "o": (10, 14)}, {"v": 3, "o": 5}, seed=2, dtype=torch.float64, name="y")
    weights = [0.6, 1.4]
    for method, params in [("ties", {"density": 0.4}), ("tsv", {}), ("svd", {})]:
        merged = merge_adapters([first, second], weights, method, **params)
        assert set(merged) == {"q", "v", "o"}
        assert_close(
            merged["v"].to_dense().numpy(), dense_reference(method, [first["v"], second["v"]], weights, **params)
        )
        assert_close(merged["q"].to_dense().numpy(), dense_reference(method, [first["q"]], [0.6], **params))
        assert_close(merged["o"].to_dense().numpy(), dense_reference(method, [second["o"]], [1.4], **params))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.0}),
        ("ties", {"density": 1.5}),
        ("ties", {"majority_sign_method": "sum"}),
        ("dare_ties", {"seed": 1.5}),
        ("dare_ties", {"trim_density": 0.0}),
        ("knots", {"density": -0.1}),
        ("svd", {"rank": 0}),
        ("tsv", {"density": 0.5}),
        ("iso_cts", {"common_space_fraction": 0.0}),
        ("star", {"eta": 0}),
        ("star", {"eta": 120}),
    ],
)
def test_out_of_range_or_unknown_parameters_are_refused(method, params):
    with pytest.raises(InvalidParameterError):
        get_method(method).make_params(params)


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_core_space_sum_equals_plain_sum_for_any_shapes_and_ranks(out_features, in_features, ranks, seed):
    updates = updates_of(out_features, in_features, ranks, seed=seed)
    weights = [(-1.0) ** t * (t + 1) / 2 for t in range(len(ranks))]
    space, cores = align(updates)
    assert cores.shape == (len(ranks), min(out_features, sum(ranks)), min(in_features, sum(ranks)))
    merged = space.to_lowrank(sum(w * c for w, c in zip(weights, cores)))
    assert merged.rank <= min(out_features, in_features, sum(ranks))
    assert_close(merged.to_dense().numpy(), sum(w * u.to_dense() for w, u in zip(weights, updates)).numpy(), 1e-9)


@settings(max_examples=20, deadline=None)
@given(
    method=st.sampled_from(["ties", "magnitude_prune", "tsv", "iso_c"]),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    density=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_methods_match_dense_reference_for_random_cases(method, ranks, density, seed):
    updates = updates_of(13, 9, ranks, seed=seed)
    weights = [1.0 - 0.3 * t for t in range(len(ranks))]
    params = {"density": density} if method in ("ties", "magnitude_prune") else {}
    assert_close(run(method, updates, weights, **params), dense_reference(method, updates, weights, **params), 1e-8)


def test_linear_equals_peft_cat_on_the_same_adapters():
    """peft's exact `cat` merge and our `linear` give the same ΔW, with mixed ranks, alphas and target modules."""
    from peft import LoraConfig, get_peft_model

    from adaptermerge import Adapter

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(10, 12)
            self.v = torch.nn.Linear(10, 12)
            self.fc = torch.nn.Linear(12, 7)

    torch.manual_seed(0)
    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False),
        "second": LoraConfig(r=6, lora_alpha=3, target_modules=["v", "fc"], init_lora_weights=False),
    }
    model = get_peft_model(Tiny(), configs["first"], adapter_name="first")
    model.add_adapter("second", configs["second"])
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["first", "second"], weights, "merged", combination_type="cat")

    layers = {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}

    def lowrank(layer, key):
        return LowRank(layer.lora_A[key].weight.detach(), layer.lora_B[key].weight.detach() * layer.scaling[key])

    ours = [
        Adapter({name: lowrank(layer, key) for name, layer in layers.items() if key in layer.lora_A}, name=key)
        for key in configs
    ]
    merged = merge_adapters(ours, weights, "linear")
    assert set(merged) == {"q", "v", "fc"}
    for name, layer in layers.items():
        expected = layer.get_delta_weight("merged").detach()
        torch.testing.assert_close(merged[name].to_dense().float(), expected, rtol=1e-5, atol=1e-6)
