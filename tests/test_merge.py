"""merge_adapters on in-memory and on-disk adapters: exact sums, weights, ranks, alignment of modules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge import load_adapter, merge_adapters, save_adapter
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError, UnknownMethodError
from tests.factories import TOLERANCES, dense, make_adapter

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.up_proj": (40, 16), "layers.1.q_proj": (24, 16)}


def weighted_dense_sum(adapters, weights):
    total = {}
    for adapter, w in zip(adapters, weights):
        for name, delta in dense(adapter).items():
            total[name] = total.get(name, 0) + w * delta
    return total


def test_linear_merge_equals_weighted_sum_with_mixed_ranks():
    a = make_adapter(SHAPES, rank=4, seed=1, name="a")
    b = make_adapter(SHAPES, rank={"layers.0.q_proj": 2, "layers.0.up_proj": 8, "layers.1.q_proj": 3}, seed=2)
    merged = merge_adapters([a, b], [0.7, -0.3])
    expected = weighted_dense_sum([a, b], [0.7, -0.3])
    for name, delta in dense(merged).items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=TOLERANCES[torch.float32])
    assert merged["layers.0.up_proj"].rank == 12


def test_module_missing_from_one_adapter_contributes_nothing_from_it():
    a = make_adapter(SHAPES, seed=1, name="a")
    b = make_adapter({"layers.0.q_proj": (24, 16), "layers.2.v_proj": (8, 16)}, seed=2, name="b")
    merged = merge_adapters([a, b], [1.0, 2.0])
    assert set(merged) == set(SHAPES) | {"layers.2.v_proj"}
    torch.testing.assert_close(merged["layers.0.up_proj"].to_dense(), a["layers.0.up_proj"].to_dense())
    torch.testing.assert_close(merged["layers.2.v_proj"].to_dense(), 2.0 * b["layers.2.v_proj"].to_dense())


def test_zero_weight_modules_are_left_out():
    a = make_adapter({"model.x": (8, 8)}, seed=1, name="a")
    b = make_adapter({"model.y": (8, 8)}, seed=2, name="b")
    assert set(merge_adapters([a, b], [1.0, 0.0])) == {"model.x"}


def test_rank_truncation_is_the_best_low_rank_approximation():
    adapters = [make_adapter(SHAPES, rank=4, seed=s, name=f"a{s}") for s in range(3)]
    merged = merge_adapters(adapters, rank=5)
    exact = weighted_dense_sum(adapters, [1, 1, 1])
    for name, lr in merged.items():
        assert lr.rank == 5
        s = torch.linalg.svdvals(exact[name])
        error = torch.linalg.matrix_norm(lr.to_dense() - exact[name])
        torch.testing.assert_close(error, s[5:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_merge_through_files_equals_merge_in_memory(tmp_path):
    a = make_adapter(SHAPES, rank=4, seed=1, name="a")
    b = make_adapter(SHAPES, rank=6, seed=2, name="b")
    save_adapter(a, tmp_path / "a", format="peft")
    save_adapter(b, tmp_path / "b", format="peft")
    from_files = merge_adapters([tmp_path / "a", tmp_path / "b"], [0.5, 0.5])
    in_memory = merge_adapters([a, b], [0.5, 0.5])
    for name in in_memory:
        torch.testing.assert_close(from_files[name].to_dense(), in_memory[name].to_dense())
    assert load_adapter(tmp_path / "a").metadata.format == "peft"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_keeps_the_input_dtype(dtype):
    a = make_adapter(SHAPES, seed=1, dtype=dtype)
    merged = merge_adapters([a, a], [0.5, 0.5])
    assert {lr.dtype for lr in merged.values()} == {dtype}
    for name, lr in merged.items():
        torch.testing.assert_close(lr.to_dense(), a[name].to_dense(), rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


def test_mismatched_shapes_name_the_module():
    a = make_adapter({"m": (8, 8)}, name="a")
    b = make_adapter({"m": (8, 6)}, name="b")
    with pytest.raises(IncompatibleAdaptersError, match="'m'"):
        merge_adapters([a, b])


def test_different_base_models_are_refused():
    a = make_adapter({"m": (8, 8)}, name="a", base_model="org/one")
    b = make_adapter({"m": (8, 8)}, name="b", base_model="org/two")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        merge_adapters([a, b])


def test_bad_weights_and_methods_and_params_are_refused():
    a = make_adapter({"m": (8, 8)})
    with pytest.raises(InvalidParameterError, match="2 weights for 1"):
        merge_adapters([a], [1.0, 2.0])
    with pytest.raises(InvalidParameterError, match="finite"):
        merge_adapters([a], [float("nan")])
    with pytest.raises(UnknownMethodError, match="Did you mean 'linear'"):
        merge_adapters([a], method="lienar")
    with pytest.raises(InvalidParameterError, match="does not take"):
        merge_adapters([a], method="linear", densty=0.5)


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
)
def test_linear_merge_is_exact_for_random_shapes_and_ranks(out_features, in_features, ranks, data):
    weights = data.draw(st.lists(st.floats(-3, 3), min_size=len(ranks), max_size=len(ranks)))
    adapters = [
        make_adapter({"m": (out_features, in_features)}, rank=r, seed=i, dtype=torch.float64, name=f"a{i}")
        for i, r in enumerate(ranks)
    ]
    merged = merge_adapters(adapters, weights)
    expected = weighted_dense_sum(adapters, weights)
    if "m" in merged:
        torch.testing.assert_close(merged["m"].to_dense(), expected["m"], rtol=1e-10, atol=1e-10)
    else:
        assert all(w == 0 for w in weights)
