"""Measured on digits (benchmarks/bench_training.py): do OSRM / orthogonal adaptation interfere less when summed?

The experiment is the benchmark's, at one seed and fewer steps. What holds on this setup is asserted; the hoped-for
direction (less cross-task output change and higher merged accuracy than plain training) did NOT hold in the
measurements taken for issue 6 (see the benchmark table in the issue note), so that check is an expected failure
that records the numbers rather than a tuned setup that would pass.
"""

import warnings

import pytest
import torch

from adaptermerge import AdapterMergeWarning
from benchmarks.bench_training import run


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdapterMergeWarning)
            return run([0], steps=150)
    finally:
        torch.set_num_threads(threads)


def test_every_method_trains_adapters_that_solve_their_task(results):
    for method, metrics in results.items():
        assert metrics["individual"][0] > metrics["base"][0] + 0.3, method


@pytest.mark.xfail(
    reason="measured: OSRM/orthogonal did not reduce interference on the digits canvas tasks", strict=False
)
def test_osrm_and_orthogonal_interfere_less_than_plain_training(results):
    plain = results["plain"]
    for method in ("osrm-mean", "osrm-covariance", "orthogonal"):
        assert results[method]["interference"][0] < 0.9 * plain["interference"][0], method
        assert results[method]["merged"][0] > plain["merged"][0] + 0.02, method
