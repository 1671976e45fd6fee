"""LyCORIS LoHa and LoKr read as exact low-rank updates: equal to the lycoris-lora package's own ΔW (when installed)
and to dense references written from LyCORIS' documented formulas, for linear and conv modules, with and without
Tucker cores; then merged and written as plain LoRAs."""

from __future__ import annotations

import math

import pytest
import torch

from adaptermerge import merge_adapters
from adaptermerge.errors import AdapterMergeWarning
from adaptermerge.io import kohya, load_adapter, save_adapter

MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
NAME = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV_NAME = "unet.down_blocks.0.resnets.0.conv1"


_GENERATOR = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=_GENERATOR, dtype=torch.float64)


def loha_tensors(out, inn, rank, kernel=None, alpha=2.0):
    """LoHa factors as LyCORIS stores them: linear `w_a (out, r)`, `w_b (r, in)`; Tucker conv `w_a (r, out)`,
    `w_b (r, in)`, `t (r, r, kh, kw)`."""
    if kernel:
        tensors = {f"hada_w{h}_a": randn(rank, out) for h in "12"} | {f"hada_w{h}_b": randn(rank, inn) for h in "12"}
        tensors |= {f"hada_t{h}": randn(rank, rank, *kernel) for h in "12"}
    else:
        tensors = {f"hada_w{h}_a": randn(out, rank) for h in "12"} | {f"hada_w{h}_b": randn(rank, inn) for h in "12"}
    return tensors | {"alpha": torch.tensor(alpha, dtype=torch.float64)}


def loha_reference(t, kernel=None):
    """ΔW = alpha / r · (W1 ⊙ W2), each half `w_a @ w_b`, or for Tucker `Σ_ij t[i, j] w_a[i, p] w_b[j, c]`."""
    scale = float(t["alpha"]) / t["hada_w1_b"].shape[0]
    halves = []
    for h in "12":
        if kernel:
            halves.append(torch.einsum("ijhw,ip,jc->pchw", t[f"hada_t{h}"], t[f"hada_w{h}_a"], t[f"hada_w{h}_b"]))
        else:
            halves.append(t[f"hada_w{h}_a"] @ t[f"hada_w{h}_b"])
    return scale * (halves[0] * halves[1])


def lokr_tensors(a, b, c, d, rank, *, w1_full, w2_kind, kernel=None, alpha=3.0):
    """LoKr factors: `w1 (a, c)` or `w1_a (a, r)`, `w1_b (r, c)`; `w2 (b, d[, kh, kw])`, `w2_a (b, r)`,
    `w2_b (r, d·kh·kw)`, or Tucker `w2_a (r, b)`, `w2_b (r, d)`, `t2 (r, r, kh, kw)`."""
    kk = math.prod(kernel or ())
    t = {"lokr_w1": randn(a, c)} if w1_full else {"lokr_w1_a": randn(a, rank), "lokr_w1_b": randn(rank, c)}
    if w2_kind == "full":
        t["lokr_w2"] = randn(b, d, *(kernel or ()))
    elif w2_kind == "tucker":
        t |= {"lokr_w2_a": randn(rank, b), "lokr_w2_b": randn(rank, d), "lokr_t2": randn(rank, rank, *kernel)}
    else:
        t |= {"lokr_w2_a": randn(b, rank), "lokr_w2_b": randn(rank, d * kk)}
    return t | {"alpha": torch.tensor(alpha, dtype=torch.float64)}


def lokr_reference(t, kernel=None):
    """ΔW = s · kron(W1, W2), `s = alpha / r` when a half is factored (1 when both are full)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("ijhw,ip,jc->pchw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if kernel:
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
    factored = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
    scale = float(t["alpha"]) / factored if factored else 1.0
    if w2.ndim > 2:
        w1 = w1[:, :, None, None]
    return scale * torch.kron(w1, w2.contiguous())


def read(tensors, module=MODULE):
    adapter = kohya.from_state_dict({f"{module}.{role}": value for role, value in tensors.items()})
    return adapter[next(iter(adapter))]


CASES = [
    ("loha linear", lambda: loha_tensors(12, 10, 3), None),
    ("loha conv tucker", lambda: loha_tensors(6, 5, 2, kernel=(3, 3)), (3, 3)),
    ("lokr factored", lambda: lokr_tensors(2, 3, 5, 4, 2, w1_full=False, w2_kind="factored"), None),
    ("lokr full w1", lambda: lokr_tensors(4, 3, 2, 5, 2, w1_full=True, w2_kind="factored"), None),
    ("lokr full both", lambda: lokr_tensors(2, 3, 4, 2, 1, w1_full=True, w2_kind="full"), None),
    ("lokr conv tucker", lambda: lokr_tensors(2, 3, 2, 4, 2, w1_full=True, w2_kind="tucker", kernel=(3, 3)), (3, 3)),
    ("lokr conv full w2", lambda: lokr_tensors(2, 3, 2, 2, 1, w1_full=False, w2_kind="full", kernel=(3, 3)), (3, 3)),
]


@pytest.mark.filterwarnings("ignore::adaptermerge.errors.AdapterMergeWarning")  # tiny dims: ranks near full
@pytest.mark.parametrize(("case", "make", "kernel"), CASES, ids=[c[0] for c in CASES])
def test_lycoris_modules_are_exact_low_rank_updates(case, make, kernel):
    tensors = make()
    reference = (loha_reference if case.startswith("loha") else lokr_reference)(tensors, kernel)
    lowrank = read(tensors)
    assert lowrank.kernel_size == (kernel or ())
    torch.testing.assert_close(lowrank.to_dense(), reference.reshape(reference.shape[0], -1))
    if case.startswith("loha"):
        assert lowrank.rank == tensors["hada_w1_b"].shape[0] * tensors["hada_w2_b"].shape[0]


@pytest.mark.filterwarnings("ignore::adaptermerge.errors.AdapterMergeWarning")
@pytest.mark.parametrize(("case", "make", "kernel"), CASES, ids=[c[0] for c in CASES])
def test_lycoris_modules_equal_the_lycoris_package_own_delta(case, make, kernel):
    functional = pytest.importorskip("lycoris.functional", reason="lycoris-lora is not installed")
    tensors = make()
    alpha = float(tensors["alpha"])
    if case.startswith("loha"):
        t = tensors
        scale = alpha / t["hada_w1_b"].shape[0]
        if kernel:  # the package's Tucker form takes w_d (r, in), w_u (r, out), t (r, r, kh, kw)
            theirs = functional.loha.diff_weight(
                t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"], t["hada_t2"], gamma=scale
            )
        else:
            theirs = functional.loha.diff_weight(
                t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None, gamma=scale
            )
    else:
        t = {
            k: tensors.get(k)
            for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        }
        factored = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if t[k] is not None), None)
        scale = alpha / factored if factored else 1.0
        w2b = t["lokr_w2_b"]
        if kernel and t["lokr_t2"] is None and w2b is not None:  # the package reshapes a conv w2_b to (r, d, kh, kw)
            w2b = w2b.reshape(w2b.shape[0], -1, *kernel)
        weights = (t["lokr_w1"], t["lokr_w1_a"], t["lokr_w1_b"], t["lokr_w2"], t["lokr_w2_a"], w2b, t["lokr_t2"])
        theirs = functional.lokr.kron_weight(*weights, scale=scale)
        if t["lokr_t2"] is None:
            # The package's own scale convention (alpha over the rank of w1_a or w2_a) agrees; for a Tucker w2 it
            # divides by w2_a's second side (b, not r), where LyCORIS' module, ComfyUI and A1111 divide by r.
            own = functional.lokr.diff_weight(*weights, gamma=alpha)
            torch.testing.assert_close(own, theirs)
    ours = read(tensors).to_dense()
    torch.testing.assert_close(ours, theirs.reshape(theirs.shape[0], -1).to(torch.float64))


def test_a_full_matrix_lokr_warns_that_its_exact_rank_is_large_and_a_small_loha_does_not():
    import warnings

    with pytest.warns(AdapterMergeWarning, match=r"exact rank 64 for a 64×64 update.*--rank"):
        read(lokr_tensors(4, 16, 4, 16, 2, w1_full=True, w2_kind="full"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMergeWarning)
        read(loha_tensors(64, 64, 4))


@pytest.mark.filterwarnings("ignore::adaptermerge.errors.AdapterMergeWarning")
def test_loha_files_merge_exactly_and_are_written_as_plain_loras(tmp_path):
    from safetensors.torch import save_file

    paths, references = [], []
    for seed in range(2):
        tensors = {f"{MODULE}.{k}": v.float() for k, v in loha_tensors(12, 10, 2 + seed).items()}
        tensors |= {f"{CONV}.{k}": v.float() for k, v in loha_tensors(6, 5, 2, kernel=(3, 3)).items()}
        paths.append(tmp_path / f"loha{seed}.safetensors")
        save_file(tensors, paths[-1])
        references.append(load_adapter(paths[-1]))
    merged = merge_adapters(paths, [0.5, 1.5])
    assert merged[NAME].rank == 4 + 9 and merged[CONV_NAME].kernel_size == (3, 3)
    out = save_adapter(merged, tmp_path / "merged.safetensors", format="kohya")
    written = load_adapter(out)
    for name in (NAME, CONV_NAME):
        expected = 0.5 * references[0][name].to_dense() + 1.5 * references[1][name].to_dense()
        torch.testing.assert_close(written[name].to_dense(), expected, rtol=1e-5, atol=1e-5)
