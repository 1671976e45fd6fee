"""The `k_lora` live mode against a dense port of the authors' rule (HVision-NKU/K-LoRA at 893d0f9: `klora.py`
`KLoRALinearLayer.get_klora_weight`, `utils.py` `get_ratio_between_content_and_style`), written from that code."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge import Adapter, load_merged_adapters, merge_schedule_callback, save_adapter, set_merge_weights
from adaptermerge.errors import IncompatibleAdaptersError, InvalidParameterError
from adaptermerge.integrations._live import host_live
from adaptermerge.integrations.k_lora import KLoraParams, klora_rule, topk_abs_sum
from adaptermerge.ui.diffusion import random_pipeline_loras
from tests.factories import random_lowrank
from tests.test_no_dense_merge import LargestTensor

from .tiny_models import flux_prompt_embeds, tiny_flux_pipeline, tiny_llama, tiny_sd_pipeline

STEPS = 10


def dense_port(subject, style, steps, *, pattern="s*", alpha=1.5, beta=None, per_call=False):
    """`{(step, module): "subject" | "style"}` as the code chooses them, from dense products.

    The code's counter is global and advances on every hooked call; `sum_timesteps = steps × layers` (its FLUX
    setting; 28000 = 50 × 560 on SDXL). With `per_call=False` the counter is read at the start of each step.
    """
    beta = (0.85 * alpha if pattern == "s*" else 0.5) if beta is None else beta
    modules = [m for m in subject if m in style]
    ratios = [float(subject[m].to_dense().abs().sum() / style[m].to_dense().abs().sum()) for m in modules]
    average = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * average]
    gamma = sum(kept) / len(kept)
    sum_timesteps, count, choices = steps * len(modules), 0, {}
    for step in range(steps):
        for module in modules:
            count += 1
            time_ratio = (count if per_call else step * len(modules)) % sum_timesteps
            k = subject[module].rank * style[module].rank
            top1 = subject[module].to_dense().abs().flatten().topk(k).values.sum()
            top2 = style[module].to_dense().abs().flatten().topk(k).values.sum()
            scale = alpha * time_ratio / sum_timesteps + beta
            if pattern == "s*":
                scale = scale % alpha
            choices[step, module] = "subject" if (top1 / gamma) / (top2 * scale) > 1 else "style"
    return choices


@pytest.fixture(scope="module")
def pair():
    return random_pipeline_loras(tiny_sd_pipeline(), ["subject", "style"])


def live_choices(pipe, steps):
    weights_at = host_live(pipe)["merged"].weights_at
    modules = host_live(pipe)["merged"].sources
    return {
        (step, m): "subject" if weights_at(step / steps)(0, m) != 0 else "style"
        for step in range(steps)
        for m in modules
    }


@pytest.mark.parametrize("pattern", ["s*", "s"])
def test_layer_by_step_choices_equal_the_codes_rule_at_step_starts(pair, pattern):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, pair, method="k_lora", pattern=pattern)
    ours = live_choices(pipe, STEPS)
    assert ours == dense_port(*pair, STEPS, pattern=pattern)
    assert {"subject", "style"} <= set(ours.values())
    switches = sum(ours[s, m] != ours[s + 1, m] for s in range(STEPS - 1) for m in host_live(pipe)["merged"].sources)
    assert switches > 0


def test_flux_transformer_choices_equal_the_codes_rule():
    """A DiT pipeline: the rule runs on the double and single blocks' attention projections alike."""
    pipe = tiny_flux_pipeline()
    pair = random_pipeline_loras(pipe, ["subject", "style"])
    load_merged_adapters(pipe, pair, method="k_lora")
    assert any(m.startswith("transformer.single_transformer_blocks.") for m in host_live(pipe)["merged"].sources)
    assert live_choices(pipe, STEPS) == dense_port(*pair, STEPS)


def test_the_codes_per_call_counter_only_switches_a_layer_one_step_earlier(pair):
    """Where the code's per-call counter disagrees with step starts, the layer's switch point lies inside that step,
    and this mode makes the code's choice one step later (on the tiny UNet, 10 steps: 44 of 480 layer-steps)."""
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, pair, method="k_lora")
    ours = live_choices(pipe, STEPS)
    per_call = dense_port(*pair, STEPS, per_call=True)
    differ = [(s, m) for (s, m), choice in per_call.items() if ours[s, m] != choice]
    assert 0 < len(differ) < 0.1 * len(per_call)
    assert all(ours[s + 1, m] == per_call[s, m] for s, m in differ if s + 1 < STEPS)


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_flux_pipeline], ids=["sd1", "flux"])
def test_image_equals_hand_reweighting_with_the_ports_choices(make_pipe, pair):
    """End to end, on a plain pipeline call: the live mode's image equals one made by writing the port's per-module
    choices by hand with `set_merge_weights` between steps, and the one made with the explicit callback."""
    pair = pair if make_pipe is tiny_sd_pipeline else random_pipeline_loras(make_pipe(), ["subject", "style"])
    kwargs = {"num_inference_steps": STEPS, "output_type": "np"}
    if make_pipe is tiny_sd_pipeline:
        kwargs.update(prompt="the cat", height=32, width=32)
    else:
        kwargs.update(flux_prompt_embeds(), height=16, width=16)

    def render(pipe, **extra):
        with torch.no_grad():
            return pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(0)).images[0]

    pipe = make_pipe()
    load_merged_adapters(pipe, pair, [0.9, 1.1], method="k_lora")
    image = render(pipe)
    np.testing.assert_array_equal(render(pipe, callback_on_step_end=merge_schedule_callback(pipe)), image)

    choices = dense_port(*pair, STEPS)

    def weights(step):
        chosen = {m for (s, m), c in choices.items() if s == step and c == "subject"}
        subject = {re.escape(m): 0.9 if m in chosen else 0.0 for m in pair[0]}
        style = {re.escape(m): 0.0 if m in chosen else 1.1 for m in pair[1]}
        return [subject, style]

    assert any(weights(step) != weights(0) for step in range(STEPS))  # layers do switch during the run
    hand = make_pipe()
    load_merged_adapters(hand, pair, weights(0))

    def callback(pipe, step, timestep, kwargs):
        set_merge_weights(pipe, weights((step + 1) % STEPS))
        return kwargs

    np.testing.assert_allclose(image, render(hand, callback_on_step_end=callback), atol=1e-6, rtol=0)
    linear = make_pipe()
    load_merged_adapters(linear, pair, [0.9, 1.1])
    assert np.abs(image - render(linear)).max() > 1e-3


@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    rank=st.integers(1, 4),
    k=st.integers(1, 30),
    tile=st.integers(1, 200),
    seed=st.integers(0, 100),
)
def test_tiled_topk_scores_equal_the_dense_ones(out_features, in_features, rank, k, tile, seed):
    update = random_lowrank(out_features, in_features, rank, seed=seed, dtype=torch.float64)
    dense = update.to_dense().abs().flatten()
    top, total = topk_abs_sum(update, k, tile_entries=tile)
    assert top == pytest.approx(float(dense.topk(min(k, dense.numel())).values.sum()), rel=1e-12)
    assert total == pytest.approx(float(dense.sum()), rel=1e-12)


def test_scoring_never_holds_a_whole_update():
    big = [random_lowrank(2048, 2048, 8, seed=s) for s in (1, 2)]
    adapters = [Adapter({"layer": lowrank}, name=f"a{i}") for i, lowrank in enumerate(big)]
    with LargestTensor() as seen:
        rule = klora_rule(*adapters, KLoraParams())
    assert seen.numel <= 2048 * 2048 // 8, seen.op
    assert rule.scores["layer"][0] > 0


def test_k_lora_is_refused_where_it_cannot_run(pair, tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(IncompatibleAdaptersError, match="two adapters"):
        load_merged_adapters(pipe, [*pair, pair[0]], method="k_lora")
    with pytest.raises(InvalidParameterError, match="pattern"):
        load_merged_adapters(pipe, pair, method="k_lora", pattern="x")
    with pytest.raises(InvalidParameterError, match="unexpected keyword"):
        load_merged_adapters(pipe, pair, method="k_lora", density=0.5)
    files = [save_adapter(a, tmp_path / f"{a.name}.safetensors", format="peft") for a in pair]
    with pytest.raises(InvalidParameterError, match="diffusers pipelines only"):
        load_merged_adapters(tiny_llama(), files, method="k_lora")


def test_set_merge_weights_keeps_the_switches(pair):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, pair, method="k_lora")
    before = live_choices(pipe, STEPS)
    set_merge_weights(pipe, [0.5, 2.0])
    live = host_live(pipe)["merged"]
    assert live_choices(pipe, STEPS) == before
    module = next(iter(live.sources))
    assert {live.weights_at(0.5)(0, module), live.weights_at(0.5)(1, module)} in ({0.0, 0.5}, {0.0, 2.0})
