"""Errors a new user meets first: each is one line, in the command line's own spelling, and says what to do."""

import pytest
import yaml
from click.testing import CliRunner

from adaptermerge import merge_adapters, save_adapter
from adaptermerge.cli import main
from adaptermerge.errors import InvalidParameterError, OutputExistsError
from tests.factories import make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12)}


def invoke(*args):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def lora(tmp_path):
    return save_adapter(make_adapter(SHAPES, rank=2), tmp_path / "lora")


def test_a_mistyped_local_path_says_first_that_it_does_not_exist(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = invoke("inspect", "loras/style_lora")
    assert line.startswith("Error: loras/style_lora: no such file or folder, and no hub repository")


def test_existing_output_is_refused_before_merging_in_the_interface_spelling(lora, tmp_path):
    out = save_adapter(make_adapter(SHAPES, rank=2), tmp_path / "out")
    result = CliRunner().invoke(main, ["merge", str(lora), str(lora), "-o", str(out)])
    assert result.exit_code == 2 and "merging" not in result.output, "no progress bar before the error"
    assert result.output.strip() == f"Error: {out} exists; choose another output path or pass --overwrite"
    with pytest.raises(OutputExistsError, match=r"pass overwrite=True$"):
        save_adapter(make_adapter(SHAPES), out)


def test_weight_counts_are_spelt_right(lora):
    with pytest.raises(InvalidParameterError, match="got 1 weight for 2 adapters; give one weight per adapter"):
        merge_adapters([lora, lora], [1.0])
    with pytest.raises(InvalidParameterError, match="got 2 weights for 1 adapter;"):
        merge_adapters([lora], [1.0, 2.0])


def test_a_recipe_typo_names_the_closest_known_field(lora, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    merges = [{"name": "a", "adapters": [{"path": "lora", "wieght": 0.5}], "output": "out", "methd": "ties"}]
    recipe.write_text(yaml.safe_dump({"merges": merges}))
    line = invoke("run", recipe, "--dry-run")
    assert "merges[0] ('a').methd: unknown field 'methd'; did you mean 'method'?" in line
    assert "merges[0] ('a').adapters[0].wieght: unknown field 'wieght'; did you mean 'weight'?" in line


def test_similarity_of_an_empty_folder_draws_no_bar_before_its_error(tmp_path):
    line = invoke("library", "similarity", tmp_path)
    assert line == f"Error: {tmp_path}: need at least two readable adapters; found 0"
