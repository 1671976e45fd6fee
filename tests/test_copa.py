"""CoPA-Merging: pruned factors, complementary per-rank scales from A, σ-normalised B, λ on both factors."""

import math

import numpy as np
import pytest
import torch

from adaptermerge import merge_adapters
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods import get_method
from adaptermerge.methods.copa import complementary_scales, magnitude_prune
from tests.factories import make_adapter, random_lowrank

METHOD = get_method("copa")


def copa(updates, weights=None, **params):
    return METHOD.fn(updates, weights or [1.0] * len(updates), METHOD.make_params(params))


def reference_copa(updates, weights, density=0.2, att_ratio=0.2, fuse_weight=2.0):
    """The spec's steps, written as plain loops over numpy arrays."""

    def prune(x):
        flat = sorted(abs(v) for v in x.flatten())
        index = math.floor((1 - density) * x.size + 1e-9)
        if index < 1:
            return x.copy()
        threshold = flat[index - 1]
        out = x.copy()
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                if abs(x[i, j]) < threshold:
                    out[i, j] = 0.0
        return out

    r = updates[0].rank
    A_sum = np.zeros(updates[0].A.shape)
    B_num = np.zeros(updates[0].B.shape)
    sigma_sum = np.zeros(r)
    for update, weight in zip(updates, weights):
        A = update.A.double().numpy()
        A_pruned, B_pruned = prune(A), prune(update.B.double().numpy() * weight)
        sigma = []
        for j in range(r):
            kept = sum(abs(v) for v in A_pruned[j])
            sigma.append(sum(abs(v) for v in A[j]) / kept if kept > 0 else 1.0)
        ordered = sorted(sigma)
        low, high = ordered[min(math.floor(r * (1 - att_ratio) + 1e-9), r - 1)], ordered[-1]
        sigma_hat = [min(max(s, low), high) for s in sigma]
        A_sum += A_pruned
        for j in range(r):
            B_num[:, j] += sigma_hat[j] * B_pruned[:, j]
            sigma_sum[j] += sigma_hat[j]
    return fuse_weight * A_sum, fuse_weight * B_num / sigma_sum


def test_copa_matches_a_loop_reference():
    updates = [random_lowrank(12, 10, 6, seed=s, dtype=torch.float64) for s in range(3)]
    weights = [0.5, 1.5, -0.7]
    params = {"density": 0.3, "att_ratio": 0.4, "fuse_weight": 1.5}
    merged = copa(updates, weights, **params)
    A_ref, B_ref = reference_copa(updates, weights, **params)
    np.testing.assert_allclose(merged.A.numpy(), A_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.B.numpy(), B_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.to_dense().numpy(), B_ref @ A_ref, rtol=1e-10, atol=1e-12)


def test_single_adapter_gives_lambda_times_its_pruned_factors():
    x = random_lowrank(12, 10, 4, seed=1, dtype=torch.float64)
    merged = copa([x], fuse_weight=2.0)
    torch.testing.assert_close(merged.A, 2.0 * magnitude_prune(x.A, 0.2))
    torch.testing.assert_close(merged.B, 2.0 * magnitude_prune(x.B, 0.2))


def test_density_one_sums_A_and_averages_B():
    updates = [random_lowrank(12, 10, 4, seed=s, dtype=torch.float64) for s in range(3)]
    merged = copa(updates, density=1.0, fuse_weight=2.0)
    torch.testing.assert_close(merged.A, 2.0 * sum(u.A for u in updates))
    torch.testing.assert_close(merged.B, 2.0 * sum(u.B for u in updates) / 3)


def test_task_order_does_not_matter():
    updates = [random_lowrank(12, 10, 4, seed=s, dtype=torch.float64) for s in range(3)]
    forward, backward = copa(updates, [0.2, 0.5, 1.0]), copa(updates[::-1], [1.0, 0.5, 0.2])
    torch.testing.assert_close(forward.A, backward.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(forward.B, backward.B, rtol=1e-12, atol=1e-14)


def test_scales_are_at_least_one_and_clamped_at_the_quantile():
    A = random_lowrank(8, 40, 10, seed=3, dtype=torch.float64).A
    sigma, sigma_hat = complementary_scales(A, magnitude_prune(A, 0.2), att_ratio=0.2)
    assert (sigma >= 1).all()
    assert sigma_hat.min() == sigma.sort().values[math.floor(10 * 0.8)]
    assert sigma_hat.max() == sigma.max()


def test_fraction_kept_is_the_density():
    x = torch.randn(64, 32, dtype=torch.float64)
    for density in (0.1, 0.2, 0.5):
        kept = (magnitude_prune(x, density) != 0).double().mean().item()
        assert abs(kept - density) <= 2 / x.numel()  # the floor, and the threshold entry itself is kept


def test_unequal_ranks_are_refused():
    with pytest.raises(IncompatibleAdaptersError, match="all ranks must be equal"):
        copa([random_lowrank(8, 8, 2, seed=0), random_lowrank(8, 8, 4, seed=1)])


def test_out_of_range_density_is_refused():
    with pytest.raises(InvalidParameterError, match="density"):
        METHOD.make_params({"density": 0.0})


def test_fully_pruned_row_gets_scale_one():
    A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sigma, _ = complementary_scales(A, magnitude_prune(A, 0.5), att_ratio=0.0)
    assert sigma.tolist() == [1.0, 1.0]
    merged = copa([LowRank(A, torch.ones(3, 2, dtype=torch.float64))], density=0.5)
    assert torch.isfinite(merged.B).all()


def test_merge_adapters_runs_copa_per_module_with_weights():
    shapes = {"q_proj": (16, 12), "v_proj": (16, 12)}
    adapters = [make_adapter(shapes, rank=4, seed=s, name=f"a{s}") for s in range(2)]
    merged = merge_adapters(adapters, [0.6, 0.4], method="copa", density=0.5)
    for name in shapes:
        direct = copa([a[name] for a in adapters], [0.6, 0.4], density=0.5)
        torch.testing.assert_close(merged[name].to_dense(), direct.to_dense())
