"""Host-library versions: `adaptermerge env`, and merged adapters that load where transformers refuses peft."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from adaptermerge import load_merged_adapters, set_merge_weights, versions
from adaptermerge.cli import main
from adaptermerge.errors import AdapterMergeWarning, IncompatibleVersionsError
from adaptermerge.versions import at_least, report, version

from .test_integration_transformers import ATOL, logits, peft_cat
from .tiny_models import save_random_llama_lora, tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("version_loras")
    return [
        save_random_llama_lora(folder / "a", seed=5),
        save_random_llama_lora(folder / "b", seed=6, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
        save_random_llama_lora(folder / "dora", seed=7, r=3, use_dora=True),
    ]


@pytest.fixture
def transformers_refuses_peft(monkeypatch):
    """The installed peft made too old for the installed transformers, as transformers 5.24 with peft 0.21 was."""
    from transformers.integrations import peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "99.0")
    return "99.0"


def test_env_lists_the_versions_that_matter_without_importing_torch():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0].strip("- ") for line in result.output.splitlines()}
    assert {"Python", "Platform", "CPUs", "torch", "torch accelerators", "peft", "transformers", "diffusers"} <= lines
    facts = json.loads(CliRunner().invoke(main, ["env", "--json"]).output)
    assert facts["peft"] == version("peft") and facts["torch"] == version("torch") == torch.__version__
    assert facts == report()
    # the module alone (the package's __init__ imports torch for the math): reading the versions imports no torch
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('versions', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.report(); "
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code, versions.__file__], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_at_least_ignores_local_tags_and_missing_packages():
    assert at_least("torch", torch.__version__.split("+")[0])
    assert not at_least("torch", "999")
    assert not at_least("no-such-package-here", "0")


def test_transformers_gate_is_bypassed_through_peft_with_a_warning(loras, transformers_refuses_peft):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model = tiny_llama()
    with pytest.raises(ValueError, match="not compatible"):
        model.disable_adapters()  # what the user would have hit inside transformers
    with pytest.warns(AdapterMergeWarning, match=r"requires peft >= 99\.0, peft .* is installed"):
        load_merged_adapters(model, loras[:2], [0.7, -0.4])
    expected = logits(peft_cat(loras[:2], [0.7, -0.4]), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    set_merge_weights(model, [0.2, 0.9])
    torch.testing.assert_close(logits(model, ids), logits(peft_cat(loras[:2], [0.2, 0.9]), ids), atol=ATOL, rtol=0)
    with pytest.warns(AdapterMergeWarning):
        load_merged_adapters(model, loras[:2], [0.2, 0.9])  # the same name again replaces the adapter
    torch.testing.assert_close(logits(model, ids), logits(peft_cat(loras[:2], [0.2, 0.9]), ids), atol=ATOL, rtol=0)


def test_dora_merge_loads_through_peft_as_through_transformers(loras, monkeypatch):
    """The DoRA magnitudes reach the model on both routes (transformers' own loader renames their keys)."""
    ids = torch.arange(12)[None]
    outputs = []
    for gate in ("0.0", "99.0"):
        from transformers.integrations import peft as integration

        monkeypatch.setattr(integration, "MIN_PEFT_VERSION", gate)
        model = tiny_llama()
        with pytest.warns(AdapterMergeWarning) if gate == "99.0" else _no_warning():
            load_merged_adapters(model, [loras[2], loras[0]], [0.8, 0.3])
        outputs.append(logits(model, ids))
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    assert (outputs[0] - logits(tiny_llama(), ids)).abs().max() > 1e-2


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def context():
        with warnings.catch_warnings():
            warnings.simplefilter("error", AdapterMergeWarning)
            yield

    return context()


def test_a_refused_combination_that_peft_cannot_load_either_names_both_versions(
    loras, transformers_refuses_peft, monkeypatch
):
    def broken(*args, **kwargs):
        raise TypeError("inject_adapter_in_model() got an unexpected keyword argument")

    monkeypatch.setattr(peft, "inject_adapter_in_model", broken)
    with pytest.warns(AdapterMergeWarning), pytest.raises(IncompatibleVersionsError) as info:
        load_merged_adapters(tiny_llama(), loras[:1])
    message = str(info.value)
    assert f"transformers {version('transformers')} requires peft >= 99.0" in message
    assert f"peft {version('peft')} is installed" in message and "pip install 'peft>=99.0'" in message


def test_a_pipeline_merge_with_text_encoder_modules_says_first_that_transformers_refuses_peft(tmp_path, monkeypatch):
    """diffusers loads text-encoder LoRAs through transformers, whose gate would raise from deep inside."""
    from .tiny_models import save_random_pipeline_lora, tiny_sd_pipeline

    lora = save_random_pipeline_lora(tiny_sd_pipeline(), tmp_path / "lora", seed=1)
    from transformers.integrations import peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "99.0")
    pipe = tiny_sd_pipeline()
    with pytest.raises(
        IncompatibleVersionsError, match=r"requires peft >= 99\.0.*text_encoder LoRA through transformers"
    ):
        load_merged_adapters(pipe, [lora])
    assert not pipe.get_list_adapters()  # nothing half-loaded
