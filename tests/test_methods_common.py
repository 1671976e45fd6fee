"""One suite run against every registered merge method, through `merge_adapters`.

Properties every method must have: output modules are the union of the inputs' with their shapes, ranks bounded by
the stacked rank and by `rank=`, repeated runs (same seed) give identical results, the input dtype is kept, modules
missing from some adapters are merged from the others, unknown parameters are refused. Methods that do not return
an `Adapter` (a reversible bundle) are skipped by the adapter-shaped checks.

"One adapter at weight 1 returns itself" holds only where the method declares it below, with the parameters that
make it hold and why; a method registered later without a declaration is skipped there, not failed.
"""

from __future__ import annotations

import pytest
import torch

from adaptermerge import Adapter, get_method, list_methods, merge_adapters
from adaptermerge.errors import InvalidParameterError
from tests.factories import TOLERANCES, make_adapter

METHODS = [method.name for method in list_methods()]

IDENTITY = {
    "linear": ({}, "the exact weighted sum of one update is the update"),
    "svd": ({}, "the rank defaults to the input rank, so the truncation of one update keeps all of it"),
    "tsv": ({}, "one task's singular vectors are already orthonormal, so the polar step changes nothing"),
    "ties": ({"density": 1.0}, "nothing is trimmed and a lone task always agrees with its own sign"),
    "magnitude_prune": ({"density": 1.0}, "nothing is pruned"),
    "dare_linear": ({"density": 1.0}, "nothing is dropped, the rescale is 1"),
    "dare_ties": (
        {"density": 1.0, "trim_density": 1.0},
        "nothing is dropped or trimmed and a lone task agrees with its own sign",
    ),
    "knots": ({"density": 1.0}, "the alignment is exact and TIES at full density returns a lone task"),
    "star": ({"eta": 100}, "every singular value is kept, so the rescale is 1"),
    "np_lora": ({}, "a lone adapter has no style to be projected against"),
}
NOT_IDENTITY = {
    "iso_c": "it replaces the singular values by their mean",
    "iso_cts": "it replaces the singular values by their mean",
}
GLOBAL_MASK = {"knots": "its top-k is one per task over all of the task's modules, so the others' entries count"}
EQUAL_RANKS_ONLY = {"copa": "it pairs rank j of every adapter with rank j of the others"}
PAIRS_ONLY = {"np_lora": "it fuses one subject and one style adapter, in that order"}

SHAPES = {"q": (12, 10), "v": (12, 10), "o": (10, 12)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: OpenMP threads only add waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapters(method: str, dtype=torch.float32):
    """Three adapters over partly shared modules (two for methods that fuse a pair: the first and the third), with
    mixed ranks unless `method` needs equal ones."""
    mixed = method not in EQUAL_RANKS_ONLY
    first = make_adapter(SHAPES, {"q": 2, "v": 3 if mixed else 2, "o": 2}, seed=1, dtype=dtype, name="first")
    second_ranks = {"q": 4, "v": 1} if mixed else 2
    second = make_adapter({"q": (12, 10), "v": (12, 10)}, second_ranks, seed=2, dtype=dtype, name="second")
    third = make_adapter({"v": (12, 10), "k": (6, 10)}, 2, seed=3, dtype=dtype, name="third")
    return [first, third] if method in PAIRS_ONLY else [first, second, third]


def merged_adapter(inputs, weights, *args, **kwargs) -> Adapter:
    """`merge_adapters(inputs, weights[:len(inputs)], ...)`, skipping methods that do not return an Adapter."""
    result = merge_adapters(inputs, weights[: len(inputs)], *args, **kwargs)
    if not isinstance(result, Adapter):
        pytest.skip(f"method returns a {type(result).__name__}, not an Adapter")
    return result


def stacked_rank(inputs, module: str) -> int:
    return sum(a[module].rank for a in inputs if module in a)


@pytest.mark.parametrize("method", METHODS)
def test_output_has_every_module_with_its_shape_and_a_bounded_rank(method):
    inputs = adapters(method)
    merged = merged_adapter(inputs, [0.6, 0.9, -0.4], method)
    assert set(merged) == {"q", "v", "o", "k"}
    for module, update in merged.items():
        source = next(a[module] for a in inputs if module in a)
        assert update.shape == source.shape
        assert update.kernel_size == source.kernel_size
        assert 1 <= update.rank <= stacked_rank(inputs, module)
        assert torch.isfinite(update.to_dense()).all()


@pytest.mark.parametrize("method", METHODS)
def test_rank_argument_bounds_the_output_rank(method):
    merged = merged_adapter(adapters(method), [1.0, 1.0, 1.0], method, rank=2)
    assert all(update.rank <= 2 for update in merged.values())


@pytest.mark.parametrize("method", METHODS)
def test_one_adapter_at_weight_one_returns_itself(method):
    if method not in IDENTITY:
        pytest.skip(NOT_IDENTITY.get(method, "not declared to return a lone adapter unchanged"))
    params, _why = IDENTITY[method]
    single = make_adapter(SHAPES, {"q": 2, "v": 3, "o": 4}, seed=5, dtype=torch.float64)
    merged = merged_adapter([single], [1.0], method, **params)
    for module, update in single.items():
        torch.testing.assert_close(
            merged[module].to_dense(), update.to_dense(), rtol=0, atol=TOLERANCES[torch.float64]
        )


@pytest.mark.parametrize("method", METHODS)
def test_repeated_merges_are_identical(method):
    params = {"seed": 5} if "seed" in get_method(method).param_names else {}
    first = merged_adapter(adapters(method), [0.5, 1.0, 0.7], method, **params)
    second = merged_adapter(adapters(method), [0.5, 1.0, 0.7], method, **params)
    for module in first:
        assert torch.equal(first[module].to_dense(), second[module].to_dense()), module


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_is_kept(method, dtype):
    merged = merged_adapter(adapters(method, dtype), [1.0, 0.5, 0.5], method)
    for update in merged.values():
        assert update.A.dtype == dtype and update.B.dtype == dtype


@pytest.mark.parametrize("method", METHODS)
def test_module_of_one_adapter_is_merged_from_that_adapter_alone(method):
    if method in GLOBAL_MASK:
        pytest.skip(GLOBAL_MASK[method])
    inputs = adapters(method, torch.float64)
    merged = merged_adapter(inputs, [1.0, 1.0, 1.0], method)
    alone = merged_adapter([inputs[-1]], [1.0], method)
    torch.testing.assert_close(merged["k"].to_dense(), alone["k"].to_dense(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter_is_refused(method):
    with pytest.raises(InvalidParameterError, match="not_a_parameter"):
        merge_adapters(adapters(method), method=method, not_a_parameter=1)
