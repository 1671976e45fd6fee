"""PEFT, kohya and diffusers formats: round trips keep every update, and peft/diffusers read our files as we do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adaptermerge import Adapter, AdapterMetadata
from adaptermerge.io import detect_format, diffusers, kohya, load_adapter, peft, save_adapter
from adaptermerge.lowrank import norm
from tests.factories import TOLERANCES, random_lowrank
from tests.tiny_models import (
    UNET_ATTENTION_TARGETS,
    UNET_CONV_TARGETS,
    adapted_weight,
    pipeline_module,
    save_random_llama_lora,
    save_random_pipeline_lora,
    tiny_llama,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

FORMATS = ["peft", "diffusers", "kohya"]
DATA = Path(__file__).parent / "data"
# Module name → (out, in, kernel) of a diffusion adapter spanning every component, linear and conv, mixed ranks.
DIFFUSION_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16, (), 4),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (16, 16, (), 4),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (64, 16, (), 2),
    "unet.down_blocks.0.resnets.0.conv1": (8, 8, (3, 3), 4),
    "unet.down_blocks.0.downsamplers.0.conv": (8, 8, (3, 3), 3),
    "unet.mid_block.attentions.0.proj_in": (16, 16, (), 4),
    "unet.time_embedding.linear_1": (32, 8, (), 4),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (16, 16, (), 8),
    "text_encoder.text_model.encoder.layers.1.mlp.fc1": (24, 16, (), 4),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj": (16, 16, (), 4),
}


def diffusion_adapter(seed: int = 0, dtype: torch.dtype = torch.float32) -> Adapter:
    modules = {
        name: random_lowrank(out, inp, r, seed=seed * 100 + i, dtype=dtype, kernel_size=kernel)
        for i, (name, (out, inp, kernel, r)) in enumerate(DIFFUSION_MODULES.items())
    }
    return Adapter(modules, AdapterMetadata(dtype=dtype), "diffusion")


def assert_same_updates(actual: Adapter, expected: Adapter, dtype: torch.dtype = torch.float32) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        want, got = expected[name].to_dense(), actual[name].to_dense()
        assert actual[name].kernel_size == expected[name].kernel_size, name
        assert torch.allclose(got, want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype] * want.abs().max()), name


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("source", FORMATS)
@pytest.mark.parametrize("target", FORMATS)
def test_round_trip_between_formats_keeps_every_update(tmp_path, source, target, dtype):
    original = diffusion_adapter(dtype=dtype)
    first = save_adapter(original, tmp_path / f"a.{source}.safetensors", format=source)
    second = save_adapter(load_adapter(first), tmp_path / f"b.{target}.safetensors", format=target)
    back = load_adapter(second)
    assert back.metadata.format == target and detect_format(second) == target
    assert back.metadata.dtype == dtype
    assert_same_updates(back, original, dtype)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.sampled_from([(), (1, 1), (3, 3)])),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_state_dict_round_trips_on_random_shapes_and_ranks(shapes, seed):
    modules = {
        f"unet.down_blocks.{i}.resnets.0.conv1": random_lowrank(out, inp, r, seed=seed + i, kernel_size=kernel)
        for i, (out, inp, r, kernel) in enumerate(shapes)
    }
    original = Adapter(modules, AdapterMetadata(), "random")
    via_kohya = kohya.from_state_dict(kohya.to_state_dict(original))
    via_diffusers = diffusers.from_state_dict(*diffusers.to_state_dict(original))
    via_peft = peft.from_state_dict(*peft.to_state_dict(original))
    for adapter in (via_kohya, via_diffusers, via_peft):
        assert_same_updates(adapter, original)


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {
            "r": 4,
            "lora_alpha": 16,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.up_proj": 8},
            "alpha_pattern": {"v_proj": 3, "^model.layers.0.mlp.down_proj": 32},
        },
        {"r": 8, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"k_proj": 2}},
    ],
    ids=["plain", "patterns", "rslora"],
)
def test_peft_scaling_matches_peft_and_written_adapter_changes_logits_as_predicted(tmp_path, config):
    from peft import PeftModel

    source = save_random_llama_lora(tmp_path / "source", seed=3, **config)
    adapter = load_adapter(source)
    reference = PeftModel.from_pretrained(tiny_llama(), str(source)).eval()
    for name, lowrank in adapter.items():
        layer = reference.base_model.model.get_submodule(name)
        assert adapter.modules.entries[name].scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
        delta = layer.get_delta_weight("default").to(torch.float64)
        assert torch.allclose(lowrank.to_dense(), delta, atol=1e-6), name

    written = save_adapter(adapter, tmp_path / "ours", format="peft")
    ours = PeftModel.from_pretrained(tiny_llama(), str(written)).eval()
    dense = tiny_llama()
    with torch.no_grad():
        for name, lowrank in adapter.items():
            dense.get_submodule(name).weight += lowrank.to_dense().to(torch.float32)
        ids = torch.arange(12)[None]
        expected = dense(ids).logits
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
        assert torch.allclose(reference(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(tiny_llama()(ids).logits, expected, atol=1e-3)


@pytest.fixture(scope="module")
def pipeline_source(tmp_path_factory, sd_pipe):
    """A diffusers-written LoRA on attention and conv layers, alpha ≠ rank, mixed ranks (via its own metadata)."""
    folder = tmp_path_factory.mktemp("pipeline_source")
    return save_random_pipeline_lora(
        sd_pipe,
        folder,
        seed=1,
        rank=4,
        alpha=6,
        unet_targets=UNET_ATTENTION_TARGETS + UNET_CONV_TARGETS,
        rank_pattern={"to_q": 2, "conv1": 8, "fc1": 3},
    )


def fused_updates(pipe, path, names) -> dict[str, torch.Tensor]:
    """W_fused − W0 of every named module after diffusers' `load_lora_weights` + `fuse_lora`."""
    before = {name: adapted_weight(pipeline_module(pipe, name)) for name in names}
    pipe.load_lora_weights(str(path), adapter_name="test")
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if any(n.startswith(c + ".") for n in names)]
    pipe.fuse_lora(components=components)
    return {name: adapted_weight(pipeline_module(pipe, name)) - before[name] for name in names}


def test_reading_a_diffusers_file_matches_what_diffusers_loads(pipeline_source):
    adapter = load_adapter(pipeline_source)
    ranks = {lr.rank for lr in adapter.values()}
    assert ranks == {2, 3, 4, 8} and {e.scale for e in adapter.modules.entries.values()} == {6 / r for r in ranks}
    fused = fused_updates(tiny_sd_pipeline(), pipeline_source, list(adapter))
    for name, lowrank in adapter.items():
        assert torch.allclose(fused[name], lowrank.to_dense(), atol=1e-6), name


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_pipeline_loads_our_files_with_fused_weights_equal_to_w0_plus_delta(tmp_path, pipeline_source, fmt):
    adapter = load_adapter(pipeline_source)
    written = save_adapter(adapter, tmp_path / f"ours_{fmt}.safetensors", format=fmt)
    fused = fused_updates(tiny_sd_pipeline(), written, list(adapter))
    for name, lowrank in adapter.items():
        assert torch.allclose(fused[name], lowrank.to_dense(), atol=1e-6), name


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_pipeline_loads_our_files_for_both_text_encoders(tmp_path, fmt):
    pipe = tiny_sdxl_pipeline()
    source = save_random_pipeline_lora(pipe, tmp_path / "source", seed=2, rank=4, alpha=2, rank_pattern={"to_k": 2})
    adapter = load_adapter(source)
    assert {n.split(".")[0] for n in adapter} == {"unet", "text_encoder", "text_encoder_2"}
    written = save_adapter(adapter, tmp_path / f"ours_{fmt}.safetensors", format=fmt)
    if fmt == "kohya":
        prefixes = {key.split("_text_model")[0] for key in load_file(written) if key.startswith("lora_te")}
        assert prefixes == {"lora_te1", "lora_te2"}
    fused = fused_updates(pipe, written, list(adapter))
    for name, lowrank in adapter.items():
        assert torch.allclose(fused[name], lowrank.to_dense(), atol=1e-6), name


def test_kohya_and_diffusers_files_of_one_pipeline_name_the_same_modules(tmp_path, sd_pipe, pipeline_source):
    adapter = load_adapter(pipeline_source)
    via_kohya = load_adapter(save_adapter(adapter, tmp_path / "k.safetensors", format="kohya"))
    assert list(via_kohya) == list(adapter)
    for name in adapter:
        pipeline_module(sd_pipe, name)  # every name is a real layer of the pipeline
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in adapter
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in adapter
    assert_same_updates(via_kohya, adapter)


SGM_NAMES = [
    "input_blocks_0_0",
    "input_blocks_1_0_in_layers_2",
    "input_blocks_3_0_op",
    "input_blocks_4_0_emb_layers_1",
    "input_blocks_4_0_skip_connection",
    "input_blocks_4_1_proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "middle_block_0_out_layers_3",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "middle_block_2_in_layers_2",
    "output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
    "output_blocks_2_2_conv",
    "output_blocks_3_0_skip_connection",
    "output_blocks_5_0_out_layers_3",
    "time_embed_0",
    "label_emb_0_2",
    "out_2",
]


def test_kohya_sgm_block_names_map_as_diffusers_maps_them():
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = tiny_sdxl_pipeline().unet
    state_dict = {}
    for name in SGM_NAMES:
        state_dict[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(1, 1)
        state_dict[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(state_dict), unet_config=unet.config)
    theirs = {
        "unet." + key.removeprefix("unet.").removesuffix(".lora_A.weight")
        for key in convert_unet_state_dict_to_peft(converted)
        if key.endswith(".lora_A.weight")
    }
    ours = set(kohya.from_state_dict(state_dict))
    assert ours == theirs
    for name in ours:
        unet.get_submodule(name.removeprefix("unet."))


def test_kohya_sd1_upsampler_without_attention_maps_to_upsamplers():
    assert kohya.from_sgm("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert kohya.from_sgm("output_blocks.4.1.proj_out") == "up_blocks.1.attentions.1.proj_out"


def test_kohya_writer_names_components_and_reader_returns_them():
    modules = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": random_lowrank(4, 4, 2),
        "transformer.single_transformer_blocks.0.attn.to_q": random_lowrank(4, 4, 2),
        "transformer.transformer_blocks.0.ff_context.net.2": random_lowrank(4, 4, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": random_lowrank(4, 4, 2),
        "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wi_0": random_lowrank(4, 4, 2),
    }
    state_dict = kohya.to_state_dict(Adapter(modules))
    assert "lora_unet_transformer_blocks_0_ff_context_net_2.lora_up.weight" in state_dict
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in state_dict
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_down.weight" in state_dict
    assert list(kohya.from_state_dict(state_dict)) == list(modules)


def test_kohya_missing_alpha_means_alpha_equals_rank_and_alpha_scales():
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    prefix = "lora_unet_mid_block_attentions_0_proj_in"
    plain = kohya.from_state_dict({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up})
    scaled = kohya.from_state_dict(
        {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(2.0)}
    )
    name = "unet.mid_block.attentions.0.proj_in"
    assert torch.allclose(plain[name].to_dense(), (up @ down).double())
    assert torch.allclose(scaled[name].to_dense(), 0.5 * (up @ down).double())


def test_diffusers_old_style_keys_and_alpha_scalars_read():
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    state_dict = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        "unet.mid_block.attentions.0.proj_in.lora.down.weight": down,
        "unet.mid_block.attentions.0.proj_in.lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": up,
        "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": down,
        "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": up,
        "text_encoder.encoder.layers.0.mlp.fc1.alpha": torch.tensor(1.0),
    }
    adapter = diffusers.from_state_dict(state_dict)
    assert list(adapter) == [
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.mid_block.attentions.0.proj_in",
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    ]
    expected = (up @ down).double()
    assert torch.allclose(adapter["unet.mid_block.attentions.0.proj_in"].to_dense(), expected)
    assert torch.allclose(adapter["text_encoder.text_model.encoder.layers.0.mlp.fc1"].to_dense(), expected / 2)


def test_diffusers_metadata_patterns_and_rslora_are_honoured():
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    state_dict = {
        "unet.a.to_q.lora_A.weight": down,
        "unet.a.to_q.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
    }
    metadata = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.use_rslora": True,
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 8,
        "text_encoder.alpha_pattern": {"^encoder.layers.0.self_attn.q_proj": 2},
    }
    adapter = diffusers.from_state_dict(state_dict, metadata)
    scales = {name: entry.scale for name, entry in adapter.modules.entries.items()}
    assert scales["unet.a.to_q"] == pytest.approx(8 / math.sqrt(4))
    assert scales["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == pytest.approx(2 / 4)


def test_writers_refuse_adapters_without_a_pipeline_component(tmp_path):
    llm = Adapter({"model.layers.0.self_attn.q_proj": random_lowrank(4, 4, 2)})
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(ValueError, match="--format peft"):
            save_adapter(llm, tmp_path / f"x_{fmt}.safetensors", format=fmt)
    assert not list(tmp_path.iterdir())


def test_diffusers_writer_accepts_a_folder_and_detection_finds_each_format(tmp_path):
    adapter = diffusion_adapter()
    folder = save_adapter(adapter, tmp_path / "lora_folder", format="diffusers")
    assert (folder / diffusers.WEIGHTS_NAME).is_file()
    assert detect_format(folder) == "diffusers"
    assert detect_format(save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")) == "kohya"
    assert detect_format(save_adapter(adapter, tmp_path / "p", format="peft")) == "peft"
    # a diffusers file under another name is recognised by its component prefixes
    renamed = tmp_path / "style.safetensors"
    save_file(load_file(folder / diffusers.WEIGHTS_NAME), str(renamed))
    assert detect_format(renamed) == "diffusers"
    assert_same_updates(load_adapter(renamed), adapter)


@pytest.mark.parametrize("filename", ["kohya_sd1_fp16.safetensors", "diffusers_sd1.safetensors"])
def test_golden_files_read_with_their_names_scales_and_norms(filename):
    """Small hand-made files: kohya with diffusers and SGM names, a missing alpha and fp16; diffusers with
    metadata patterns and a flattened CLIP name. Scales were checked by hand (alpha / r per module)."""
    expected = json.loads((DATA / "expected.json").read_text())[filename]
    adapter = load_adapter(DATA / filename)
    assert adapter.metadata.format == expected["format"]
    assert sorted(adapter) == sorted(expected["modules"])
    for name, facts in expected["modules"].items():
        assert adapter[name].rank == facts["rank"]
        assert adapter.modules.entries[name].scale == pytest.approx(facts["scale"])
        assert float(norm(adapter[name])) == pytest.approx(facts["norm"], rel=1e-6)
