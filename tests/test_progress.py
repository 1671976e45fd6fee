"""Progress bars end at 100 % and are closed: merging, batch jobs, library similarity."""

import re

from adaptermerge import merge_adapters, save_adapter
from adaptermerge.batch import run_jobs
from adaptermerge.library import adapter_similarity
from adaptermerge.recipes import MergeJob
from tests.factories import make_adapter

SHAPES = {f"model.layers.{i}.self_attn.q_proj": (12, 8) for i in range(5)}


def _last_state(stderr: str, desc: str) -> str:
    """The last frame tqdm drew for the bar named `desc`."""
    frames = [f for f in re.split(r"[\r\n]", stderr) if f.startswith(desc)]
    assert frames, f"no {desc!r} bar in {stderr!r}"
    return frames[-1]


def test_merge_bar_reaches_every_module_and_closes(capsys):
    adapters = [make_adapter(SHAPES, rank=2, seed=s) for s in range(2)]
    merge_adapters(adapters, method="ties", progressbar=True, num_workers=2)
    last = _last_state(capsys.readouterr().err, "merging (ties)")
    assert "100%" in last and "5/5" in last, last


def test_batch_and_similarity_bars_reach_100_percent(tmp_path, capsys):
    paths = []
    for seed in range(3):
        paths.append(save_adapter(make_adapter(SHAPES, rank=2, seed=seed), tmp_path / f"lora_{seed}"))
    jobs = [MergeJob(f"job{i}", (str(paths[i]), str(paths[i + 1])), (1.0, 1.0), tmp_path / f"out{i}") for i in (0, 1)]
    run_jobs(jobs, workers=0, progressbar=True)
    adapter_similarity(tmp_path, workers=0, progressbar=True)
    err = capsys.readouterr().err
    assert "2/2" in _last_state(err, "merges") and "100%" in _last_state(err, "merges")
    assert "100%" in _last_state(err, "similarity")
