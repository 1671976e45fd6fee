"""LoRA-LEGO: rank-1 units clustered with k-means, centroids as the merged adapter, dual reweighting."""

import math

import pytest
import torch

from adaptermerge import merge_adapters
from adaptermerge.errors import InvalidParameterError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods import get_method
from adaptermerge.methods.lora_lego import rank_one_units
from tests.factories import make_adapter, random_lowrank

METHOD = get_method("lora_lego")


def lego(updates, weights=None, **params):
    return METHOD.fn(updates, weights or [1.0] * len(updates), METHOD.make_params(params))


def close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_one_adapter_merged_with_itself_returns_it():
    x = random_lowrank(16, 12, 4, seed=1, dtype=torch.float64)
    merged = lego([x, x])
    assert merged.rank == 4
    close(merged.to_dense(), x.to_dense())
    close(lego([x]).to_dense(), x.to_dense())


def test_rank_equal_to_total_rank_is_the_exact_weighted_sum_without_output_reweighting():
    x = random_lowrank(16, 12, 3, seed=1, dtype=torch.float64)
    y = random_lowrank(16, 12, 5, seed=2, dtype=torch.float64)
    weights = [0.7, -0.4]
    expected = 0.7 * x.to_dense() - 0.4 * y.to_dense()
    exact = lego([x, y], weights, rank=8, output_reweighting=False)
    assert exact.rank == 8
    close(exact.to_dense(), expected)
    # With the paper's output reweighting on, the sum is scaled by sqrt(r_max / k).
    close(lego([x, y], weights, rank=8).to_dense(), math.sqrt(5 / 8) * expected)


def test_seed_reproduces_the_merge():
    updates = [random_lowrank(16, 12, 4, seed=s, dtype=torch.float64) for s in range(3)]
    first, second = lego(updates, rank=4, seed=3), lego(updates, rank=4, seed=3)
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)
    assert first.rank == 4


def test_rank_above_total_rank_raises():
    updates = [random_lowrank(8, 8, 2, seed=s) for s in range(2)]
    with pytest.raises(InvalidParameterError, match="exceeds the 4 rank-1 units"):
        lego(updates, rank=5)


def test_sign_and_scale_of_a_unit_do_not_change_the_merge():
    x = random_lowrank(16, 12, 4, seed=1, dtype=torch.float64)
    y = random_lowrank(16, 12, 4, seed=2, dtype=torch.float64)
    gauge = torch.tensor([-1.0, 3.0, -0.25, 1.0], dtype=torch.float64)
    y_regauged = LowRank(y.A * gauge[:, None], y.B / gauge)
    close(y_regauged.to_dense(), y.to_dense())
    close(lego([x, y], rank=3).to_dense(), lego([x, y_regauged], rank=3).to_dense())


def lego_inputs():
    updates = [random_lowrank(16, 12, r, seed=10 + r, dtype=torch.float64) for r in (4, 6, 3)]
    return updates, [0.8, 1.0, -0.6]


def test_permuting_one_adapters_ranks_does_not_change_the_merge():
    """The MSUs are a set: reordering an adapter's ranks (same ΔW) leaves the pool and so the merge unchanged."""
    updates, weights = lego_inputs()
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    permuted = [updates[0], LowRank(updates[1].A[order], updates[1].B[:, order]), updates[2]]
    for k in (3, 6, 9):
        close(lego(permuted, weights, rank=k).to_dense(), lego(updates, weights, rank=k).to_dense())


def test_adapter_order_does_not_change_the_merge():
    updates, weights = lego_inputs()
    for k in (3, 6, 9):
        reordered = lego(updates[::-1], weights[::-1], rank=k)
        close(reordered.to_dense(), lego(updates, weights, rank=k).to_dense())


def test_rescaled_factors_do_not_change_the_merge():
    """`(c B, A / c)` is the same adapter; the balanced units, and so the clustering, do not see `c`."""
    updates, weights = lego_inputs()
    rescaled = [LowRank(updates[0].A / 7.0, updates[0].B * 7.0), *updates[1:]]
    for k in (3, 6):
        close(lego(rescaled, weights, rank=k).to_dense(), lego(updates, weights, rank=k).to_dense())


def test_units_are_balanced_and_sign_canonical():
    x = random_lowrank(10, 6, 3, seed=4, dtype=torch.float64)
    a, b, features = rank_one_units([x], [-2.0])
    close(a.norm(dim=1), b.norm(dim=1))
    pivot = a.abs().argmax(dim=1)
    assert (a[torch.arange(3), pivot] > 0).all()
    close(b.T @ a, -2.0 * x.to_dense())
    close(features.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_parameter_reweighting_restores_the_members_mean_norm():
    # Two units in one cluster (k = 1): averaging shrinks the centroid; reweighting restores the mean norms.
    a = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = LowRank(a, b)
    units_a, units_b, _ = rank_one_units([x], [1.0])
    reweighted = lego([x], rank=1, output_reweighting=False)
    plain = lego([x], rank=1, output_reweighting=False, param_reweighting=False)
    close(reweighted.A.norm(), units_a.norm(dim=1).mean())
    close(reweighted.B.norm(), units_b.norm(dim=1).mean())
    close(plain.A[0], units_a.mean(dim=0))
    assert plain.A.norm() < reweighted.A.norm()
    # Output reweighting with k = 1 < r_max = 2 scales the update by sqrt(2).
    close(lego([x], rank=1).to_dense(), math.sqrt(2) * reweighted.to_dense())


def test_unequal_ranks_default_to_the_largest_rank():
    updates = [random_lowrank(16, 12, r, seed=r, dtype=torch.float64) for r in (2, 6, 4)]
    assert lego(updates).rank == 6


def test_zero_units_are_dropped():
    x = random_lowrank(8, 8, 3, seed=1, dtype=torch.float64)
    padded = LowRank(torch.cat([x.A, torch.randn(2, 8, dtype=torch.float64)]), torch.cat([x.B, torch.zeros(8, 2)], 1))
    merged = lego([padded], rank=5, output_reweighting=False)
    assert merged.rank == 3
    close(merged.to_dense(), x.to_dense())


def test_merge_adapters_passes_rank_and_seed_to_lora_lego():
    shapes = {"q_proj": (16, 12), "v_proj": (16, 12)}
    adapters = [make_adapter(shapes, rank=4, seed=s, name=f"a{s}") for s in range(2)]
    merged = merge_adapters(adapters, method="lora_lego", rank=3, seed=1)
    for name in shapes:
        direct = lego([a[name] for a in adapters], rank=3, seed=1)
        assert merged[name].rank == 3
        torch.testing.assert_close(merged[name].to_dense(), direct.to_dense())
