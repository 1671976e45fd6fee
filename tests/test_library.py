"""Library scan (mixed formats, unreadable files listed) and factor-space similarity against dense references."""

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner

from adaptermerge import Adapter, save_adapter
from adaptermerge.cli import main
from adaptermerge.io import FORMATS
from adaptermerge.library import adapter_similarity, scan_library
from tests.factories import dense, make_adapter

BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
Q, K, V = f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_k", f"{BLOCK}.attn1.to_v"
SHAPES = {Q: (24, 16), K: (24, 16), V: (24, 16)}


def _negated(adapter: Adapter) -> Adapter:
    return adapter.with_modules({m: lr.scale(-1.0) for m, lr in adapter.items()})


@pytest.fixture
def library(tmp_path):
    """One adapter per available format plus a negated copy, a partial one, a corrupt file and a pickle."""
    base = make_adapter(SHAPES, rank=4, seed=0)
    for fmt in FORMATS:
        target = tmp_path / "lib" / (fmt if fmt == "peft" else f"{fmt}.safetensors")
        save_adapter(make_adapter(SHAPES, rank=4, seed=len(fmt)), target, format=fmt)
    save_adapter(base, tmp_path / "lib" / "nested" / "base")
    save_adapter(_negated(base), tmp_path / "lib" / "nested" / "base_negated")
    save_adapter(make_adapter({Q: SHAPES[Q], V: SHAPES[V]}, rank=2, seed=9), tmp_path / "lib" / "qv_only")
    (tmp_path / "lib" / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "lib" / "old.ckpt")
    (tmp_path / "lib" / "notes.txt").write_text("not an adapter")
    return tmp_path / "lib"


def test_scan_indexes_mixed_formats_and_lists_unreadable_files_with_the_reason(library, tmp_path):
    index = scan_library(library)
    found = {e.path: e for e in index.entries}
    assert {e.format for e in index.entries} == set(FORMATS)
    assert set(found) >= {"nested/base", "nested/base_negated", "qv_only"}
    assert found["qv_only"].modules == 2 and found["qv_only"].ranks == (2,)
    assert found["qv_only"].parameters == 2 * 2 * (24 + 16) and found["qv_only"].size_bytes > 0
    reasons = dict(index.unreadable)
    assert set(reasons) == {"corrupt.safetensors", "old.ckpt"}  # notes.txt is not a candidate
    assert "pickle" in reasons["old.ckpt"]
    index.write(tmp_path / "index.json")
    data = json.loads((tmp_path / "index.json").read_text())
    assert len(data["adapters"]) == len(index.entries) and len(data["unreadable"]) == 2
    index.write(tmp_path / "index.csv")
    rows = list(csv.DictReader((tmp_path / "index.csv").open()))
    assert len(rows) == len(index.entries) + 2 and rows[-1]["error"]


def _dense_cosine(x: dict, y: dict) -> float:
    shared = [m for m in x if m in y]
    dot = sum((x[m] * y[m]).sum() for m in shared)
    return float(dot / math.sqrt(sum(x[m].square().sum() for m in shared) * sum(y[m].square().sum() for m in shared)))


def test_similarity_on_factors_matches_the_dense_cosine_over_shared_modules(library):
    from adaptermerge import load_adapter

    result = adapter_similarity(library, workers=0)
    n = len(result.names)
    assert n == len(FORMATS) + 3 and torch.equal(result.cosine, result.cosine.T)
    updates = [dense(load_adapter(library / name)) for name in result.names]
    for i in range(n):
        assert result.cosine[i, i] == 1.0
        for j in range(i + 1, n):
            assert result.shared[i, j] == len(set(updates[i]) & set(updates[j]))
            assert result.cosine[i, j].item() == pytest.approx(_dense_cosine(updates[i], updates[j]), abs=1e-6)
    base, negated = result.names.index("nested/base"), result.names.index("nested/base_negated")
    assert result.cosine[base, negated].item() == pytest.approx(-1.0, abs=1e-6)
    assert result.pairs(most="interfering", top=1)[0][:2] == ("nested/base", "nested/base_negated")
    similar = result.pairs(most="similar", top=3)
    assert [v for *_, v in similar] == sorted((v for *_, v in similar), reverse=True)
    tiled = adapter_similarity(library, workers=2)  # several tiles on the process pool: same numbers
    torch.testing.assert_close(tiled.cosine, result.cosine)


def test_cli_similarity_writes_matrix_and_heatmap_and_lists_pairs(library, tmp_path):
    out = tmp_path / "similarity"
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(
        main, ["library", "similarity", str(library), "-o", str(out), "--workers", "0", "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "most similar pairs" in result.output and "most interfering pairs" in result.output
    assert "-1.0000" in result.output and "corrupt.safetensors" in result.output
    rows = list(csv.reader((out / "similarity.csv").open()))
    assert rows[0][0] == "adapter" and len(rows) == len(rows[0])
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scan = runner.invoke(main, ["library", "scan", str(library), "-o", str(tmp_path / "index.json")])
    assert scan.exit_code == 0 and "2 unreadable" in scan.output
