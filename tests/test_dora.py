"""DoRA adapters: read and written exactly, and merged exactly given the base model (checked through peft)."""

import pytest
import torch
from click.testing import CliRunner

from adaptermerge import load_adapter, load_merged_adapters, merge_adapters, save_adapter, set_merge_weights
from adaptermerge.cli import main
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError
from tests.tiny_models import LLAMA_TARGETS, peft_merged_weights, save_random_llama_lora, tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    tiny_llama().save_pretrained(str(root / "base"))
    return {
        "base": root / "base",
        "dora1": save_random_llama_lora(root / "dora1", seed=1, r=4, use_dora=True),
        "dora2": save_random_llama_lora(root / "dora2", seed=2, r=2, lora_alpha=4, use_dora=True),
        "lora": save_random_llama_lora(root / "lora", seed=3, r=3, lora_alpha=6),
        "root": root,
    }


def test_a_dora_adapter_round_trips_and_gives_peft_outputs(files):
    ours = save_adapter(load_adapter(files["dora1"]), files["root"] / "roundtrip", format="peft", overwrite=True)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(tiny_llama(), str(files["dora1"]))(ids).logits
        got = peft.PeftModel.from_pretrained(tiny_llama(), str(ours))(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_is_dora_reads_the_file_keys_not_the_tensors(files, monkeypatch):
    dora, plain = load_adapter(files["dora1"]), load_adapter(files["lora"])

    def refuse(key):
        raise AssertionError(f"tensor {key!r} was read")

    for adapter in (dora, plain):
        monkeypatch.setattr(adapter.modules.source, "get", refuse)
    assert dora.is_dora
    assert not plain.is_dora


def test_dora_merge_with_base_equals_the_weighted_sum_of_peft_merged_weights(files):
    weights = [0.6, -0.3, 0.5]
    paths = [files["dora1"], files["dora2"], files["lora"]]
    merged = merge_adapters(paths, weights, base=files["base"])
    assert all(lr.magnitude is not None for lr in merged.values())
    out = save_adapter(merged, files["root"] / "merged", format="peft", overwrite=True)

    base = {
        name: module.weight.detach().double()
        for name, module in tiny_llama().named_modules()
        if hasattr(module, "weight")
    }
    expected = dict(base)
    for w, path in zip(weights, paths):
        for name, weight in peft_merged_weights(path).items():
            expected[name] = expected[name] + w * (weight - base[name])
    got = peft_merged_weights(out)
    adapted = [name for name in got if name.endswith(tuple(LLAMA_TARGETS))]
    assert adapted
    for name in adapted:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-6)


def test_dora_merge_is_refused_without_base_or_with_another_method(files):
    with pytest.raises(IncompatibleAdaptersError, match="--base"):
        merge_adapters([files["dora1"], files["dora2"]])
    with pytest.raises(IncompatibleAdaptersError, match="only with method 'linear'"):
        merge_adapters([files["dora1"], files["dora2"]], method="ties", base=files["base"])
    result = CliRunner().invoke(
        main, ["merge", str(files["dora1"]), str(files["lora"]), "-o", str(files["root"] / "x")]
    )
    assert result.exit_code == 2 and "dora1" in result.output and "--base" in result.output


def test_dora_merge_through_the_cli_with_base(files):
    out = files["root"] / "cli_merged"
    args = ["-q", "merge", str(files["dora1"]), str(files["dora2"]), "--base", str(files["base"]), "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert all(lr.magnitude is not None and lr.rank == 6 for lr in load_adapter(out).values())


def test_wrong_base_model_names_the_module(files, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(IncompatibleAdaptersError, match="wrong base model"):
        merge_adapters([files["dora1"]], base=tmp_path / "other")


@pytest.mark.parametrize("host", ["transformers", "peft"])
def test_load_merged_adapters_merges_dora_with_the_models_own_weights(files, host):
    """A loaded model holds `W0`, so `load_merged_adapters` merges DoRA adapters exactly without a `base` path,
    also into a PeftModel whose layers a LoRA already wraps (their `base_layer` is `W0`)."""
    weights = [0.6, -0.3, 0.5]
    paths = [files["dora1"], files["dora2"], files["lora"]]
    reference = files["root"] / f"reference_{host}"
    save_adapter(merge_adapters(paths, weights, base=files["base"]), reference, format="peft", overwrite=True)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(tiny_llama(), str(reference))(ids).logits
    model = tiny_llama()
    if host == "peft":
        model = peft.PeftModel.from_pretrained(model, str(files["lora"]))
    merged = load_merged_adapters(model, paths, weights)
    assert all(update.magnitude is not None for update in merged.values())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="DoRA merge's magnitudes depend on the weights"):
        set_merge_weights(model, [1.0, 1.0, 1.0])


def test_a_dora_merge_into_a_model_with_a_fused_adapter_is_refused(files):
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(files["lora"]))
    model.merge_adapter()  # folds `lora` into the base weights: they are no longer W0
    with pytest.raises(IncompatibleAdaptersError, match=r"fused into its weight.*unmerge_adapter"):
        load_merged_adapters(model, [files["dora1"], files["dora2"]])
