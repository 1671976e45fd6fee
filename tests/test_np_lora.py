"""NP-LoRA against a dense reference written from the paper's description (arXiv 2511.11051): the SVD of the dense
style update, its top right (or left) singular vectors, the dense subject update multiplied by the soft projector."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge import merge_adapters
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.np_lora import NpLoraParams, np_lora
from tests.factories import make_adapter, random_lowrank

F64 = torch.float64


def dense_np_lora(subject, style, w_c, w_s, mu, directions=None, side="input"):
    """`w_c ΔW_c (I − μ V_k V_kᵀ) + w_s ΔW_s` (or `(I − μ U_k U_kᵀ)` on the left) from dense matrices."""
    content, styled = subject.to_dense(), style.to_dense()
    U, S, Vh = torch.linalg.svd(styled, full_matrices=False)
    rank = int((S > S[0] * 1e-10).sum())
    k = rank if directions is None else min(directions, rank)
    if side == "input":
        V = Vh[:k].T
        projected = content @ (torch.eye(V.shape[0], dtype=F64) - mu * V @ V.T)
    else:
        U = U[:, :k]
        projected = (torch.eye(U.shape[0], dtype=F64) - mu * U @ U.T) @ content
    return w_c * projected + w_s * styled


def fuse(subject, style, w_c=1.0, w_s=1.0, **params):
    return np_lora([subject, style], [w_c, w_s], NpLoraParams(**params))


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(3, 14),
    in_features=st.integers(3, 14),
    r_c=st.integers(1, 5),
    r_s=st.integers(1, 5),
    mu=st.floats(0.0, 1.0),
    directions=st.one_of(st.none(), st.integers(1, 6)),
    side=st.sampled_from(["input", "output"]),
    w_c=st.floats(-2.0, 2.0),
    w_s=st.floats(-2.0, 2.0),
    seed=st.integers(0, 1000),
)
def test_np_lora_matches_dense_reference(out_features, in_features, r_c, r_s, mu, directions, side, w_c, w_s, seed):
    subject = random_lowrank(out_features, in_features, r_c, seed=seed, dtype=F64)
    style = random_lowrank(out_features, in_features, r_s, seed=seed + 1, dtype=F64)
    fused = fuse(subject, style, w_c, w_s, mu=mu, directions=directions, side=side)
    expected = dense_np_lora(subject, style, w_c, w_s, mu, directions, side)
    assert fused.rank == r_c + r_s
    torch.testing.assert_close(fused.to_dense(), expected, rtol=0, atol=1e-9 * (1 + expected.abs().max()))


@pytest.mark.parametrize("side", ["input", "output"])
def test_mu_zero_is_the_plain_sum_and_mu_one_removes_the_style_directions(side):
    subject, style = random_lowrank(20, 16, 4, seed=1, dtype=F64), random_lowrank(20, 16, 3, seed=2, dtype=F64)
    plain = fuse(subject, style, 0.7, 1.3, mu=0.0, side=side)
    torch.testing.assert_close(plain.to_dense(), 0.7 * subject.to_dense() + 1.3 * style.to_dense())
    hard = fuse(subject, style, 0.7, 1.3, mu=1.0, side=side).to_dense() - 1.3 * style.to_dense()
    U, _, Vh = torch.linalg.svd(style.to_dense(), full_matrices=False)
    leak = hard @ Vh[:3].T if side == "input" else U[:, :3].T @ hard
    assert leak.abs().max() < 1e-12
    assert hard.abs().max() > 0.1  # the subject keeps what lies outside the style's directions


@pytest.mark.parametrize("side", ["input", "output"])
def test_leak_into_style_directions_falls_monotonically_with_mu(side):
    subject, style = random_lowrank(12, 18, 5, seed=3, dtype=F64), random_lowrank(12, 18, 2, seed=4, dtype=F64)
    U, _, Vh = torch.linalg.svd(style.to_dense(), full_matrices=False)
    leaks = []
    for mu in torch.linspace(0, 1, 11).tolist():
        projected = fuse(subject, style, mu=mu, side=side).to_dense() - style.to_dense()
        leaks.append(float((projected @ Vh[:2].T if side == "input" else U[:, :2].T @ projected).norm()))
    assert all(b < a for a, b in zip(leaks, leaks[1:])) and leaks[-1] < 1e-12
    # The soft projector shrinks the style component by exactly (1 − μ).
    assert leaks[5] == pytest.approx(0.5 * leaks[0], rel=1e-9)


@pytest.mark.parametrize("side", ["input", "output"])
def test_result_depends_only_on_the_subjects_update_not_its_factor_gauge(side):
    subject, style = random_lowrank(10, 9, 3, seed=5, dtype=F64), random_lowrank(10, 9, 2, seed=6, dtype=F64)
    G = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64) + 3 * torch.eye(3, dtype=F64)
    regauged = LowRank(torch.linalg.solve(G, subject.A), subject.B @ G)
    torch.testing.assert_close(
        fuse(regauged, style, mu=0.6, side=side).to_dense(), fuse(subject, style, mu=0.6, side=side).to_dense()
    )


def test_fewer_directions_keep_more_of_the_subject_and_a_zero_style_changes_nothing():
    subject, style = random_lowrank(16, 16, 4, seed=7, dtype=F64), random_lowrank(16, 16, 4, seed=8, dtype=F64)
    kept = [(fuse(subject, style, mu=1.0, directions=k).to_dense() - style.to_dense()).norm() for k in (1, 2, 4)]
    assert kept[0] > kept[1] > kept[2]
    zero = LowRank(torch.zeros(2, 16, dtype=F64), torch.zeros(16, 2, dtype=F64))
    torch.testing.assert_close(fuse(subject, zero, mu=1.0).to_dense(), subject.to_dense())


def test_merge_adapters_takes_subject_then_style_and_refuses_a_third():
    shapes = {"q": (12, 10), "v": (8, 10)}
    subject, style = make_adapter(shapes, 3, seed=1), make_adapter(shapes, 2, seed=2)
    merged = merge_adapters([subject, style], [1.0, 0.8], "np_lora", mu=0.5)
    for module in shapes:
        expected = dense_np_lora(subject[module], style[module], 1.0, 0.8, 0.5)
        torch.testing.assert_close(merged[module].to_dense(), expected, rtol=0, atol=1e-5)
    with pytest.raises(IncompatibleAdaptersError, match="subject and one style"):
        merge_adapters([subject, style, make_adapter(shapes, 2, seed=3)], method="np_lora")
    with pytest.raises(InvalidParameterError, match="mu"):
        merge_adapters([subject, style], method="np_lora", mu=1.5)
    with pytest.raises(InvalidParameterError, match="side"):
        merge_adapters([subject, style], method="np_lora", side="left")


def test_cli_merges_subject_then_style(tmp_path):
    from click.testing import CliRunner

    from adaptermerge import load_adapter, save_adapter
    from adaptermerge.cli import main

    shapes = {"unet.down_blocks.0.attn1.to_q": (12, 10)}
    paths = [
        save_adapter(make_adapter(shapes, r, seed=s), tmp_path / f"a{s}", format="peft") for s, r in ((1, 3), (2, 2))
    ]
    out = tmp_path / "fused"
    args = ["-q", "merge", *map(str, paths), "--method", "np_lora", "--mu", "0.5", "--side", "output", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    subject, style = (load_adapter(p) for p in paths)
    module = next(iter(shapes))
    expected = dense_np_lora(subject[module], style[module], 1.0, 1.0, 0.5, side="output")
    torch.testing.assert_close(load_adapter(out)[module].to_dense(), expected, rtol=0, atol=1e-5)
    bad = CliRunner().invoke(
        main, ["-q", "merge", *map(str, paths), "--method", "np_lora", "--mu", "2", "-o", str(out)]
    )
    assert bad.exit_code == 2 and "mu" in bad.output
