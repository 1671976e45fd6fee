"""Hub ids resolve through huggingface_hub itself, offline, from its cache.

Each repository is laid out the way `snapshot_download` leaves it (`refs/main` naming a commit, the files under
`snapshots/<commit>/`), and only huggingface_hub's cache folder and offline switch are patched: the resolution code
under test is the real library's, as on a machine that downloaded the repositories before.
"""

import hashlib
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import constants

from adaptermerge import load_adapter, merge_adapters, save_adapter
from adaptermerge.cli import main
from adaptermerge.errors import AdapterFormatError
from adaptermerge.recipes import RecipeError, load_recipe
from adaptermerge.ui.diffusion import is_pipeline, tiny_sd_pipeline
from tests.factories import make_adapter
from tests.tiny_models import save_random_llama_lora, tiny_llama

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.down_proj": (16, 32)}


@pytest.fixture
def publish(tmp_path, monkeypatch):
    """`publish(repo_id, folder)` puts `folder` in an offline hub cache as the repository's `main`."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id, folder):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)
        return repo_id

    return put


def _peft_adapter(path, seed):
    return save_adapter(make_adapter(SHAPES, rank=2 + seed, seed=seed, name=f"lora{seed}"), path, format="peft")


def test_adapters_load_and_merge_by_hub_id(publish, tmp_path):
    local = [_peft_adapter(tmp_path / f"lora{i}", seed=i) for i in range(2)]
    ids = [publish(f"acme/lora-{i}", path) for i, path in enumerate(local)]
    for repo_id, path in zip(ids, local):
        by_id, by_path = load_adapter(repo_id), load_adapter(path)
        assert set(by_id) == set(by_path)
        for module in by_path:
            torch.testing.assert_close(by_id[module].to_dense(), by_path[module].to_dense(), rtol=0, atol=0)

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["-q", "merge", *ids, "--weights", "0.5,2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    expected = merge_adapters(local, [0.5, 2.0])
    for module, update in load_adapter(out).items():
        torch.testing.assert_close(update.to_dense(), expected[module].to_dense(), rtol=1e-6, atol=1e-7)


def test_a_hub_id_missing_from_the_offline_cache_is_a_clear_error(publish):
    with pytest.raises(
        AdapterFormatError,
        match="acme/not-there: no such file or folder, and no hub repository of that name could be reached",
    ):
        load_adapter("acme/not-there")
    result = CliRunner().invoke(main, ["merge", "acme/not-there", "-o", "unused"])
    assert result.exit_code == 2 and "acme/not-there" in result.output


def test_a_dora_merge_reads_its_base_model_by_hub_id(publish, tmp_path):
    tiny_llama().save_pretrained(str(tmp_path / "base"))
    base_id = publish("acme/tiny-llama", tmp_path / "base")
    doras = [save_random_llama_lora(tmp_path / f"dora{i}", seed=i, use_dora=True) for i in range(2)]
    by_id = merge_adapters(doras, [0.6, 0.4], base=base_id)
    by_path = merge_adapters(doras, [0.6, 0.4], base=tmp_path / "base")
    assert set(by_id) == set(by_path)
    for module, update in by_path.items():
        torch.testing.assert_close(by_id[module].to_dense(), update.to_dense(), rtol=0, atol=0)
        torch.testing.assert_close(by_id[module].magnitude, update.magnitude, rtol=0, atol=0)


def test_a_diffusers_pipeline_is_recognised_by_hub_id(publish, tmp_path):
    tiny_sd_pipeline().save_pretrained(str(tmp_path / "sd"))
    pipeline_id = publish("acme/tiny-sd", tmp_path / "sd")
    adapter_id = publish("acme/lora", _peft_adapter(tmp_path / "lora", seed=0))
    assert is_pipeline(pipeline_id)
    assert not is_pipeline(adapter_id)  # cached, but holds no model_index.json
    assert not is_pipeline("acme/not-there")  # offline and not cached: no pipeline, no exception


def test_a_recipe_hub_entry_never_reads_a_local_folder(publish, tmp_path, monkeypatch):
    """A `hub:` entry naming a folder outside the recipe's roots must not read it, whatever the working directory."""
    _peft_adapter(tmp_path / "repro" / "secret_outside", seed=0)
    recipes = tmp_path / "recipes"
    _peft_adapter(recipes / "a", seed=1)
    recipe = recipes / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"merges": [{"adapters": ["a", {"hub": "repro/secret_outside"}], "output": "o"}]})
    )
    monkeypatch.chdir(tmp_path)  # where `repro/secret_outside` exists as a relative local path
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "--workers", "0"])
    assert result.exit_code == 1 and "repro/secret_outside: the hub repository could not be reached" in result.output
    assert not (recipes / "o").exists()

    publish("repro/secret_outside", tmp_path / "repro" / "secret_outside")  # the same id, from the hub: read
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert len(load_adapter(recipes / "o")) == len(SHAPES)


@pytest.mark.parametrize("repo_id", ["../etc", "a/..", "a--b/c", "a/b.git", "/abs/path", "a/b/c"])
def test_hub_entries_are_checked_to_be_repository_ids(repo_id, tmp_path):
    with pytest.raises(AdapterFormatError, match="not a hub repository id"):
        load_adapter(f"hub:{repo_id}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merges": [{"adapters": [{"hub": repo_id}], "output": "o"}]}))
    with pytest.raises(RecipeError, match="a hub id looks like owner/name"):
        load_recipe(recipe)
