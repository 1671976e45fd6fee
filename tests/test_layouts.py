"""Trainer layouts of DiT families: files built from each layout's documented key names (tiny dims, except where
diffusers' converter hard-codes Flux.1's widths) read to the same ΔW per module as the pinned diffusers' converter
makes of them, written back in their layout, and loaded by diffusers into tiny models built from configs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from diffusers.loaders import lora_conversion_utils as host

from adaptermerge import Adapter, LowRank, merge_adapters
from adaptermerge.errors import AdapterFormatError
from adaptermerge.io import (
    detect_format,
    diffusers,
    flux,
    flux2,
    hunyuan_video,
    kohya,
    load_adapter,
    ltx_video,
    model_family,
    peft_state_dict,
    qwen_image,
    save_adapter,
    wan,
)
from adaptermerge.io._layout import COMFYUI_FACTORS, join_parts
from adaptermerge.lowrank import concat, norm
from tests.factories import dense

H = 16  # hidden width of the tiny blocks
FLUX_WIDTH = 3072  # diffusers' kohya and fal converters split single-block linear1 at Flux.1's own widths


class Builder:
    """A state dict of random LoRA factors under given key stems."""

    def __init__(self, seed: int = 0, down: str = ".lora_down.weight", up: str = ".lora_up.weight") -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.down, self.up = down, up
        self.state_dict: dict[str, torch.Tensor] = {}

    def add(self, stem: str, out_features: int, in_features: int, rank: int, alpha: float | None = None) -> Builder:
        self.state_dict[stem + self.down] = torch.randn(rank, in_features, generator=self.generator)
        self.state_dict[stem + self.up] = torch.randn(out_features, rank, generator=self.generator)
        if alpha is not None:
            self.state_dict[f"{stem}.alpha"] = torch.tensor(float(alpha))
        return self

    def copy(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state_dict.items()}


def host_updates(converted: dict[str, torch.Tensor]) -> Adapter:
    """The updates of a state dict diffusers' converter returned. Its kohya Flux converter leaves the top-level
    modules (final layer, embedders) without the `transformer.` prefix, so its loader drops them; they are compared
    under the prefixed name."""
    prefixed = {k if diffusers.split_component(k) else f"transformer.{k}": v for k, v in converted.items()}
    return diffusers.from_state_dict(prefixed)


def assert_same_updates(ours: Mapping[str, LowRank], theirs: Mapping[str, LowRank]) -> None:
    """Every module's ΔW agrees, measured as ‖ΔW_ours − ΔW_theirs‖ from the factors (Flux.1-wide modules stay
    factored: a dense 12288 × 3072 update per module would make the test slow)."""
    assert set(ours) == set(theirs)
    for name, update in ours.items():
        difference = norm(concat([update, theirs[name]], [1.0, -1.0]).to(torch.float64))
        assert difference <= 1e-5 * max(float(norm(update)), 1.0), name


def kohya_flux(seed: int = 0, rank: int = 4, single: bool = True) -> Builder:
    built = Builder(seed)
    for i in range(2):
        block = f"lora_unet_double_blocks_{i}"
        built.add(f"{block}_img_attn_qkv", 3 * H, H, rank, alpha=rank / 2)
        built.add(f"{block}_txt_attn_qkv", 3 * H, H, rank, alpha=2 * rank)
        built.add(f"{block}_img_attn_proj", H, H, rank)
        built.add(f"{block}_txt_attn_proj", H, H, rank, alpha=1)
        built.add(f"{block}_img_mlp_0", 4 * H, H, rank, alpha=rank)
        built.add(f"{block}_img_mlp_2", H, 4 * H, rank)
        built.add(f"{block}_txt_mlp_0", 4 * H, H, rank)
        built.add(f"{block}_txt_mlp_2", H, 4 * H, rank)
        built.add(f"{block}_img_mod_lin", 6 * H, H, rank, alpha=1)
        built.add(f"{block}_txt_mod_lin", 6 * H, H, rank)
    if single:
        built.add("lora_unet_single_blocks_0_linear1", 7 * FLUX_WIDTH, FLUX_WIDTH, 1, alpha=0.5)
        built.add("lora_unet_single_blocks_0_linear2", FLUX_WIDTH, 5 * FLUX_WIDTH, 1)
        built.add("lora_unet_single_blocks_0_modulation_lin", 3 * H, H, rank)
    # diffusers' converter ignores the alphas of the final layer (a TODO there), so these have none.
    built.add("lora_unet_final_layer_adaLN_modulation_1", 2 * H, H, rank)
    built.add("lora_unet_final_layer_linear", H, H, rank)
    built.add("lora_unet_img_in", H, 8, rank, alpha=1)
    built.add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", H, H, rank, alpha=1)
    return built


def test_kohya_flux_reads_like_diffusers_converter_with_qkv_parts_sharing_a(tmp_path):
    built = kohya_flux()
    assert detect_format_of(built.state_dict) == "kohya-flux"
    ours = flux.KOHYA.from_state_dict(built.copy())
    assert_same_updates(ours, host_updates(host._convert_kohya_flux_lora_to_diffusers(built.copy())))
    q, k, v = (ours[f"transformer.transformer_blocks.0.attn.to_{p}"] for p in "qkv")
    assert torch.equal(q.A, k.A) and torch.equal(k.A, v.A) and q.rank == 4
    assert ours["transformer.single_transformer_blocks.0.proj_mlp"].shape == (4 * FLUX_WIDTH, FLUX_WIDTH)


def test_comfyui_and_fal_flux_read_like_diffusers_converters():
    built = Builder(1)
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv"):
        built.add(f"diffusion_model.{name}", 3 * H, H, 2, alpha=1)
    built.add("diffusion_model.double_blocks.0.img_mlp.0", 4 * H, H, 2)
    built.add("diffusion_model.single_blocks.3.linear1", 7 * FLUX_WIDTH, FLUX_WIDTH, 1, alpha=2)
    assert flux.COMFYUI.detect(Path("x.safetensors"), list(built.state_dict))
    ours = flux.COMFYUI.from_state_dict(built.copy())
    assert_same_updates(ours, host_updates(host._convert_kohya_flux_lora_to_diffusers(built.copy())))

    fal = Builder(2, ".lora_A.weight", ".lora_B.weight")
    prefix = "base_model.model."
    for i in range(19):
        block = f"{prefix}double_blocks.{i}"
        for name, (out, inn) in {
            "img_attn.qkv": (3 * H, H),
            "txt_attn.qkv": (3 * H, H),
            "img_attn.proj": (H, H),
        }.items():
            fal.add(f"{block}.{name}", out, inn, 1)
        for name in (
            "txt_attn.proj",
            "img_mlp.0",
            "img_mlp.2",
            "txt_mlp.0",
            "txt_mlp.2",
            "img_mod.lin",
            "txt_mod.lin",
        ):
            fal.add(f"{block}.{name}", H, H, 1)
    for i in range(38):
        fal.add(f"{prefix}single_blocks.{i}.linear1", 7 * FLUX_WIDTH, FLUX_WIDTH, 1)
        fal.add(f"{prefix}single_blocks.{i}.linear2", H, 5 * H, 1)
        fal.add(f"{prefix}single_blocks.{i}.modulation.lin", 3 * H, H, 1)
    fal.add(f"{prefix}final_layer.linear", 8, H, 1)  # the only top-level module fal's converter takes
    keys = list(fal.state_dict)
    assert flux.FAL.detect(Path("x.safetensors"), keys) and not flux.KOHYA.detect(Path("x"), keys)
    ours = flux.FAL.from_state_dict(fal.copy())
    assert_same_updates(ours, host_updates(host._convert_fal_kontext_lora_to_diffusers(fal.copy())))


def test_wan_comfyui_with_i2v_image_attention_and_musubi_read_like_diffusers_converters():
    comfy = Builder(3)
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                comfy.add(f"diffusion_model.blocks.{i}.{attn}.{proj}", H, H, 2, alpha=1 if proj == "q" else None)
        for proj in ("k_img", "v_img"):
            comfy.add(f"diffusion_model.blocks.{i}.cross_attn.{proj}", H, H, 2, alpha=4)
        comfy.add(f"diffusion_model.blocks.{i}.ffn.0", 4 * H, H, 2).add(
            f"diffusion_model.blocks.{i}.ffn.2", H, 4 * H, 2
        )
    comfy.add("diffusion_model.head.head", 8, H, 2).add("diffusion_model.text_embedding.0", H, 12, 2)
    comfy.add("diffusion_model.img_emb.proj.1", H, H, 2)
    assert detect_format_of(comfy.state_dict) == "comfyui-wan"
    ours = wan.COMFYUI.from_state_dict(comfy.copy())
    assert "transformer.blocks.1.attn2.add_k_proj" in ours
    assert_same_updates(ours, host_updates(host._convert_non_diffusers_wan_lora_to_diffusers(comfy.copy())))

    musubi = Builder(4)
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                musubi.add(f"lora_unet_blocks_{i}_{attn}_{proj}", H, H, 2, alpha=1)
        musubi.add(f"lora_unet_blocks_{i}_cross_attn_k_img", H, H, 2, alpha=1)
        musubi.add(f"lora_unet_blocks_{i}_cross_attn_v_img", H, H, 2, alpha=8)
        musubi.add(f"lora_unet_blocks_{i}_ffn_0", 4 * H, H, 2, alpha=2).add(
            f"lora_unet_blocks_{i}_ffn_2", H, 4 * H, 2, 2
        )
    assert detect_format_of(musubi.state_dict) == "musubi-wan"
    ours = wan.MUSUBI.from_state_dict(musubi.copy())
    assert_same_updates(ours, host_updates(host._convert_musubi_wan_lora_to_diffusers(musubi.copy())))


def load_kohya(state_dict: dict[str, torch.Tensor]) -> Adapter:
    return kohya.from_state_dict(state_dict)


def detect_format_of(state_dict: dict[str, torch.Tensor]) -> str:
    """The format detection picks for a file holding `state_dict`."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        save_file(state_dict, path)
        return detect_format(path)


def test_qwen_image_comfyui_and_prefixless_peft_state_dicts_read_like_diffusers():
    comfy = Builder(5)
    for name in ("attn.to_q", "attn.add_k_proj", "img_mlp.net.0.proj", "txt_mod.1"):
        comfy.add(f"diffusion_model.transformer_blocks.0.{name}", H, H, 2, alpha=1)
    assert detect_format_of(comfy.state_dict) == "comfyui-qwen-image"
    ours = qwen_image.COMFYUI.from_state_dict(comfy.copy())
    assert_same_updates(ours, host_updates(host._convert_non_diffusers_qwen_lora_to_diffusers(comfy.copy())))

    peft_sd = Builder(6, ".lora_A.weight", ".lora_B.weight")
    peft_sd.add("transformer_blocks.0.attn.to_q", H, H, 2).add("single_transformer_blocks.1.proj_mlp", 4 * H, H, 2)
    assert detect_format_of(peft_sd.state_dict) == "peft-transformer"
    ours = peft_state_dict.LAYOUT.from_state_dict(peft_sd.copy())
    prefixed = {f"transformer.{k}": v for k, v in peft_sd.copy().items()}
    assert_same_updates(ours, diffusers.from_state_dict(prefixed))


def test_kohya_flux_round_trip_keeps_keys_and_a_merge_keeps_qkv_a_shared(tmp_path):
    first, second = kohya_flux(7, single=False), kohya_flux(8, rank=2, single=False)
    paths = []
    for i, built in enumerate((first, second)):
        paths.append(tmp_path / f"in{i}.safetensors")
        save_adapter(flux.KOHYA.from_state_dict(built.copy()), paths[-1], format="kohya-flux")
    again = load_adapter(paths[0])
    assert_same_updates(again, flux.KOHYA.from_state_dict(first.copy()))
    assert {k.rsplit(".", 2)[0] for k in flux.KOHYA.to_state_dict(again)} == {
        k.rsplit(".", 2)[0] for k in first.state_dict
    }

    merged = merge_adapters(paths, [0.7, -0.4])
    out = save_adapter(merged, tmp_path / "merged.safetensors")
    assert detect_format(out) == "kohya-flux"  # the inputs' shared layout by default
    written = flux.KOHYA.to_state_dict(merged)
    # q, k and v share the concatenated A: the fused module has rank 4 + 2, not 3 × 6.
    assert written["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, H)
    theirs = flux.KOHYA.from_state_dict(second.copy())
    expected = {
        name: concat([a, theirs[name]], [0.7, -0.4]) for name, a in flux.KOHYA.from_state_dict(first.copy()).items()
    }
    assert_same_updates(load_adapter(out), expected)
    host_read = host_updates(host._convert_kohya_flux_lora_to_diffusers(dict(written)))
    assert_same_updates(load_adapter(out), host_read)

    # TIES computes each part's A on its own, equal up to rounding: the joined module keeps the parts' rank.
    ties = merge_adapters(paths, [0.7, -0.4], "ties", density=0.5)
    joined = flux.KOHYA.to_state_dict(ties)
    assert (
        joined["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0]
        == ties["transformer.transformer_blocks.0.attn.to_q"].rank
    )
    assert_same_updates(flux.KOHYA.from_state_dict(joined), {k: v.to(torch.float32) for k, v in ties.items()})


def test_fused_parts_with_different_a_join_block_diagonally_and_missing_parts_are_zero():
    from tests.factories import random_lowrank

    q, v = random_lowrank(H, H, 2, seed=1), random_lowrank(H, H, 3, seed=2)
    rule = flux.NAMES.to_canonical("double_blocks.0.img_attn.qkv")[0]
    joined = join_parts(rule, {0: q, 2: v}, "test")
    assert joined.rank == 5 and joined.shape == (3 * H, H)
    expected = torch.cat([q.to_dense(), torch.zeros(H, H, dtype=torch.float64), v.to_dense()])
    torch.testing.assert_close(joined.to_dense(), expected)

    # bfloat16 parts whose A differ by one rounding (A computed per part) share A; a real difference does not.
    A = q.A.to(torch.bfloat16)
    nudged = A.clone()
    nudged[0, 0] = torch.nextafter(A[0, 0].float(), torch.tensor(10.0)).to(torch.bfloat16)
    if torch.equal(nudged, A):  # nextafter in float32 may round back; step one bfloat16 ulp instead
        nudged[0, 0] = A[0, 0] + A[0, 0].abs() * torch.finfo(torch.bfloat16).eps
    halves = {0: LowRank(A, q.B.to(torch.bfloat16)), 1: LowRank(nudged, v.B[:, :2].to(torch.bfloat16))}
    assert join_parts(rule, halves, "test").rank == 2
    halves[1] = LowRank(v.A[:2].to(torch.bfloat16), halves[1].B)
    assert join_parts(rule, halves, "test").rank == 4


def test_modules_a_layout_cannot_name_are_refused_naming_the_module():
    peft_names = flux.KOHYA.from_state_dict(kohya_flux(single=False).copy())
    stray = peft_names.with_modules({"transformer.blocks.0.attn1.to_q": next(iter(peft_names.values()))})
    with pytest.raises(AdapterFormatError, match=r"blocks\.0\.attn1\.to_q.*kohya-flux"):
        flux.KOHYA.to_state_dict(stray)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def test_written_kohya_flux_file_loads_into_a_tiny_flux_transformer_with_the_reference_weights(tmp_path):
    adapter = flux.KOHYA.from_state_dict(kohya_flux(9, single=False).copy())
    model = _tiny_flux()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_adapter(adapter, tmp_path / "out.safetensors", format="kohya-flux")
    from safetensors.torch import load_file

    converted = host._convert_kohya_flux_lora_to_diffusers(load_file(path))
    # The converter leaves the final layer and embedders without `transformer.`, so diffusers loads the blocks only.
    converted = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    loaded = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert len(loaded) == 2 * (8 + 2 * 3)  # per block: 8 plain modules, two fused qkv split in three each
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="merged")
    model.fuse_lora()
    fused = model.state_dict()
    updates = dense(adapter)
    for name in loaded:
        key = name.removeprefix("transformer.") + ".weight"
        fused_key = key if key in fused else key.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(fused[fused_key].double(), base[key].double() + updates[name], rtol=1e-4, atol=1e-4)


def test_onetrainer_flux_and_kohya_qwen_image_read_like_diffusers_converters():
    onetrainer = Builder(10)
    # Attention and embedders only: diffusers' converter of these files names every other block module by its block
    # alone (`transformer_blocks.0` for `…_ff_net_0_proj`), so its loader cannot place them.
    for name in (
        "transformer_blocks_0_attn_to_q",
        "transformer_blocks_0_attn_add_k_proj",
        "transformer_blocks_1_attn_to_out_0",
    ):
        onetrainer.add(f"lora_transformer_{name}", H, H, 2, alpha=1)
    onetrainer.add("lora_transformer_single_transformer_blocks_1_attn_to_k", H, H, 2, alpha=4)
    onetrainer.add("lora_transformer_time_text_embed_guidance_embedder_linear_1", H, H, 2, alpha=2)
    onetrainer.add("lora_te1_text_model_encoder_layers_0_mlp_fc1", H, H, 2, alpha=2)
    assert detect_format_of(onetrainer.state_dict) == "kohya"
    ours = load_kohya(onetrainer.copy())
    assert model_family(ours) == "Flux.1"
    assert_same_updates(ours, host_updates(host._convert_kohya_flux_lora_to_diffusers(onetrainer.copy())))

    qwen = Builder(11)
    for name in ("attn_to_q", "attn_add_q_proj", "img_mlp_net_0_proj", "txt_mod_1", "attn_to_add_out"):
        qwen.add(f"lora_unet_transformer_blocks_3_{name}", H, H, 2, alpha=1)
    ours = load_kohya(qwen.copy())
    assert model_family(ours) == "Qwen-Image"
    assert_same_updates(ours, host_updates(host._convert_non_diffusers_qwen_lora_to_diffusers(qwen.copy())))


def test_families_are_named_and_merges_across_families_refused_naming_both(tmp_path, capsys):
    from click.testing import CliRunner

    from adaptermerge.cli import main
    from adaptermerge.errors import IncompatibleAdaptersError

    flux_file, wan_file = tmp_path / "flux.safetensors", tmp_path / "wan.safetensors"
    save_adapter(flux.KOHYA.from_state_dict(kohya_flux(12, single=False).copy()), flux_file, format="kohya-flux")
    save_adapter(wan.MUSUBI.from_state_dict(Builder(13).add("lora_unet_blocks_0_ffn_0", H, H, 2).copy()), wan_file)
    result = CliRunner().invoke(main, ["inspect", str(flux_file)])
    assert result.exit_code == 0 and "family=Flux.1" in result.output and "format=kohya-flux" in result.output
    with pytest.raises(IncompatibleAdaptersError, match=r"'flux' is Flux\.1, 'wan' is Wan"):
        merge_adapters([flux_file, wan_file])
    result = CliRunner().invoke(
        main, ["merge", str(flux_file), str(wan_file), "-o", str(tmp_path / "out.safetensors")]
    )
    assert result.exit_code == 2 and "different model families" in result.output


def wan_with_side_cars(seed: int) -> Builder:
    """A lightx2v-style ComfyUI Wan LoRA: factors plus bias deltas, a norm delta and a modulation delta."""
    built = Builder(seed)
    for proj in "qkvo":
        built.add(f"diffusion_model.blocks.0.self_attn.{proj}", H, H, 2, alpha=1)
        built.state_dict[f"diffusion_model.blocks.0.self_attn.{proj}.diff_b"] = torch.randn(
            H, generator=built.generator
        )
    built.add("diffusion_model.blocks.0.ffn.0", 4 * H, H, 2)
    built.state_dict["diffusion_model.blocks.0.norm3.diff"] = torch.randn(H, generator=built.generator)
    built.state_dict["diffusion_model.blocks.0.diff_m"] = torch.randn(1, 6, H, generator=built.generator)
    return built


def test_side_cars_are_read_summed_under_every_method_and_written_back(tmp_path):
    first, second = wan_with_side_cars(20), wan_with_side_cars(21)
    ours = wan.COMFYUI.from_state_dict(first.copy())
    assert set(ours.side_cars) == {
        *(f"transformer.blocks.0.attn1.{c}.diff_b" for c in ("to_q", "to_k", "to_v", "to_out.0")),
        "transformer.blocks.0.norm3.diff",
        "transformer.blocks.0.diff_m",
    }
    # diffusers' converter turns diff_b into peft's lora_B.bias of the same module (and drops the others).
    host_sd = host._convert_non_diffusers_wan_lora_to_diffusers(first.copy())
    torch.testing.assert_close(
        ours.side_cars["transformer.blocks.0.attn1.to_q.diff_b"],
        host_sd["transformer.blocks.0.attn1.to_q.lora_B.bias"],
    )
    paths = []
    for i, built in enumerate((first, second)):
        paths.append(tmp_path / f"wan{i}.safetensors")
        save_adapter(wan.COMFYUI.from_state_dict(built.copy()), paths[-1])
    for method, params in (("linear", {}), ("ties", {"density": 0.5}), ("svd", {})):
        merged = merge_adapters(paths, [0.6, 0.3], method, rank=2 if method == "svd" else None, **params)
        for name in ours.side_cars:
            key = first_key(first.state_dict, name)
            expected = 0.6 * first.state_dict[key] + 0.3 * second.state_dict[key]
            torch.testing.assert_close(merged.side_cars[name], expected, msg=f"{method} {name}")
    out = save_adapter(merged, tmp_path / "merged.safetensors")
    from safetensors.torch import load_file

    written = load_file(out)
    expected = (
        0.6 * first.state_dict["diffusion_model.blocks.0.diff_m"]
        + 0.3 * second.state_dict["diffusion_model.blocks.0.diff_m"]
    )
    torch.testing.assert_close(written["diffusion_model.blocks.0.diff_m"], expected)
    side_car_keys = {k for k in first.state_dict if k.endswith((".diff", ".diff_b", ".diff_m"))}
    assert {k for k in written if k.endswith((".diff", ".diff_b", ".diff_m"))} == side_car_keys
    with pytest.raises(AdapterFormatError, match=r"side-car tensors .*--format comfyui-wan"):
        save_adapter(merged, tmp_path / "merged_diffusers.safetensors", format="diffusers")


def first_key(state_dict: dict[str, torch.Tensor], side_car: str) -> str:
    """The ComfyUI Wan key of a side-car read as `side_car` (the test files' naming)."""
    module, _, kind = side_car.rpartition(".")
    path = module.removeprefix("transformer.")
    for ours, theirs in (("attn1.to_out.0", "self_attn.o"), ("attn1.to_", "self_attn.")):
        path = path.replace(ours, theirs)
    return f"diffusion_model.{path}.{kind}"


def test_fused_side_cars_split_like_b_and_join_back():
    built = kohya_flux(22, single=False)
    bias = torch.randn(3 * H, generator=built.generator)
    built.state_dict["lora_unet_double_blocks_0_img_attn_qkv.diff_b"] = bias
    ours = flux.KOHYA.from_state_dict(built.copy())
    for i, proj in enumerate("qkv"):
        torch.testing.assert_close(
            ours.side_cars[f"transformer.transformer_blocks.0.attn.to_{proj}.diff_b"], bias[i * H : (i + 1) * H]
        )
    torch.testing.assert_close(flux.KOHYA.to_state_dict(ours)["lora_unet_double_blocks_0_img_attn_qkv.diff_b"], bias)


def test_unknown_keys_are_refused_unless_skipped_and_then_counted(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from adaptermerge.cli import main

    built = wan_with_side_cars(23)
    built.state_dict["diffusion_model.blocks.0.self_attn.q.lokr_w1"] = torch.ones(2, 2)
    path = tmp_path / "odd.safetensors"
    save_file(built.copy(), path)
    with pytest.raises(AdapterFormatError, match="lokr_w1"):
        load_adapter(path)
    adapter = load_adapter(path, skip_unknown=True)
    assert adapter.metadata.extra["unused_keys"] == ["diffusion_model.blocks.0.self_attn.q.lokr_w1"]
    result = CliRunner().invoke(
        main, ["-v", "merge", str(path), "--skip-unknown", "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "6 side-car tensors, 1 unused keys" in result.output and "unused key of odd: " in result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--skip-unknown"])
    assert "transformer.blocks.0.diff_m" in result.output and "1 unused keys" in result.output


def test_onetrainer_flux_merged_and_written_as_kohya_gets_the_kohya_flux_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    built = Builder(30)
    for proj in ("to_q", "to_k"):
        built.add(f"lora_transformer_transformer_blocks_0_attn_{proj}", H, H, 2, alpha=1)
    built.add("lora_transformer_single_transformer_blocks_0_attn_to_v", H, H, 2, alpha=4)
    path = tmp_path / "onetrainer.safetensors"
    save_file(built.copy(), path)
    merged = merge_adapters([path, path], [0.5, 0.25])
    out = save_adapter(merged, tmp_path / "out.safetensors", format="kohya")
    assert detect_format(out) == "kohya-flux"
    written = load_file(out)
    # OneTrainer trains q and k with their own A: the fused qkv stacks them with B block-diagonal, at the rank of
    # the stack (2 + 2: the file merged with itself adds no direction), and the missing v rows are zero.
    assert written["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, H)
    ours = load_adapter(out)
    assert_same_updates(
        {k: v for k, v in ours.items() if k in merged}, {k: concat([v], [1.0]) for k, v in merged.items()}
    )
    # diffusers' converter splits q/k/v at Flux.1's widths for single blocks, so compare the double block only
    double = {k: v for k, v in written.items() if "double_blocks" in k}
    theirs = host_updates(host._convert_kohya_flux_lora_to_diffusers(double))
    assert_same_updates({k: ours[k] for k in theirs}, theirs)


def test_xlabs_flux_reads_like_diffusers_converter_and_round_trips():
    xlabs = Builder(31, ".down.weight", ".up.weight")
    for i in range(2):
        for stream in "12":
            xlabs.add(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * H, H, 4)
            xlabs.add(f"double_blocks.{i}.processor.proj_lora{stream}", H, H, 4)
    xlabs.add("single_blocks.0.processor.qkv_lora", 3 * H, H, 4).add("single_blocks.0.processor.proj_lora", H, H, 4)
    assert detect_format_of(xlabs.state_dict) == "xlabs-flux"
    ours = flux.XLABS.from_state_dict(xlabs.copy())
    assert_same_updates(ours, host_updates(host._convert_xlabs_flux_lora_to_diffusers(xlabs.copy())))
    written = flux.XLABS.to_state_dict(ours)
    assert set(written) == set(xlabs.state_dict)  # x-flux files carry no alphas
    for key, value in xlabs.state_dict.items():
        torch.testing.assert_close(written[key], value)


def assert_fused_equals_reference(model, converted: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Load diffusers' conversion of our written file into `model`, fuse, and compare every loaded module's weight
    (and bias, for side-car bias deltas) with W0 plus our dense update."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="merged")
    model.fuse_lora()
    fused = model.state_dict()
    loaded = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert loaded and loaded <= set(adapter)
    for name in loaded:
        path = name.removeprefix("transformer.")
        for kind, delta in (("weight", adapter[name].to_dense()), ("bias", adapter.side_cars.get(f"{name}.diff_b"))):
            if delta is None:
                continue
            key = f"{path}.{kind}" if f"{path}.{kind}" in fused else f"{path}.base_layer.{kind}"
            expected = base[f"{path}.{kind}"].double() + delta.double().reshape(base[f"{path}.{kind}"].shape)
            torch.testing.assert_close(fused[key].double(), expected, rtol=1e-4, atol=1e-4, msg=f"{name}.{kind}")


def test_written_comfyui_wan_file_loads_into_a_tiny_wan_transformer_with_its_bias_deltas(tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    built = wan_with_side_cars(40)
    del built.state_dict["diffusion_model.blocks.0.norm3.diff"], built.state_dict["diffusion_model.blocks.0.diff_m"]
    built.add("diffusion_model.blocks.1.cross_attn.k", H, H, 2, alpha=4).add(
        "diffusion_model.blocks.1.ffn.2", H, 4 * H, 2
    )
    merged = merge_adapters([wan.COMFYUI.from_state_dict(built.copy())] * 2, [0.5, 0.25])
    path = save_adapter(merged, tmp_path / "wan.safetensors")
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=4 * H,
        num_layers=2,
        rope_max_seq_len=32,
    )
    converted = host._convert_non_diffusers_wan_lora_to_diffusers(load_file(path))
    assert any(k.endswith("lora_B.bias") for k in converted)
    assert_fused_equals_reference(model, converted, merged)


def test_written_comfyui_qwen_image_file_loads_into_a_tiny_qwen_image_transformer(tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    built = Builder(41)
    for name, (out, inn) in {"attn.to_q": (H, H), "attn.add_v_proj": (H, H), "img_mlp.net.0.proj": (4 * H, H)}.items():
        built.add(f"diffusion_model.transformer_blocks.0.{name}", out, inn, 2, alpha=1)
    built.add("diffusion_model.transformer_blocks.0.txt_mod.1", 6 * H, H, 2)
    adapter = qwen_image.COMFYUI.from_state_dict(built.copy())
    path = save_adapter(merge_adapters([adapter, adapter], [1.0, -0.5]), tmp_path / "qwen.safetensors")
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    converted = host._convert_non_diffusers_qwen_lora_to_diffusers(load_file(path))
    assert_fused_equals_reference(model, converted, load_adapter(path))


def test_kohya_sd3_follows_the_mmdit_names_of_diffusers_single_file_converter():
    """diffusers has no converter for kohya SD3 LoRAs; the trainer names Stability's MMDiT modules, which diffusers'
    single-file converter maps onto `SD3Transformer2DModel`. A checkpoint whose weights are the LoRA's dense updates
    (zeros elsewhere) converted by it must give our per-module updates, including the last block's pre-only text
    stream (two chunks, halves swapped) and SD3.5 Medium's second attention."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from adaptermerge.io import sd3

    built = Builder(50)
    lora = {
        "joint_blocks_0_x_block_attn_qkv": (3 * H, H),
        "joint_blocks_0_context_block_attn_qkv": (3 * H, H),
        "joint_blocks_0_x_block_attn2_qkv": (3 * H, H),
        "joint_blocks_0_context_block_adaLN_modulation_1": (6 * H, H),
        "joint_blocks_0_context_block_mlp_fc2": (H, 4 * H),
        "joint_blocks_1_x_block_attn_proj": (H, H),
        "joint_blocks_1_context_block_adaLN_modulation_1": (2 * H, H),
        "t_embedder_mlp_0": (H, 8),
        "final_layer_adaLN_modulation_1": (2 * H, H),
    }
    for name, (out, inn) in lora.items():
        built.add(f"lora_unet_{name}", out, inn, 2, alpha=1)
    assert detect_format_of(built.state_dict) == "kohya-sd3"
    ours = sd3.KOHYA.from_state_dict(built.copy())
    dense_of = {}
    for name in lora:
        down, up = (
            built.state_dict[f"lora_unet_{name}.lora_down.weight"],
            built.state_dict[f"lora_unet_{name}.lora_up.weight"],
        )
        dense_of[sd3.NAMES.to_canonical(name, flat=True)[0].original.replace("{i}", name.split("_")[2])] = (
            0.5 * up @ down
        )
    shapes = {
        "pos_embed": (1, 4, H),
        "x_embedder.proj": (H, 4, 2, 2),
        "t_embedder.mlp.0": (H, 8),
        "t_embedder.mlp.2": (H, H),
    }
    shapes |= {"context_embedder": (H, 12), "y_embedder.mlp.0": (H, 8), "y_embedder.mlp.2": (H, H)}
    shapes |= {"final_layer.linear": (16, H), "final_layer.adaLN_modulation.1": (2 * H, H)}
    for i, last in ((0, False), (1, True)):
        for stream in ("x_block", "context_block"):
            shapes[f"joint_blocks.{i}.{stream}.attn.qkv"] = (3 * H, H)
            shapes[f"joint_blocks.{i}.{stream}.adaLN_modulation.1"] = (
                2 * H if last and stream == "context_block" else 6 * H,
                H,
            )
            if not (last and stream == "context_block"):
                shapes |= {
                    f"joint_blocks.{i}.{stream}.attn.proj": (H, H),
                    f"joint_blocks.{i}.{stream}.mlp.fc1": (4 * H, H),
                }
                shapes[f"joint_blocks.{i}.{stream}.mlp.fc2"] = (H, 4 * H)
    shapes |= {"joint_blocks.0.x_block.attn2.qkv": (3 * H, H), "joint_blocks.0.x_block.attn2.proj": (H, H)}
    checkpoint = {"pos_embed": torch.zeros(shapes.pop("pos_embed"))}
    for path, shape in shapes.items():
        checkpoint[f"{path}.weight"] = dense_of.get(path, torch.zeros(shape))
        checkpoint[f"{path}.bias"] = torch.zeros(shape[0])
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert len(ours) == 3 + 3 + 3 + 6
    for name, update in ours.items():
        torch.testing.assert_close(
            update.to_dense().float(), converted[f"{name.removeprefix('transformer.')}.weight"], msg=name
        )
    written = sd3.KOHYA.to_state_dict(ours)
    assert {k.rsplit(".", 2)[0] for k in written} == {k.rsplit(".", 2)[0] for k in built.state_dict}
    assert_same_updates(sd3.KOHYA.from_state_dict(written), ours)


def test_a_layout_file_with_an_odd_module_is_still_detected_and_skipped_by_name(tmp_path):
    built = kohya_flux(51, single=False)
    built.add("lora_unet_double_blocks_0_img_attn_norm_query_norm", H, H, 2)
    assert detect_format_of(built.state_dict) == "kohya-flux"
    with pytest.raises(AdapterFormatError, match="query_norm"):
        flux.KOHYA.from_state_dict(built.copy())
    from adaptermerge.io._source import skipping_unknown_keys

    with skipping_unknown_keys() as unused:
        adapter = flux.KOHYA.from_state_dict(built.copy())
    assert len(unused) == 2 and "transformer.transformer_blocks.0.attn.to_q" in adapter


def test_kohya_modules_the_reader_cannot_read_are_skipped_whole_when_asked(tmp_path):
    from safetensors.torch import save_file

    from adaptermerge.io import kohya as kohya_io

    built = Builder(52)
    built.add("lora_unet_down_blocks_0_resnets_0_conv1", H, H, 2)
    built.state_dict["lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight"] = torch.zeros(2, 2, 3, 3)
    built.add("lora_unet_mid_block_attentions_0_proj_in", H, H, 2)
    path = tmp_path / "tucker.safetensors"
    save_file(built.copy(), path)
    with pytest.raises(AdapterFormatError, match="LyCORIS"):
        load_adapter(path)
    adapter = load_adapter(path, skip_unknown=True)
    assert list(adapter) == ["unet.mid_block.attentions.0.proj_in"]  # the Tucker module is left out whole
    assert len(adapter.metadata.extra["unused_keys"]) == 3 and adapter.metadata.format == kohya_io.FORMAT


def test_comfyui_hunyuan_video_reads_like_diffusers_converter():
    built = Builder(53, ".lora_A.weight", ".lora_B.weight")
    block = "diffusion_model.double_blocks.0"
    for stream in ("img", "txt"):
        built.add(f"{block}.{stream}_attn_qkv", 3 * H, H, 2).add(f"{block}.{stream}_attn_proj", H, H, 2)
        built.add(f"{block}.{stream}_mlp.fc1", 4 * H, H, 2).add(f"{block}.{stream}_mod.linear", 6 * H, H, 2)
    built.add("diffusion_model.single_blocks.1.linear1", 7 * FLUX_WIDTH, FLUX_WIDTH, 1)
    built.add("diffusion_model.single_blocks.1.modulation.linear", 3 * H, H, 2)
    refiner = "diffusion_model.txt_in.individual_token_refiner.blocks.0"
    built.add(f"{refiner}.self_attn_proj", H, H, 2).add(f"{refiner}.mlp.fc2", H, 4 * H, 2)
    built.add(f"{refiner}.adaLN_modulation.1", 2 * H, H, 2).add("diffusion_model.txt_in.input_embedder", H, 8, 2)
    built.add("diffusion_model.time_in.mlp.0", H, 8, 2).add("diffusion_model.vector_in.in_layer", H, 8, 2)
    # Left out of the comparison, where diffusers' converter is wrong: it splits the refiner's fused
    # `self_attn_qkv` lora_A into three by rank as well as lora_B by rows, and swaps the halves of the final layer's
    # lora_A rows as well as lora_B's; both change the update. Our reading of those modules is checked below.
    assert detect_format_of(built.state_dict) == "comfyui-hunyuan-video"
    ours = hunyuan_video.COMFYUI.from_state_dict(built.copy())
    assert_same_updates(ours, host_updates(host._convert_hunyuan_video_lora_to_diffusers(built.copy())))
    built.add(f"{refiner}.self_attn_qkv", 3 * H, H, 2).add(
        "diffusion_model.final_layer.adaLN_modulation.1", 2 * H, H, 2
    )
    ours = hunyuan_video.COMFYUI.from_state_dict(built.copy())
    up, down = (built.state_dict[f"{refiner}.self_attn_qkv.lora_{r}.weight"] for r in "BA")
    refined = "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_k"
    torch.testing.assert_close(ours[refined].to_dense().float(), up[H : 2 * H] @ down)
    up, down = (built.state_dict[f"diffusion_model.final_layer.adaLN_modulation.1.lora_{r}.weight"] for r in "BA")
    torch.testing.assert_close(
        ours["transformer.norm_out.linear"].to_dense().float(), torch.cat([up[H:], up[:H]]) @ down
    )
    assert model_family(ours) == "HunyuanVideo"
    written = hunyuan_video.COMFYUI.to_state_dict(ours)
    stems = {k.rsplit(".lora_", 1)[0] for k in built.state_dict}
    assert {k.rsplit(".lora_", 1)[0] for k in written if not k.endswith(".alpha")} == stems


def comfyui_ltx(seed: int, down: str = ".lora_A.weight", up: str = ".lora_B.weight") -> Builder:
    """A ComfyUI LTX-Video LoRA over the modules whose original names are diffusers' (tiny widths)."""
    built = Builder(seed, down, up)
    for i in range(2):
        block = f"diffusion_model.transformer_blocks.{i}"
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
            built.add(f"{block}.{name}", H, H, 2, alpha=1 + i)
        built.add(f"{block}.attn2.to_k", H, 8, 3).add(f"{block}.attn2.to_v", H, 8, 2, alpha=4)
        built.add(f"{block}.ff.net.0.proj", 4 * H, H, 2).add(f"{block}.ff.net.2", H, 4 * H, 2, alpha=1)
    built.add("diffusion_model.caption_projection.linear_1", H, 8, 2).add("diffusion_model.proj_out", 4, H, 2)
    return built


def test_comfyui_ltx_video_reads_like_diffusers_converters_and_loads_into_a_tiny_ltx_transformer(tmp_path):
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    # LTX-Video-Trainer's files (peft suffixes, as diffusers reads them) and ComfyUI's own (kohya suffixes).
    built = comfyui_ltx(60)
    assert detect_format_of(built.state_dict) == "comfyui-ltx-video"
    ours = ltx_video.COMFYUI.from_state_dict(built.copy())
    assert_same_updates(ours, host_updates(host._convert_non_diffusers_ltxv_lora_to_diffusers(built.copy())))
    kohya_suffixes = comfyui_ltx(60, *COMFYUI_FACTORS[0])
    assert detect_format_of(kohya_suffixes.state_dict) == "comfyui-ltx-video"
    assert_same_updates(ltx_video.COMFYUI.from_state_dict(kohya_suffixes.copy()), ours)
    # The original model's patch embedder and modulation: a checkpoint holding their dense updates (alpha / rank
    # times up @ down), renamed by diffusers' single-file converter, gives our modules (its LoRA converter only swaps
    # the prefix, so diffusers cannot load these two from a LoRA file).
    original = Builder(61).add("diffusion_model.patchify_proj", H, 4, 2, alpha=1)
    original.add("diffusion_model.adaln_single.emb.timestep_embedder.linear_1", H, 8, 2)
    original.add("diffusion_model.adaln_single.linear", 6 * H, H, 4, alpha=2)
    factors = original.state_dict
    stems = {k.removesuffix(".lora_down.weight") for k in factors if k.endswith(".lora_down.weight")}

    def update(stem: str) -> torch.Tensor:
        down, up = factors[f"{stem}.lora_down.weight"], factors[f"{stem}.lora_up.weight"]
        return up @ down * (float(factors.get(f"{stem}.alpha", down.shape[0])) / down.shape[0])

    renamed = convert_ltx_transformer_checkpoint_to_diffusers({f"model.{s}.weight": update(s) for s in stems})
    ours = ltx_video.COMFYUI.from_state_dict(original.copy())
    assert set(ours) == {f"transformer.{k.removesuffix('.weight')}" for k in renamed}
    for key, expected in renamed.items():
        torch.testing.assert_close(ours[f"transformer.{key.removesuffix('.weight')}"].to_dense().float(), expected)
    written = ltx_video.COMFYUI.to_state_dict(ours)
    assert {k.rsplit(".lora_", 1)[0] for k in written if not k.endswith(".alpha")} == stems

    merged = merge_adapters([ltx_video.COMFYUI.from_state_dict(comfyui_ltx(62).copy())] * 2, [1.0, -0.25])
    path = save_adapter(merged, tmp_path / "ltx.safetensors")
    assert set(load_file(path)) == {k for k in comfyui_ltx(62).state_dict if not k.endswith(".alpha")}
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=8,
        num_layers=2,
        caption_channels=8,
    )
    converted = host._convert_non_diffusers_ltxv_lora_to_diffusers(load_file(path))
    assert_fused_equals_reference(model, converted, merged)


def test_ltx_video_is_named_by_its_own_modules_and_widths_and_left_open_on_shared_block_modules(tmp_path):
    """LTX-Video's block modules are also Mochi's, PixArt's, CogView4's...: only its own modules (or the 2B's 2048-wide
    cross-attention keys) name it; block modules alone at its widths name no family for sure, and merge with any."""
    from click.testing import CliRunner

    from adaptermerge.cli import main
    from adaptermerge.errors import IncompatibleAdaptersError
    from adaptermerge.io._family import LTX_OR_DIT, LTX_OR_LTX2

    def adapter(*modules: tuple[str, int, int]) -> Adapter:
        built = Builder(70, ".lora_A.weight", ".lora_B.weight")
        for path, out_features, in_features in modules:
            built.add(f"transformer.{path}", out_features, in_features, 1)
        return diffusers.from_state_dict(built.copy())

    def family(*modules: tuple[str, int, int]) -> str | None:
        return model_family(adapter(*modules))

    attention = ("transformer_blocks.0.attn1.to_q", 2048, 2048)
    assert family(attention) == family(("transformer_blocks.3.ff.net.2", 4096, 16384)) == LTX_OR_DIT
    assert family(("transformer_blocks.0.attn1.to_q", 1152, 1152)) is None  # PixArt's width
    assert family(attention, ("transformer_blocks.0.attn2.to_k", 2048, 2048)) == "LTX-Video"
    assert family(attention, ("transformer_blocks.0.attn2.to_k", 2048, 1024)) == LTX_OR_DIT  # Cosmos' text width
    assert family(attention, ("proj_in", 2048, 128)) == "LTX-Video"
    assert family(("caption_projection.linear_1", 4096, 4096)) == LTX_OR_LTX2
    assert family(("caption_projection.linear_1", 1152, 4096)) is None  # PixArt's
    assert family(attention, ("transformer_blocks.0.audio_attn1.to_q", 2048, 2048)) == "LTX-2"
    comfy = Builder(71).add("diffusion_model.patchify_proj", 2048, 128, 1)
    assert model_family(ltx_video.COMFYUI.from_state_dict(comfy.copy())) == "LTX-Video"

    wan_adapter = wan.MUSUBI.from_state_dict(Builder(72).add("lora_unet_blocks_0_ffn_0", 2048, 2048, 1).copy())
    merge_adapters([adapter(attention), wan_adapter])  # an open family is held against none
    with pytest.raises(IncompatibleAdaptersError, match="is LTX-Video"):
        merge_adapters([adapter(attention, ("proj_in", 2048, 128)), wan_adapter])
    path = save_adapter(adapter(attention), tmp_path / "ltx.safetensors", format="comfyui-ltx-video")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert f"family={LTX_OR_DIT}" in result.output and "format=comfyui-ltx-video" in result.output


def flux2_modules(kohya_names: bool = False) -> dict[str, tuple[int, int]]:
    """Flux.2's BFL modules at tiny widths (SwiGLU MLP 6x in and 3x out, single-block linear1 9x, linear2 4x in):
    `{path: (out, in)}`, kohya-flattened when asked, with only the modules diffusers' kohya converter knows."""
    modules = {}
    for i in range(2):
        for stream in ("img", "txt"):
            modules[f"double_blocks.{i}.{stream}_attn.qkv"] = (3 * H, H)
            modules[f"double_blocks.{i}.{stream}_attn.proj"] = (H, H)
            modules[f"double_blocks.{i}.{stream}_mlp.0"] = (6 * H, H)
            modules[f"double_blocks.{i}.{stream}_mlp.2"] = (H, 3 * H)
    modules.update({"single_blocks.0.linear1": (9 * H, H), "single_blocks.0.linear2": (H, 4 * H)})
    modules.update({"img_in": (H, 8), "txt_in": (H, 24), "time_in.in_layer": (H, 8), "final_layer.linear": (8, H)})
    if kohya_names:
        return {path.replace(".", "_"): shape for path, shape in modules.items()}
    modules.update({"time_in.out_layer": (H, H), "guidance_in.in_layer": (H, 8), "guidance_in.out_layer": (H, H)})
    modules.update({"single_stream_modulation.lin": (3 * H, H), "double_stream_modulation_img.lin": (6 * H, H)})
    return modules


def comfyui_flux2(seed: int) -> Builder:
    """An ai-toolkit Flux.2 LoRA, as ComfyUI and diffusers read it (`diffusion_model.`, peft suffixes, no alphas)."""
    built = Builder(seed, ".lora_A.weight", ".lora_B.weight")
    for path, (out_features, in_features) in flux2_modules().items():
        built.add(f"diffusion_model.{path}", out_features, in_features, 2)
    return built


def test_flux2_layouts_read_like_diffusers_converters_and_flux1_names_alone_leave_the_family_open():
    from adaptermerge.io._family import FLUX_OPEN

    built = comfyui_flux2(80)
    assert detect_format_of(built.state_dict) == "comfyui-flux2"
    ours = flux2.COMFYUI.from_state_dict(built.copy())
    assert_same_updates(ours, host_updates(host._convert_non_diffusers_flux2_lora_to_diffusers(built.copy())))
    assert model_family(ours) == "Flux.2"
    fal = {k.replace("diffusion_model.", "base_model.model."): v for k, v in built.copy().items()}
    assert detect_format_of(fal) == "fal-flux2"
    assert_same_updates(flux2.FAL.from_state_dict(fal), ours)
    # diffusers' LoRA converter keeps the final layer's BFL order; its single-file converter swaps the halves
    # (shift, scale -> scale, shift), as we do.
    stem = "diffusion_model.final_layer.adaLN_modulation.1"
    built.add(stem, 2 * H, H, 2)
    up, down = built.state_dict[f"{stem}.lora_B.weight"], built.state_dict[f"{stem}.lora_A.weight"]
    norm_out = flux2.COMFYUI.from_state_dict(built.copy())["transformer.norm_out.linear"]
    torch.testing.assert_close(norm_out.to_dense().float(), torch.cat([up[H:], up[:H]]) @ down)

    kohya_built = Builder(81)
    for path, (out_features, in_features) in flux2_modules(kohya_names=True).items():
        kohya_built.add(f"lora_unet_{path}", out_features, in_features, 3, alpha=1.5)
    assert detect_format_of(kohya_built.state_dict) == "kohya-flux2"
    ours = flux2.KOHYA.from_state_dict(kohya_built.copy())
    assert_same_updates(
        ours, diffusers.from_state_dict(host._convert_kohya_flux2_lora_to_diffusers(kohya_built.copy()))
    )

    # Double-block attention alone has one name and shape in both families: read as Flux.1, family open unless wider
    # than Flux.1 (3072).
    attention = Builder(82).add("lora_unet_double_blocks_0_img_attn_qkv", 3 * 3072, 3072, 1)
    assert detect_format_of(attention.state_dict) == "kohya-flux"
    assert model_family(flux.KOHYA.from_state_dict(attention.copy())) == FLUX_OPEN
    wide = Builder(83).add("diffusion_model.double_blocks.0.txt_attn.qkv", 3 * 6144, 6144, 1)
    assert detect_format_of(wide.state_dict) == "comfyui-flux"
    assert model_family(flux.COMFYUI.from_state_dict(wide.copy())) == "Flux.2"
    flux1 = kohya_flux(84, single=False)
    assert model_family(flux.KOHYA.from_state_dict(flux1.copy())) == "Flux.1"
    merge_adapters([flux.KOHYA.from_state_dict(attention.copy())] * 2)


def test_written_comfyui_flux2_file_loads_into_a_tiny_flux2_transformer(tmp_path):
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    merged = merge_adapters([flux2.COMFYUI.from_state_dict(comfyui_flux2(85).copy())] * 2, [1.0, 0.5])
    path = save_adapter(merged, tmp_path / "flux2.safetensors")
    assert set(load_file(path)) == set(comfyui_flux2(85).state_dict)
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(
        in_channels=8,
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        timestep_guidance_channels=8,
        axes_dims_rope=(2, 2, 2, 2),
    )
    converted = host._convert_non_diffusers_flux2_lora_to_diffusers(load_file(path))
    assert_fused_equals_reference(model, converted, merged)
    kohya_path = save_adapter(merged, tmp_path / "kohya.safetensors", format="kohya")
    assert detect_format(kohya_path) == "kohya-flux2"
    assert_same_updates(load_adapter(kohya_path), merged)


def test_the_clis_format_choices_are_the_readers_formats_and_layouts():
    """`--format` lists them without importing the readers; this keeps the two in step."""
    from adaptermerge.cli._options import FORMATS
    from adaptermerge.io import FORMATS as READER_FORMATS
    from adaptermerge.io import LAYOUTS

    assert sorted(FORMATS) == sorted([*READER_FORMATS, *LAYOUTS])
