"""Recipes: schema validation with errors that point at the entry, path resolution, allowed roots."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from adaptermerge import save_adapter
from adaptermerge.cli import main
from adaptermerge.recipes import RecipeError, load_recipe
from tests.factories import make_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16)}


@pytest.fixture
def folder(tmp_path):
    """A recipe folder with three PEFT adapters under loras/."""
    for i in range(3):
        save_adapter(make_adapter(SHAPES, rank=2, seed=i), tmp_path / "loras" / f"style_{i}")
    return tmp_path


def write(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_resolves_paths_globs_and_hub_ids_against_its_folder(folder, monkeypatch):
    monkeypatch.chdir("/")  # resolution must not depend on the working directory
    recipe = {
        "defaults": {"method": "linear", "dtype": "float16"},
        "merges": [
            {
                "name": "mix",
                "adapters": [
                    "loras/style_0",
                    {"path": "loras/style_1", "weight": 0.5},
                    {"hub": "someone/some-lora", "weight": {"q_proj": 2.0}},
                ],
                "output": "out/mix",
                "rank": 4,
            },
            {"adapters": [{"glob": "loras/style_*", "weight": 0.25}], "output": "out/all", "dtype": "float32"},
        ],
    }
    loaded = load_recipe(write(folder, recipe))
    mix, everything = loaded.jobs
    assert mix.adapters == (str(folder / "loras/style_0"), str(folder / "loras/style_1"), "hub:someone/some-lora")
    assert mix.weights == (1.0, 0.5, {"q_proj": 2.0})  # a mapping passes through unchanged
    assert (mix.output, mix.rank, mix.dtype, mix.method) == (folder / "out/mix", 4, "float16", "linear")
    assert everything.name == "all"  # the output's stem by default
    assert everything.adapters == tuple(str(folder / f"loras/style_{i}") for i in range(3))
    assert everything.weights == (0.25,) * 3 and everything.dtype == "float32"
    assert loaded.roots == (folder.resolve(),)


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"adapters": ["../elsewhere/lora"], "output": "out"}, "merges[0] ('m').adapters[0].path"),
        ({"adapters": ["loras/style_0"], "output": "../out"}, "merges[0] ('m').output"),
        ({"adapters": ["loras/../../*"], "output": "out"}, "merges[0] ('m').adapters[0].glob"),
    ],
)
def test_paths_outside_the_allowed_roots_are_refused_unless_allowed(folder, entry, field):
    (folder.parent / "elsewhere" / "lora").mkdir(parents=True, exist_ok=True)
    path = write(folder, {"merges": [{"name": "m", **entry}]})
    with pytest.raises(RecipeError, match="outside the allowed roots") as info:
        load_recipe(path)
    assert field in str(info.value) and "--allow-root" in str(info.value)
    if "glob" not in field:  # a glob over the whole parent folder would also match unrelated files
        assert load_recipe(path, allowed_roots=[folder.parent]).jobs


@pytest.mark.parametrize(
    "merge, message",
    [
        (
            {"adapters": ["loras/style_0"], "output": "o", "densty": 0.5},
            r"merges\[0\] \('m'\)\.densty: unknown field 'densty'; a method parameter goes under params, as params: "
            r"\{density: ",
        ),
        ({"adapters": [{"path": "loras/style_0", "weight": True}], "output": "o"}, r"adapters\[0\]\.weight: a weight"),
        ({"adapters": [{"path": "a", "hub": "b/c"}], "output": "o"}, r"adapters\[0\]: give exactly one of path"),
        ({"adapters": [{"hub": "not a hub id"}], "output": "o"}, r"adapters\[0\]\.hub: a hub id looks like"),
        ({"adapters": [], "output": "o"}, r"merges\[0\] \('m'\)\.adapters: List should have at least 1"),
        ({"adapters": ["loras/style_0"]}, r"merges\[0\] \('m'\)\.output: Field required"),
        ({"adapters": ["loras/style_0"], "output": "o", "format": "ckpt"}, r"\.format: Input should be 'peft'"),
        ({"adapters": ["loras/style_0"], "output": "o", "method": "linaer"}, r"\.method: .*Did you mean 'linear'"),
        ({"adapters": ["loras/style_0"], "output": "o", "params": {"density": 0.5}}, r"\.params: .*density"),
        ({"adapters": ["loras/missing"], "output": "o"}, r"adapters\[0\]\.path: .*missing does not exist"),
        ({"adapters": ["loras/*.ckpt"], "output": "o"}, r"adapters\[0\]\.glob: no file or folder matches"),
    ],
)
def test_recipe_errors_name_the_entry_and_the_field(folder, merge, message):
    path = write(folder, {"merges": [{"name": "m", **merge}]})
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_duplicate_outputs_and_bad_yaml_are_refused(folder):
    merges = [{"name": n, "adapters": ["loras/style_0"], "output": "out/same"} for n in ("a", "b")]
    with pytest.raises(RecipeError, match=r"merges\[1\]\.output: .* already used by merges\[0\]"):
        load_recipe(write(folder, {"merges": merges}))
    bad = folder / "bad.yaml"
    bad.write_text("merges: [unclosed")
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(bad)


def test_cli_run_exits_2_on_an_invalid_recipe_and_dry_run_lists_jobs(folder):
    runner = CliRunner(env={"COLUMNS": "200"})
    invalid = write(folder, {"merges": [{"adapters": ["loras/style_0"], "output": "o", "rank": 0}]}, "invalid.yaml")
    result = runner.invoke(main, ["run", str(invalid)])
    assert result.exit_code == 2
    assert "merges[0].rank: Input should be greater than 0" in result.output
    valid = write(folder, {"merges": [{"name": "m", "adapters": ["loras/style_*"], "output": "out/m"}]})
    result = runner.invoke(main, ["run", str(valid), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "loras/style_2" in result.output and "would run" in result.output
    assert not (folder / "out").exists()


def test_the_example_recipe_is_valid(tmp_path):
    example = Path(__file__).parents[1] / "examples" / "recipe.yaml"
    (tmp_path / "loras" / "watercolor").mkdir(parents=True)
    (tmp_path / "loras" / "characters").mkdir()
    for name in ("ink.safetensors", "characters/alice.safetensors", "characters/bob.safetensors"):
        (tmp_path / "loras" / name).touch()
    copy = tmp_path / "recipe.yaml"
    copy.write_text(example.read_text())
    style, character, quick = load_recipe(copy).jobs
    assert style.weights == (0.7, 0.3) and (style.rank, style.dtype, style.format) == (32, "float16", "peft")
    assert character.adapters[-1] == "hub:some-user/some-lora" and len(character.adapters) == 3
    assert (character.method, character.params, character.format) == ("ties", {"density": 0.3}, "kohya")
    assert quick.name == "quick" and quick.adapters[1].endswith("alice.safetensors")
