"""`load_merged_adapters` on a tiny Stable-Diffusion pipeline, checked against diffusers' own LoRA loading."""

import pytest
import torch

import adaptermerge
from adaptermerge import Adapter, LowRank, load_merged_adapters, merge_adapters, save_adapter, set_merge_weights
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError
from adaptermerge.integrations.diffusers import find_pipeline_module

from .tiny_models import save_random_pipeline_lora, tiny_sd_pipeline

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny layers run ~50x faster on one thread than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two SD LoRAs of different ranks and alphas (the second has mixed ranks), written by diffusers."""
    folder = tmp_path_factory.mktemp("sd_loras")
    pipe = tiny_sd_pipeline()
    first = save_random_pipeline_lora(pipe, folder / "a", seed=1, rank=4, alpha=8)
    second = save_random_pipeline_lora(pipe, folder / "b", seed=2, rank=2, rank_pattern={"to_q": 3})
    return [first, second]


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=generator), torch.randint(2, 50, (1, 16), generator=generator)


def outputs(pipe, inputs):
    """Text-encoder hidden states and the UNet's prediction on them."""
    latents, ids = inputs
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return hidden, pipe.unet(latents, 10, encoder_hidden_states=hidden).sample


def assert_outputs_close(got, expected, atol=ATOL):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


def host_combination(loras, weights):
    """The adapters loaded by diffusers and combined exactly by its own `set_adapters`."""
    pipe = tiny_sd_pipeline()
    for i, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(loras))], weights)
    return pipe


def test_patch_adds_methods_to_every_lora_pipeline():
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_base import LoraBaseMixin

    adaptermerge.patch()
    assert LoraBaseMixin.load_merged_adapters is load_merged_adapters
    assert StableDiffusionXLPipeline.set_merge_weights is set_merge_weights


def test_linear_merge_equals_host_set_adapters(loras, inputs):
    weights = [0.7, -0.4]
    pipe = tiny_sd_pipeline()
    base = outputs(pipe, inputs)
    load_merged_adapters(pipe, loras, weights)
    got = outputs(pipe, inputs)
    assert_outputs_close(got, outputs(host_combination(loras, weights), inputs))
    assert all((g - b).abs().max() > 1e-2 for g, b in zip(got, base))
    assert pipe.get_active_adapters() == ["merged"]


def test_set_merge_weights_equals_fresh_load_and_keeps_layers(loras, inputs):
    pipe = tiny_sd_pipeline()
    adaptermerge.patch()
    pipe.load_merged_adapters(loras, [1.0, 1.0])
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    lora_B = layer.lora_B["merged"].weight
    for weights in ([0.3, 0.0], [-0.5, 1.2]):
        pipe.set_merge_weights(weights)
        fresh = tiny_sd_pipeline()
        fresh.load_merged_adapters(loras, weights)
        assert_outputs_close(outputs(pipe, inputs), outputs(fresh, inputs))
    assert layer.lora_B["merged"].weight is lora_B


def test_set_merge_weights_takes_per_module_weights(loras, inputs):
    weights = [{"unet": 0.5, "text_encoder": 0.0}, {"default": 1.0, "to_k": -1.0}]
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, loras)
    set_merge_weights(pipe, weights)
    fresh = tiny_sd_pipeline()
    load_merged_adapters(fresh, loras, weights)
    assert_outputs_close(outputs(pipe, inputs), outputs(fresh, inputs))


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("svd", {"rank": 3})])
def test_other_methods_change_output_and_match_their_file_loaded_by_diffusers(loras, inputs, tmp_path, method, params):
    pipe = tiny_sd_pipeline()
    merged = load_merged_adapters(pipe, loras, [0.6, 0.8], method, **params)
    got = outputs(pipe, inputs)
    linear = outputs(host_combination(loras, [0.6, 0.8]), inputs)
    assert all((g - e).abs().max() > 1e-3 for g, e in zip(got, linear))
    file = save_adapter(merged, tmp_path / "merged", format="diffusers")
    host = tiny_sd_pipeline()
    host.load_lora_weights(str(file), adapter_name="from_file")
    assert_outputs_close(got, outputs(host, inputs))
    with pytest.raises(InvalidParameterError, match="no live linear merge"):
        set_merge_weights(pipe, [1.0, 1.0])


def test_fuse_unfuse_disable_delete_work_on_the_merged_adapter(loras, inputs):
    pipe = tiny_sd_pipeline()
    base = outputs(pipe, inputs)
    load_merged_adapters(pipe, loras, [0.5, 0.5])
    active = outputs(pipe, inputs)
    pipe.fuse_lora()
    assert_outputs_close(outputs(pipe, inputs), active)
    with pytest.raises(IncompatibleAdaptersError, match="unfuse_lora"):
        set_merge_weights(pipe, [1.0, 1.0])
    pipe.unfuse_lora()
    assert_outputs_close(outputs(pipe, inputs), active)
    pipe.disable_lora()
    assert_outputs_close(outputs(pipe, inputs), base)
    pipe.enable_lora()
    pipe.delete_adapters("merged")
    assert_outputs_close(outputs(pipe, inputs), base)
    with pytest.raises(IncompatibleAdaptersError, match="no longer holds"):
        set_merge_weights(pipe, [1.0, 1.0])


def test_loading_again_replaces_the_adapter_of_that_name(loras, inputs):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, loras, [1.0, 1.0])
    load_merged_adapters(pipe, loras, [0.2, 0.3])
    fresh = tiny_sd_pipeline()
    load_merged_adapters(fresh, loras, [0.2, 0.3])
    assert_outputs_close(outputs(pipe, inputs), outputs(fresh, inputs))
    assert pipe.get_list_adapters()["unet"] == ["merged"]


def _one_module_adapter(name, out_features, in_features):
    lowrank = LowRank(torch.randn(2, in_features), torch.randn(out_features, 2))
    return Adapter({name: lowrank}, name="bad")


def test_missing_module_error_names_the_module():
    pipe = tiny_sd_pipeline()
    bad = _one_module_adapter("unet.down_blocks.0.attentions.0.no_such_layer", 8, 8)
    with pytest.raises(IncompatibleAdaptersError, match="no_such_layer"):
        load_merged_adapters(pipe, [bad])
    llm = _one_module_adapter("model.layers.0.self_attn.q_proj", 16, 16)
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        load_merged_adapters(pipe, [llm])
    assert pipe.get_list_adapters() == {}


def test_wrong_base_model_shape_error_names_the_module():
    pipe = tiny_sd_pipeline()
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(IncompatibleAdaptersError, match=r"attn1\.to_q.*another base model"):
        load_merged_adapters(pipe, [_one_module_adapter(name, 320, 320)])


def test_hub_ids_resolve_through_huggingface_hub(loras, inputs, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(loras[int(repo_id.endswith("b"))])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, ["someone/lora-a", "someone/lora-b"], [0.7, -0.4])
    assert asked == ["someone/lora-a", "someone/lora-b"]
    assert_outputs_close(outputs(pipe, inputs), outputs(host_combination(loras, [0.7, -0.4]), inputs))


def test_sdxl_routes_modules_to_both_text_encoders(tmp_path):
    from .tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    loras = [save_random_pipeline_lora(pipe, tmp_path / f"xl{i}", seed=i, rank=2 + i) for i in range(2)]
    ids = torch.randint(2, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def xl_outputs(p):
        with torch.no_grad():
            first = p.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = p.text_encoder_2(ids, output_hidden_states=True)
            hidden = torch.cat([first, second.hidden_states[-2]], dim=-1)
            pooled = second.text_embeds.repeat(1, 2)  # the tiny UNet's text-time projection takes 32 features
            cond = {"text_embeds": pooled, "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])}
            sample = p.unet(latents, 10, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
            return first, second.text_embeds, sample

    weights = [0.8, -0.5]
    load_merged_adapters(pipe, loras, weights)
    host = tiny_sdxl_pipeline()
    for i, path in enumerate(loras):
        host.load_lora_weights(str(path), adapter_name=f"a{i}")
    host.set_adapters(["a0", "a1"], weights)
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert_outputs_close(xl_outputs(pipe), xl_outputs(host))


def test_conv_loras_merge_and_reweight_like_diffusers(tmp_path, inputs):
    from .tiny_models import UNET_CONV_TARGETS

    pipe = tiny_sd_pipeline()
    loras = [
        save_random_pipeline_lora(pipe, tmp_path / f"conv{i}", seed=i, rank=2, unet_targets=UNET_CONV_TARGETS)
        for i in range(2)
    ]
    load_merged_adapters(pipe, loras, [1.0, 1.0])
    set_merge_weights(pipe, [0.5, -1.0])
    assert_outputs_close(outputs(pipe, inputs), outputs(host_combination(loras, [0.5, -1.0]), inputs))


def test_dora_loras_merge_with_the_pipelines_own_weights(tmp_path, inputs):
    """The pipeline holds `W0`, so DoRA LoRAs merge exactly without a base path: the same as merging with the saved
    pipeline folder as `base` and loading that file with diffusers."""
    pipe = tiny_sd_pipeline()
    doras = [
        save_random_pipeline_lora(pipe, tmp_path / f"dora{i}", seed=i, rank=2 + i, text_encoder=False, use_dora=True)
        for i in range(2)
    ]
    pipe.save_pretrained(str(tmp_path / "base"))
    reference = merge_adapters(doras, [0.7, -0.4], base=tmp_path / "base")
    expected = tiny_sd_pipeline()
    expected.load_lora_weights(str(save_adapter(reference, tmp_path / "reference", format="diffusers")))
    base_outputs = outputs(pipe, inputs)
    merged = load_merged_adapters(pipe, doras, [0.7, -0.4])
    assert all(update.magnitude is not None for update in merged.values())
    got = outputs(pipe, inputs)
    assert_outputs_close(got, outputs(expected, inputs))
    assert (got[1] - base_outputs[1]).abs().max() > 1e-3  # the merge changed the UNet's output


def test_adapters_with_side_car_tensors_are_refused_before_anything_is_loaded():
    """A pipeline's LoRA loader holds factors only: the bias/norm deltas of a ComfyUI or Wan file would be lost."""
    pipe = tiny_sd_pipeline()
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = find_pipeline_module(pipe, module)
    plain = _one_module_adapter(module, layer.out_features, layer.in_features)
    with_bias = Adapter(dict(plain), name="wan_style", side_cars={f"{module}.diff_b": torch.ones(layer.out_features)})
    for method in ("linear", "ties"):
        with pytest.raises(IncompatibleAdaptersError, match=r"wan_style carries 1 side-car tensors .*diff_b"):
            load_merged_adapters(pipe, [plain, with_bias], method=method)
    assert not pipe.get_list_adapters()
