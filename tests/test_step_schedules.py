"""Step schedules: weights that change over the denoising progress, written into the live merge between steps.

The reference is diffusers' own "scale scheduling" recipe: each LoRA loaded separately, re-weighted by `set_adapters`
from `callback_on_step_end` at the same steps.
"""

import numpy as np
import pytest
import torch

from adaptermerge import load_merged_adapters, merge_schedule_callback, save_adapter, set_merge_weights
from adaptermerge.errors import InvalidParameterError
from adaptermerge.integrations._live import host_live
from adaptermerge.integrations.schedule import WeightSchedule
from adaptermerge.ui.diffusion import random_pipeline_loras

from .tiny_models import flux_prompt_embeds, save_random_llama_lora, tiny_flux_pipeline, tiny_llama, tiny_sd_pipeline

STEPS = 4
SCHEDULE = [[[0.0, 1.0], [0.5, 0.2]], [[0.25, 0.8], [0.75, -0.5]]]
BY_HAND = [[1.0, 0.0], [1.0, 0.8], [0.2, 0.8], [0.2, -0.5]]  # SCHEDULE at progress 0, 1/4, 2/4, 3/4


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("schedule_loras")
    adapters = random_pipeline_loras(tiny_sd_pipeline(), ["subject", "style"])
    return [save_adapter(a, folder / f"{a.name}.safetensors", format="diffusers") for a in adapters]


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_loras")
    adapters = random_pipeline_loras(tiny_flux_pipeline(), ["subject", "style"])
    return [save_adapter(a, folder / f"{a.name}.safetensors", format="diffusers") for a in adapters]


@torch.no_grad()
def render(pipe, callback=None):
    """The pipeline's image (float, `(H, W, 3)`) with a fixed seed; prompt embeddings for the text-encoder-less DiT."""
    inputs = flux_prompt_embeds() if getattr(pipe, "unet", None) is None else {"prompt": "the cat", "height": 32}
    inputs.setdefault("height", 16)
    return pipe(
        **inputs,
        width=inputs["height"],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback_on_step_end=callback,
    ).images[0]


def by_hand(pipe, loras, weights_per_step):
    """diffusers' recipe: every LoRA loaded on its own, `set_adapters` called before each step."""
    names = [f"a{i}" for i in range(len(loras))]
    for name, path in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, weights_per_step[0])

    def callback(pipe, step, timestep, kwargs):
        pipe.set_adapters(names, weights_per_step[(step + 1) % len(weights_per_step)])
        return kwargs

    return render(pipe, callback)


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_flux_pipeline], ids=["sd1", "flux"])
def test_keyframe_schedule_equals_set_adapters_changed_by_hand_at_the_same_steps(make_pipe, sd_loras, flux_loras):
    loras = sd_loras if make_pipe is tiny_sd_pipeline else flux_loras
    pipe = make_pipe()
    load_merged_adapters(pipe, loras, SCHEDULE)
    steps = []

    def user_callback(pipe, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    image = render(pipe, merge_schedule_callback(pipe, user_callback))
    np.testing.assert_allclose(image, by_hand(make_pipe(), loras, BY_HAND), atol=2e-5, rtol=0)
    assert steps == list(range(STEPS))  # the user's own callback ran at every step
    held = make_pipe()
    load_merged_adapters(held, loras, BY_HAND[0])
    assert np.abs(image - render(held)).max() > 1e-3  # the schedule did change the image
    np.testing.assert_array_equal(render(pipe, merge_schedule_callback(pipe)), image)  # progress 0 again after


def test_callable_schedule_and_set_merge_weights(sd_loras):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, [0.0, 0.0])
    set_merge_weights(pipe, [lambda p: 1.0 - p, 0.5])
    image = render(pipe, merge_schedule_callback(pipe))
    expected = by_hand(tiny_sd_pipeline(), sd_loras, [[1 - i / STEPS, 0.5] for i in range(STEPS)])
    np.testing.assert_allclose(image, expected, atol=2e-5, rtol=0)


def test_block_weight_schedule_rewrites_only_that_block_and_equals_hand_reweighting(sd_loras):
    schedule = [{"unet": {"down": [[0.0, 1.0], [0.5, 0.0]], "up": 0.7}}, 0.5]
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, schedule)
    image = render(pipe, merge_schedule_callback(pipe))

    hand = tiny_sd_pipeline()
    per_step = [[{"unet": {"down": 1.0 if i < 2 else 0.0, "up": 0.7}}, 0.5] for i in range(STEPS)]
    load_merged_adapters(hand, sd_loras, per_step[0])

    def callback(pipe, step, timestep, kwargs):
        set_merge_weights(pipe, per_step[(step + 1) % STEPS])
        return kwargs

    np.testing.assert_allclose(image, render(hand, callback), atol=1e-6, rtol=0)
    live = host_live(pipe)["merged"]
    down = [m for m in live.sources if m.startswith("unet.down_blocks.")]
    assert 0 < len(down) < len(live.sources)
    assert live.apply(0.5) == len(down) and live.apply(0.75) == 0  # a change costs the changed modules only


def test_pipeline_callbacks_keep_their_tensor_inputs(sd_loras):
    from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback

    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, SCHEDULE)
    chained = merge_schedule_callback(pipe, SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert isinstance(chained, MultiPipelineCallbacks) and chained.tensor_inputs == ["prompt_embeds"]


def test_schedules_are_checked_and_refused_where_they_cannot_apply(sd_loras, tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(InvalidParameterError, match="increase strictly"):
        load_merged_adapters(pipe, sd_loras, [[[0.5, 1.0], [0.2, 0.0]], 1.0])
    with pytest.raises(InvalidParameterError, match="live 'linear' merge"):
        load_merged_adapters(pipe, sd_loras, SCHEDULE, method="ties", density=0.5)
    with pytest.raises(InvalidParameterError, match="no live merge"):
        merge_schedule_callback(pipe)
    lora = save_random_llama_lora(tmp_path / "llm", seed=1)
    with pytest.raises(InvalidParameterError, match="diffusers pipeline"):
        load_merged_adapters(tiny_llama(), [lora], [[[0.0, 1.0]]])
    merged = load_merged_adapters(pipe, sd_loras, [lambda p: 1.0, [[0.0, 1.0]]])
    assert merged.metadata.extra["provenance"]["weights"][0].startswith("callable:")
    assert WeightSchedule([{"up": {"block_1": [1.0, 0.5]}}]).dynamic is False  # a per-layer list is not keyframes
