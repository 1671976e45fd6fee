"""Per-module weights: peft-style patterns, diffusers block dicts, A1111 block-weight vectors."""

import pytest
import torch

from adaptermerge import merge_adapters
from adaptermerge.errors import InvalidParameterError
from adaptermerge.patterns import find_pattern_key
from adaptermerge.weights import LBW_PRESETS, check_weights
from tests.factories import make_adapter

LLM = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
UNET = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.resnets.1.conv1",
    "unet.down_blocks.0.downsamplers.0.conv",
    "unet.down_blocks.1.attentions.0.proj_in",
    "unet.mid_block.attentions.0.proj_in",
    "unet.up_blocks.1.attentions.2.proj_out",
    "unet.up_blocks.1.upsamplers.0.conv",
    "unet.conv_in",
    "unet.time_embedding.linear_1",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
]


def resolve(weight, modules):
    (resolver,) = check_weights([weight], 1)
    return [resolver(m) for m in modules]


def test_pattern_keys_match_dotted_tails_like_peft():
    keys = ["q_proj", "self_attn.q_proj", "attn.q_proj", "proj", r"layers\.1\..*"]
    for name in LLM:
        for key in keys:
            assert (find_pattern_key([key], name) is not None) == (
                __import__("peft").utils.other.get_pattern_key([key], name) == key
            ), (key, name)


def test_longest_matching_key_wins_and_default_gives_the_rest():
    weight = {"q_proj": 0.5, r"layers\.1\.self_attn\.q_proj": 2.0, "default": 0.1}
    assert resolve(weight, LLM) == [0.5, 0.1, 2.0]
    assert resolve({"v_proj": 3.0}, LLM) == [1.0, 3.0, 1.0]


def test_block_weighted_merge_equals_dense_per_module_weighted_sum():
    shapes = {name: (12, 8) for name in LLM}
    a = make_adapter(shapes, rank=3, seed=1, name="a")
    b = make_adapter(shapes, rank=5, seed=2, name="b")
    weights = [{"q_proj": 0.5, "default": -1.0}, {r"layers\.0\..*": 2.0, "default": 0.0}]
    merged = merge_adapters([a, b], weights)
    for name in LLM:
        wa, wb = resolve(weights[0], [name])[0], resolve(weights[1], [name])[0]
        expected = wa * a[name].to_dense() + wb * b[name].to_dense()
        torch.testing.assert_close(merged[name].to_dense(), expected, rtol=1e-5, atol=1e-6)


def test_module_with_all_zero_weights_is_left_out():
    shapes = {name: (12, 8) for name in LLM}
    a = make_adapter(shapes, seed=1, name="a")
    merged = merge_adapters([a], [{r"layers\.1\..*": 0.0}])
    assert set(merged) == set(LLM[:2])


def test_diffusers_block_dict_scales_every_module_of_the_block():
    weight = {"unet": {"down": {"block_0": [0.2, 0.4]}, "mid": 0.5, "up": {"block_1": [1, 2, 3]}}, "text_encoder": 0.7}
    got = dict(zip(UNET, resolve(weight, UNET)))
    assert got["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 0.2
    assert got["unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"] == 0.4
    assert got["unet.down_blocks.0.resnets.1.conv1"] == 0.4  # diffusers would leave resnets at 1.0
    assert got["unet.down_blocks.0.downsamplers.0.conv"] == 0.4
    assert got["unet.down_blocks.1.attentions.0.proj_in"] == 1.0
    assert got["unet.mid_block.attentions.0.proj_in"] == 0.5
    assert got["unet.up_blocks.1.attentions.2.proj_out"] == 3.0
    assert got["unet.up_blocks.1.upsamplers.0.conv"] == 3.0
    assert got["unet.conv_in"] == got["unet.time_embedding.linear_1"] == 1.0
    assert got["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == 0.7


def test_lbw_vectors_follow_the_ldm_block_numbering():
    vector = list(range(26))  # BASE=0, IN00..IN11 = 1..12, M00 = 13, OUT00..OUT11 = 14..25
    got = dict(zip(UNET, resolve({"lbw": vector, "multiplier": 2.0}, UNET)))
    assert got["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 2 * 2  # IN01
    assert got["unet.down_blocks.0.resnets.1.conv1"] == 2 * 3  # IN02
    assert got["unet.down_blocks.0.downsamplers.0.conv"] == 2 * 4  # IN03
    assert got["unet.down_blocks.1.attentions.0.proj_in"] == 2 * 5  # IN04
    assert got["unet.mid_block.attentions.0.proj_in"] == 2 * 13
    assert got["unet.up_blocks.1.attentions.2.proj_out"] == 2 * (14 + 5)  # OUT05
    assert got["unet.up_blocks.1.upsamplers.0.conv"] == 2 * (14 + 5)
    assert got["unet.conv_in"] == 2 * 1  # IN00
    assert got["unet.time_embedding.linear_1"] == 2.0  # outside the blocks: ratio 1
    assert got["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == 0  # BASE


def test_lbw_presets_zero_the_slots_a_17_vector_does_not_name():
    got = dict(zip(UNET, resolve({"lbw": "INS"}, UNET)))
    assert got["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 1.0  # IN01
    assert got["unet.down_blocks.0.downsamplers.0.conv"] == 0.0  # IN03 is not in the 17 layout
    assert got["unet.mid_block.attentions.0.proj_in"] == 0.0
    assert len(LBW_PRESETS["OUTALL"]) == 17


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ({"unet": {"left": 1.0}}, "unknown UNet keys"),
        ({"lbw": "NOPE"}, "unknown block-weight preset"),
        ({"lbw": [1, 2, 3]}, "17 or 26"),
        ({"q_proj(": 1.0}, "not a valid regular expression"),
        ({"q_proj": float("inf")}, "finite"),
        ({"unet": {"up": {"block_1": [1, 2]}}}, "has 2 entries"),
    ],
)
def test_bad_weight_specs_say_what_is_wrong(weight, message):
    with pytest.raises(InvalidParameterError, match=message):
        resolve(weight, UNET)


FLUX_MODULES = {
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "CLIP",
    "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": "T5",
    "transformer.x_embedder": "IN",
    "transformer.time_text_embed.guidance_embedder.linear_1": "IN",
    "transformer.transformer_blocks.0.attn.to_q": "D00",
    "transformer.transformer_blocks.18.ff.net.2": "D18",
    "transformer.single_transformer_blocks.1.proj_mlp": "S01",
    "transformer.single_transformer_blocks.37.attn.to_k": "S37",
    "transformer.norm_out.linear": "OUT",
    "transformer.proj_out": "OUT",
}


def test_flux_lbw_vector_of_61_values_follows_the_extension_layout():
    from adaptermerge.weights import LBW_LAYOUTS

    vector = [round(0.01 * (i + 1), 2) for i in range(61)]
    (resolve,) = check_weights([{"lbw": vector, "multiplier": 2.0}], 1)
    for module, block in FLUX_MODULES.items():
        assert resolve(module) == pytest.approx(2.0 * vector[LBW_LAYOUTS[61].index(block)]), module
    (everything,) = check_weights([{"lbw": "FLUXALL"}], 1)
    assert all(everything(module) == 1.0 for module in FLUX_MODULES)


def test_dit_block_lists_name_whole_blocks_without_substring_traps():
    weight = {
        "transformer": {
            "transformer_blocks": {"1": 0.5},
            "single_transformer_blocks": [0.0, 0.25],
            "blocks": 0.75,
            "proj_out": 3.0,
        }
    }
    (resolve,) = check_weights([weight], 1)
    assert resolve("transformer.transformer_blocks.1.attn.to_q") == 0.5
    assert resolve("transformer.transformer_blocks.10.attn.to_q") == 1.0  # not block 1
    assert resolve("transformer.single_transformer_blocks.1.attn.to_q") == 0.25  # not transformer_blocks.1
    assert resolve("transformer.blocks.7.attn1.to_q") == 0.75  # Wan
    assert resolve("transformer.proj_out") == 3.0 and resolve("text_encoder.x") == 1.0
    with pytest.raises(InvalidParameterError, match="has 2 entries but module .* is in block 5"):
        resolve("transformer.single_transformer_blocks.5.proj_out")
    with pytest.raises(InvalidParameterError, match="finite number"):
        check_weights([{"transformer": {"blocks": [1.0, "x"]}}], 1)


def test_flux_block_weighted_merge_equals_dense_per_module_weighted_sum():
    shapes = {name: (8, 6) for name in FLUX_MODULES}
    adapters = [make_adapter(shapes, rank=2, seed=s, name=f"a{s}") for s in range(2)]
    vector = [0.0, 1.0, 0.5] + [0.2] * 19 + [0.9] * 38 + [1.5]
    weights = [{"lbw": vector}, {"transformer": {"single_transformer_blocks": [1.0, -1.0] + [0.5] * 36}}]
    merged = merge_adapters(adapters, weights)
    resolvers = check_weights(weights, 2)
    for module in shapes:
        expected = sum(r(module) * a[module].to_dense() for r, a in zip(resolvers, adapters))
        if module in merged:
            torch.testing.assert_close(merged[module].to_dense(), expected)
        else:
            assert float(expected.abs().max()) == 0.0
