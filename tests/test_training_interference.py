"""Measured on digits (benchmarks/bench_training.py, setting `disjoint`): do OSRM / orthogonal adaptation interfere
less when summed than plainly trained LoRAs?

Three tasks draw the digits in three corners of a 16×16 canvas (disjoint pixels), one LoRA per task on `fc1` of an
MLP pre-trained on the fourth corner, all methods with the same steps and learning rate, merged by a plain sum. Two
seeds, fewer steps than the benchmark. What the measurements support is asserted; where a method did not beat plain
training across seeds, the check is a non-strict expected failure whose reason gives the measured cause.

Setting `concept-tokens` (benchmarks/_concept_tokens.py) is the regime orthogonal adaptation was designed for: new
concept tokens trained together with LoRAs on the cross-attention layers that read them; there it is asserted.
"""

import warnings

import pytest
import torch

from adaptermerge import AdapterMergeWarning
from benchmarks.bench_training import run

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdapterMergeWarning)
            return run(SEEDS, setting="disjoint", steps=150)
    finally:
        torch.set_num_threads(threads)


def test_every_method_trains_adapters_that_solve_their_task(results):
    for method, metrics in results.items():
        for seed, (alone, base) in enumerate(zip(metrics["individual"], metrics["base"])):
            assert alone > base + 0.5, (method, seed)


def test_osrm_covariance_adapters_merge_without_crosstalk_and_beat_plain_training(results):
    plain, osrm = results["plain"], results["osrm-covariance"]
    for seed in range(len(SEEDS)):
        # lora_A starts orthogonal to the other corners' pixels and their gradient never reaches those pixels,
        # so the summed update changes no other task's output: the merge keeps each adapter's own accuracy
        assert osrm["interference"][seed] < 1e-3, seed
        assert osrm["merged"][seed] == pytest.approx(osrm["individual"][seed], abs=1e-6)
        # plain LoRAs keep their random initial lora_A on the other corners (measured 0.13-0.25 over 8 seeds)
        assert plain["interference"][seed] > 0.05, seed
        assert osrm["merged"][seed] > plain["merged"][seed] + 0.01, seed


_MEAN_MEASURED = (
    "measured over 8 seeds: OSRM with the mean statistic lowers the crosstalk only a little (0.12 vs 0.15 for plain, "
    "not in every seed) and does not raise merged accuracy; each lora_A is orthogonal to the other tasks' mean images "
    "only, while their digits vary around the mean over most pixels"
)
_ORTHOGONAL_MEASURED = (
    "measured over 8 seeds: orthogonal adaptation interferes MORE than plain training (cross-task change 1.2-1.6 "
    "against 0.13-0.25, merged accuracy 0.18-0.31 against 0.78-0.87). Its guarantee covers inputs inside a concept's "
    "own basis block; the frozen random lora_A reads every pixel, so another task's input passes each adapter about "
    "as strongly as its own and the change is about sqrt(T - 1) times the own change"
)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("osrm-mean", marks=pytest.mark.xfail(reason=_MEAN_MEASURED, strict=False)),
        pytest.param("orthogonal", marks=pytest.mark.xfail(reason=_ORTHOGONAL_MEASURED, strict=False)),
    ],
)
def test_method_interferes_less_than_plain_training(results, method):
    plain, trained = results["plain"], results[method]
    for seed in range(len(SEEDS)):
        assert trained["interference"][seed] < 0.9 * plain["interference"][seed], seed
        assert trained["merged"][seed] > plain["merged"][seed] + 0.01, seed


@pytest.fixture(scope="module")
def concept_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(SEEDS, setting="concept-tokens", steps=300, methods=("plain", "orthogonal"))
    finally:
        torch.set_num_threads(threads)


def test_orthogonal_adaptation_keeps_concept_token_merges_apart_where_plain_loras_interfere(concept_results):
    """Setting `concept-tokens`: four new concept tokens, each trained with a rank-4 LoRA on `to_k`/`to_v` of a
    cross-attention detector of width 768, merged by a plain sum and read with each concept's own token.

    The regime orthogonal adaptation was designed for: the gradient that reaches concept `i`'s token through its
    frozen `lora_A` lies in `A_iᵀ`'s span, so the token grows inside its own block of the shared basis, and a random
    block reads the shared context tokens with only about `sqrt(4 / 768)` of their norm, while plain LoRAs learn to
    read them. Measured with the benchmark's 300 steps: on seeds 0 and 1, cross-task change 0.050 / 0.427 and
    0.076 / 0.284 (orthogonal / plain), merged accuracy 0.966 / 0.900 and 0.940 / 0.869; over 8 seeds merged
    accuracy was higher on every seed, by 0.05-0.21, and the cross-task change at most 0.55 of plain's. At 150 steps
    the gap is narrower and merged accuracy is higher only on average (lower on seeds 1 and 3).
    """
    plain, orthogonal = concept_results["plain"], concept_results["orthogonal"]
    for seed in range(len(SEEDS)):
        for metrics in (plain, orthogonal):  # both train alone to about the same accuracy (0.94-0.96)
            assert metrics["individual"][seed] > metrics["base"][seed] + 0.4, seed
        assert orthogonal["interference"][seed] < 0.6 * plain["interference"][seed], seed
        assert orthogonal["merged"][seed] > plain["merged"][seed] + 0.03, seed
