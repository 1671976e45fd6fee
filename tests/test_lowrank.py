"""Every factor-space operation of `adaptermerge.lowrank` against its dense reference, on random shapes and ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge.errors import IncompatibleAdaptersError, InvalidTensorError
from adaptermerge.lowrank import LowRank, concat, cosine, gram, inner, norm, orthonormal_bases, svd, truncate
from tests.factories import random_lowrank

ATOL = 1e-9  # float64 references on float64 factors
EXAMPLES = settings(max_examples=30, deadline=None)

dims = st.integers(1, 24)
ranks = st.integers(1, 8)
seeds = st.integers(0, 2**16)


@st.composite
def same_shape_updates(draw, min_size=1, max_size=4):
    """A list of float64 LowRanks sharing `(out, in)` with independent ranks."""
    out_features, in_features = draw(dims), draw(dims)
    count = draw(st.integers(min_size, max_size))
    seed = draw(seeds)
    return [
        random_lowrank(out_features, in_features, draw(ranks), seed=seed + i, dtype=torch.float64)
        for i in range(count)
    ]


def close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> bool:
    return torch.allclose(a, b, atol=ATOL * max(1.0, scale), rtol=1e-8)


@EXAMPLES
@given(updates=same_shape_updates(), data=st.data())
def test_concat_is_the_exact_weighted_sum(updates, data):
    weights = data.draw(st.lists(st.floats(-3, 3), min_size=len(updates), max_size=len(updates)))
    merged = concat(updates, weights)
    expected = sum(w * u.to_dense() for w, u in zip(weights, updates))
    assert merged.rank == sum(u.rank for u in updates)
    assert close(merged.to_dense(), expected, float(expected.abs().max()))


@EXAMPLES
@given(updates=same_shape_updates(max_size=3))
def test_svd_matches_the_dense_svd(updates):
    update = concat(updates)
    dense = update.to_dense()
    U, S, Vh = svd(update)
    k = min(update.rank, *dense.shape)
    assert U.shape == (dense.shape[0], k) and S.shape == (k,) and Vh.shape == (k, dense.shape[1])
    assert close(U @ torch.diag(S) @ Vh, dense, float(S.max()))
    assert close(S, torch.linalg.svdvals(dense)[:k], float(S.max()))
    assert close(U.T @ U, torch.eye(k, dtype=U.dtype)) and close(Vh @ Vh.T, torch.eye(k, dtype=U.dtype))


@EXAMPLES
@given(updates=same_shape_updates(max_size=3), keep=st.integers(1, 10))
def test_truncate_reaches_the_eckart_young_error(updates, keep):
    update = concat(updates)
    dense = update.to_dense()
    singular = torch.linalg.svdvals(dense)
    truncated = truncate(update, keep)
    assert truncated.rank == min(keep, update.rank, *dense.shape)
    error = torch.linalg.matrix_norm(dense - truncated.to_dense()) ** 2
    expected = (singular[truncated.rank :] ** 2).sum()
    assert torch.isclose(error, expected, atol=1e-8 * float(singular.max()) ** 2, rtol=1e-6)


def test_truncate_rtol_drops_small_singular_values():
    A = torch.eye(3, 5, dtype=torch.float64)
    B = torch.diag(torch.tensor([10.0, 1.0, 1e-3], dtype=torch.float64))
    assert truncate(LowRank(A, B), rtol=1e-2).rank == 2
    assert truncate(LowRank(A, B)).rank == 3


@EXAMPLES
@given(updates=same_shape_updates(min_size=2, max_size=4))
def test_inner_norm_cosine_and_gram_match_dense(updates):
    dense = [u.to_dense() for u in updates]
    expected_gram = torch.stack([torch.stack([(x * y).sum() for y in dense]) for x in dense])
    scale = float(expected_gram.abs().max())
    assert close(gram(updates), expected_gram, scale)
    x, y = updates[0], updates[1]
    assert close(inner(x, y), (dense[0] * dense[1]).sum(), scale)
    assert close(norm(x), torch.linalg.matrix_norm(dense[0]), scale)
    expected_cosine = (dense[0] * dense[1]).sum() / (
        torch.linalg.matrix_norm(dense[0]) * torch.linalg.matrix_norm(dense[1])
    )
    assert close(cosine(x, y), expected_cosine)


def test_cosine_of_a_zero_update_is_zero():
    zero = LowRank(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    assert cosine(zero, random_lowrank(3, 4, 2, dtype=torch.float64)) == 0


@EXAMPLES
@given(updates=same_shape_updates(max_size=4))
def test_orthonormal_bases_are_orthonormal_and_span_every_factor(updates):
    U_B, U_A = orthonormal_bases(updates)
    out_features, in_features = updates[0].shape
    B_cat = torch.cat([u.B for u in updates], dim=1)
    A_stk = torch.cat([u.A for u in updates], dim=0)
    assert U_B.shape == (out_features, torch.linalg.matrix_rank(B_cat))
    assert U_A.shape == (in_features, torch.linalg.matrix_rank(A_stk))
    for basis in (U_B, U_A):
        assert close(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype))
    for u in updates:
        assert close(U_B @ (U_B.T @ u.B), u.B, float(u.B.abs().max()))
        assert close(U_A @ (U_A.T @ u.A.T), u.A.T, float(u.A.abs().max()))
        core = U_B.T @ u.to_dense() @ U_A
        assert close(U_B @ core @ U_A.T, u.to_dense(), float(core.abs().max()))
    # sign convention: the matching right singular vectors (columns of stackᵀ U) have their largest entry positive
    for V in (B_cat.T @ U_B, A_stk @ U_A):
        assert (V[V.abs().argmax(dim=0), torch.arange(V.shape[1])] > 0).all()


@EXAMPLES
@given(
    out_features=dims,
    in_channels=st.integers(1, 6),
    rank=ranks,
    kernel=st.sampled_from([(1, 1), (3, 3), (1, 3)]),
    scale=st.floats(-4, 4),
    seed=seeds,
)
def test_conv_weights_round_trip_and_flatten_the_kernel(out_features, in_channels, rank, kernel, scale, seed):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_channels, *kernel, generator=g, dtype=torch.float64)
    up = torch.randn(out_features, rank, 1, 1, generator=g, dtype=torch.float64)
    lowrank = LowRank.from_weights(down, up, scale)
    assert lowrank.kernel_size == kernel and lowrank.shape == (out_features, in_channels * kernel[0] * kernel[1])
    dense_kernel = torch.einsum("or,rikl->oikl", up[:, :, 0, 0] * scale, down)
    assert close(lowrank.to_dense(), dense_kernel.reshape(out_features, -1), float(dense_kernel.abs().max()))
    back_down, back_up = lowrank.weights()
    assert torch.equal(back_down, down) and close(back_up, up * scale)
    assert LowRank.from_weights(back_down, back_up).kernel_size == kernel


def test_scale_and_dtype_cast_keep_the_update():
    update = random_lowrank(5, 7, 3, dtype=torch.float64)
    assert close(update.scale(-2.5).to_dense(), -2.5 * update.to_dense(), 10.0)
    half = update.to(torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.to_dense(), update.to_dense(), atol=2e-2)


def test_invalid_factors_and_mismatched_updates_are_refused():
    with pytest.raises(InvalidTensorError, match="share the rank"):
        LowRank(torch.zeros(2, 4), torch.zeros(3, 3))
    with pytest.raises(InvalidTensorError, match="2-D"):
        LowRank(torch.zeros(2, 4, 1, 1), torch.zeros(3, 2))
    with pytest.raises(InvalidTensorError, match="1×1 kernel"):
        LowRank.from_weights(torch.zeros(2, 4, 3, 3), torch.zeros(3, 2, 3, 3))
    with pytest.raises(IncompatibleAdaptersError, match="same shape"):
        concat([random_lowrank(3, 4, 2), random_lowrank(4, 3, 2)])
    with pytest.raises(IncompatibleAdaptersError, match="empty"):
        gram([])
    nan = LowRank(torch.full((2, 4), float("nan")), torch.zeros(3, 2))
    with pytest.raises(InvalidTensorError, match="NaN or Inf"):
        nan.check_finite()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concat_stays_in_half_precision_and_rounds_each_weighted_entry_once(dtype):
    updates = [random_lowrank(9, 7, rank, seed=rank).to(dtype) for rank in (2, 3)]
    weights = [0.7, -1.3]
    merged = concat(updates, weights)
    assert merged.dtype == dtype
    in_float32 = concat([u.to(torch.float32) for u in updates], weights)
    assert torch.equal(merged.B, in_float32.B.to(dtype))  # the float32 product, rounded once
    assert torch.equal(merged.A, in_float32.A.to(dtype))
    assert torch.equal(concat(updates).B, torch.cat([u.B for u in updates], dim=1))  # unit weights: a plain copy
