"""OSRM: statistics by hooks, lora_A orthogonal to the other tasks' inputs, save/load, post-hoc projection."""

import warnings

import pytest
import torch
from torch import nn

from adaptermerge import Adapter
from adaptermerge.errors import AdapterMergeWarning, NotFittedError
from adaptermerge.training import OSRM
from tests.factories import random_lowrank


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


def _tasks():
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": [torch.randn(20, 16, generator=g) + i, torch.randn(20, 16, generator=g) + i] for i in range(3)}


def test_mean_statistic_matches_the_mean_layer_input():
    model, tasks = _model(), _tasks()
    osrm = OSRM("mean", target_modules=["0", "2"], max_samples=30).fit(model, tasks)
    X = torch.cat(tasks["t1"])[:30].double()
    torch.testing.assert_close(osrm.statistics_["t1"]["0"], X.mean(0))
    hidden = torch.relu(model[0](X.float())).double()
    torch.testing.assert_close(osrm.statistics_["t1"]["2"], hidden.mean(0), rtol=1e-5, atol=1e-6)
    assert osrm.n_samples_["t1"] == 30


def test_covariance_statistic_is_the_second_moment():
    model, tasks = _model(), _tasks()
    osrm = OSRM("covariance", target_modules=["0"]).fit(model, tasks)
    X = torch.cat(tasks["t0"]).double()
    torch.testing.assert_close(osrm.statistics_["t0"]["0"], X.T @ X / len(X))


@pytest.mark.parametrize("statistic", ["mean", "covariance"])
def test_init_lora_annihilates_other_tasks_and_has_orthonormal_rows(statistic):
    from peft import LoraConfig, get_peft_model

    model, tasks = _model(), _tasks()
    osrm = OSRM(statistic, target_modules=["0"]).fit(model, {k: v for k, v in tasks.items() if k != "t2"})
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterMergeWarning)
        assert osrm.init_lora(peft_model, task="t2") == ["0"]
    layer = peft_model.base_model.model[0]
    A = layer.lora_A["default"].weight.double()
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    if statistic == "mean":
        for task in ("t0", "t1"):
            assert (A @ osrm.statistics_[task]["0"]).abs().max() < 1e-5
    else:  # the smallest-energy directions: no other choice of 4 orthonormal rows has less
        S = osrm.statistics_["t0"]["0"] + osrm.statistics_["t1"]["0"]
        energy = torch.trace(A @ S @ A.T)
        assert energy <= torch.linalg.eigvalsh(S)[:4].sum() + 1e-6


def test_basis_is_deterministic_and_warns_when_rank_exceeds_the_free_directions():
    osrm = OSRM(target_modules=["0"]).fit(_model(), _tasks())
    torch.testing.assert_close(osrm.basis("0", 4, task="t0"), osrm.basis("0", 4, task="t0"), rtol=0, atol=0)
    with pytest.warns(AdapterMergeWarning, match="free"):
        osrm.basis("0", 16, task="new")


def test_use_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        OSRM().basis("0", 2)


def test_statistics_round_trip_through_save_and_load(tmp_path):
    osrm = OSRM("covariance", target_modules=["0", "2"]).fit(_model(), _tasks())
    loaded = OSRM.load(osrm.save(tmp_path / "stats"))
    assert loaded.statistic == "covariance" and loaded.n_samples_ == osrm.n_samples_
    for task, stats in osrm.statistics_.items():
        for module, value in stats.items():
            torch.testing.assert_close(loaded.statistics_[task][module], value, rtol=0, atol=0)


def test_project_keeps_updates_already_in_the_row_space_and_never_grows_them():
    osrm = OSRM(target_modules=["0"]).fit(_model(), _tasks())
    A_i = osrm.basis("0", 3, task="t0").float()
    inside = Adapter({"0": random_lowrank(12, 16, 3, seed=2).__class__(A_i, torch.randn(12, 3))})
    torch.testing.assert_close(osrm.project(inside, task="t0")["0"].to_dense(), inside["0"].to_dense())
    other = Adapter({"0": random_lowrank(12, 16, 3, seed=3)})
    projected = osrm.project(other, task="t0")["0"]
    assert projected.to_dense().norm() <= other["0"].to_dense().norm() + 1e-6
    torch.testing.assert_close(projected.A, A_i)


@pytest.mark.parametrize("statistic", ["mean", "covariance"])
def test_free_directions_are_chosen_where_the_task_has_inputs_so_the_lora_can_train(statistic):
    # 16 inputs: task a uses 0-3, task b uses 4-7, nobody uses 8-15. Every 2 rows outside 4-7 minimise the
    # paper's objective for task a; rows on the unused inputs would give A h_a = 0 and no gradient at B = 0.
    g = torch.Generator().manual_seed(0)
    tasks = {name: torch.zeros(50, 16) for name in ("a", "b")}
    tasks["a"][:, 0:4] = torch.rand(50, 4, generator=g)
    tasks["b"][:, 4:8] = torch.rand(50, 4, generator=g)
    model = nn.Sequential(nn.Linear(16, 8))
    osrm = OSRM(statistic, target_modules=["0"]).fit(model, {k: [v] for k, v in tasks.items()})
    A = osrm.basis("0", 2, task="a")
    torch.testing.assert_close(A @ A.T, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (A @ tasks["b"].double().mean(0)).abs().max() < 1e-10
    reads = (A @ tasks["a"].double().T).norm(dim=1)  # a mean ranks one direction, a covariance all of them
    assert reads[0] > 1.0 if statistic == "mean" else reads.min() > 1.0 and A[:, 4:].abs().max() < 1e-10
