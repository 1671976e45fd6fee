"""`load_merged_adapters` on a tiny Llama (transformers model and peft `PeftModel`), checked against peft."""

import pytest
import torch

import adaptermerge
from adaptermerge import Adapter, LowRank, load_merged_adapters, save_adapter, set_merge_weights
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError

from .tiny_models import save_random_llama_lora, tiny_llama

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny layers run much faster on one thread than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two PEFT LoRAs: rank 4 / alpha 8 on every linear layer, and rank 2 / alpha 3 with rsLoRA on q and v."""
    folder = tmp_path_factory.mktemp("llama_loras")
    first = save_random_llama_lora(folder / "a", seed=1)
    second = save_random_llama_lora(
        folder / "b", seed=2, r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj"]
    )
    return [first, second]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_cat(loras, weights):
    """The adapters loaded by peft and combined exactly by `add_weighted_adapter(combination_type="cat")`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(loras[0]), adapter_name="a0")
    for i, path in enumerate(loras[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(loras))]
    model.add_weighted_adapter(names, list(weights), "cat", combination_type="cat")
    model.set_adapter("cat")
    return model


def test_patch_adds_methods_to_models():
    from peft import PeftModel
    from transformers import PreTrainedModel

    adaptermerge.patch()
    assert PreTrainedModel.load_merged_adapters is load_merged_adapters
    assert PeftModel.set_merge_weights is set_merge_weights


def test_linear_merge_equals_peft_exact_combination(loras, ids):
    weights = [0.7, -0.4]
    model = tiny_llama()
    base = logits(model, ids)
    load_merged_adapters(model, loras, weights)
    got = logits(model, ids)
    torch.testing.assert_close(got, logits(peft_cat(loras, weights), ids), atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-2
    assert model.active_adapters() == ["merged"]


def test_set_merge_weights_equals_fresh_load(loras, ids):
    adaptermerge.patch()
    model = tiny_llama()
    model.load_merged_adapters(loras)
    for weights in ([0.0, 1.5], [0.4, {"default": 1.0, "q_proj": -2.0}]):
        model.set_merge_weights(weights)
        fresh = tiny_llama()
        fresh.load_merged_adapters(loras, weights)
        torch.testing.assert_close(logits(model, ids), logits(fresh, ids), atol=ATOL, rtol=0)


def test_peft_model_host_keeps_its_adapters_and_reweights(loras, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(loras[0]), adapter_name="own")
    own = logits(model, ids)
    load_merged_adapters(model, loras, [0.5, 0.5])
    set_merge_weights(model, [0.2, 0.9])
    torch.testing.assert_close(logits(model, ids), logits(peft_cat(loras, [0.2, 0.9]), ids), atol=ATOL, rtol=0)
    model.delete_adapter("merged")
    model.set_adapter("own")
    torch.testing.assert_close(logits(model, ids), own, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("svd", {"rank": 3})])
def test_other_methods_change_output_and_match_their_file_loaded_by_peft(loras, ids, tmp_path, method, params):
    from peft import PeftModel

    model = tiny_llama()
    merged = load_merged_adapters(model, loras, [0.6, 0.8], method, **params)
    got = logits(model, ids)
    assert (got - logits(peft_cat(loras, [0.6, 0.8]), ids)).abs().max() > 1e-3
    folder = save_adapter(merged, tmp_path / "merged", format="peft")
    host = PeftModel.from_pretrained(tiny_llama(), str(folder))
    torch.testing.assert_close(got, logits(host, ids), atol=ATOL, rtol=0)
    with pytest.raises(InvalidParameterError, match="no live linear merge"):
        set_merge_weights(model, [1.0, 1.0])


def test_disable_merge_and_delete_work_on_the_merged_adapter(loras, ids):
    model = tiny_llama()
    base = logits(model, ids)
    load_merged_adapters(model, loras, [0.5, 0.5])
    active = logits(model, ids)
    model.disable_adapters()
    torch.testing.assert_close(logits(model, ids), base, atol=ATOL, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model, ids), active, atol=ATOL, rtol=0)
    model.delete_adapter("merged")
    torch.testing.assert_close(logits(model, ids), base, atol=ATOL, rtol=0)
    with pytest.raises(IncompatibleAdaptersError, match="no longer holds"):
        set_merge_weights(model, [1.0, 1.0])


def test_merged_adapter_merges_into_the_weights_like_peft(loras, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(loras[0]), adapter_name="own")
    load_merged_adapters(model, loras, [0.3, 0.6])
    active = logits(model, ids)
    merged = model.merge_and_unload(adapter_names=["merged"])
    torch.testing.assert_close(logits(merged, ids), active, atol=ATOL, rtol=0)


def _one_module_adapter(name, out_features, in_features):
    lowrank = LowRank(torch.randn(2, in_features), torch.randn(out_features, 2))
    return Adapter({name: lowrank}, name="bad")


def test_missing_module_error_names_the_module():
    model = tiny_llama()
    unet = _one_module_adapter("unet.down_blocks.0.attentions.0.proj_in", 8, 8)
    with pytest.raises(IncompatibleAdaptersError, match=r"unet\.down_blocks\.0\.attentions\.0\.proj_in"):
        load_merged_adapters(model, [unet])
    assert not getattr(model, "_hf_peft_config_loaded", False)


def test_wrong_base_model_shape_error_names_the_module():
    bigger = _one_module_adapter("model.layers.1.mlp.down_proj", 32, 64)
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.layers\.1\.mlp\.down_proj.*another base model"):
        load_merged_adapters(tiny_llama(), [bigger])


def test_other_hosts_are_refused_with_the_accepted_kinds():
    with pytest.raises(InvalidParameterError, match="PreTrainedModel"):
        load_merged_adapters(torch.nn.Linear(2, 2), [_one_module_adapter("weight", 2, 2)])
