"""Step schedules: weights that change over the denoising progress, written into the live merge between steps by the
hook on the pipeline's denoiser, on a plain `pipe(...)` call.

The reference is diffusers' own "scale scheduling" recipe: each LoRA loaded separately, re-weighted by `set_adapters`
from `callback_on_step_end` at the same steps.
"""

import numpy as np
import pytest
import torch

from adaptermerge import load_merged_adapters, merge_schedule_callback, save_adapter, set_merge_weights
from adaptermerge.errors import InvalidParameterError
from adaptermerge.integrations._live import host_live
from adaptermerge.integrations.diffusers import HOOKS_ATTRIBUTE, denoising_step
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
def render(pipe, callback=None, **options):
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
        **options,
    ).images[0]


def held(keyframes, progress):
    """A keyframe list's weight at `progress`: the last keyframe at or before it, 0 before the first."""
    return ([0.0] + [w for p, w in keyframes if p <= progress])[-1]


def by_hand(pipe, loras, weights_per_step, **options):
    """diffusers' recipe: every LoRA loaded on its own, `set_adapters` called before each step (`weights_per_step`:
    a list, or a function of the step index and the number of steps)."""
    at = weights_per_step if callable(weights_per_step) else lambda step, steps: weights_per_step[step]
    names = [f"a{i}" for i in range(len(loras))]
    for name, path in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, at(0, 1))

    def callback(pipe, step, timestep, kwargs):
        pipe.set_adapters(names, at((step + 1) % pipe.num_timesteps, pipe.num_timesteps))
        return kwargs

    return render(pipe, callback, **options)


def denoiser_hooks(pipe):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return len(denoiser._forward_pre_hooks), len(denoiser._forward_hooks)


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_flux_pipeline], ids=["sd1", "flux"])
def test_keyframe_schedule_equals_set_adapters_changed_by_hand_at_the_same_steps(make_pipe, sd_loras, flux_loras):
    loras = sd_loras if make_pipe is tiny_sd_pipeline else flux_loras
    pipe = make_pipe()
    load_merged_adapters(pipe, loras, SCHEDULE)
    steps = []

    def user_callback(pipe, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    image = render(pipe)  # a plain call: the denoiser hook applies the schedule
    np.testing.assert_allclose(image, by_hand(make_pipe(), loras, BY_HAND), atol=2e-5, rtol=0)
    static = make_pipe()
    load_merged_adapters(static, loras, BY_HAND[0])
    assert np.abs(image - render(static)).max() > 1e-3  # the schedule did change the image
    # the explicit callback (the earlier API) gives the same image, chains the user's callback, applies nothing twice
    np.testing.assert_array_equal(render(pipe, merge_schedule_callback(pipe, user_callback)), image)
    assert steps == list(range(STEPS))
    np.testing.assert_array_equal(render(pipe), image)  # a second call starts again from progress 0


def test_callable_schedule_and_set_merge_weights(sd_loras):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, [0.0, 0.0])
    assert denoiser_hooks(pipe) == (0, 0)  # no schedule, no hook
    set_merge_weights(pipe, [lambda p: 1.0 - p, 0.5])
    assert denoiser_hooks(pipe) == (1, 1)
    image = render(pipe)
    expected = by_hand(tiny_sd_pipeline(), sd_loras, [[1 - i / STEPS, 0.5] for i in range(STEPS)])
    np.testing.assert_allclose(image, expected, atol=2e-5, rtol=0)


def test_block_weight_schedule_rewrites_only_that_block_and_equals_hand_reweighting(sd_loras):
    schedule = [{"unet": {"down": [[0.0, 1.0], [0.5, 0.0]], "up": 0.7}}, 0.5]
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, schedule)
    image = render(pipe)

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
    assert live.apply(0.75, component="unet") == 0 and live.apply(0.0, component="text_encoder") == 0


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


def schedule_by_hand(step, steps):
    """SCHEDULE at step `step` of `steps` (progress `step / steps`), written out independently of the package."""
    return [held(keyframes, step / steps) for keyframes in SCHEDULE]


@pytest.mark.parametrize(
    "scheduler",
    ["DDIMScheduler", "PNDMScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"],
)
def test_schedule_follows_the_step_with_every_kind_of_scheduler(scheduler, sd_loras):
    """DDIM (no step counter: the timestep's value), PNDM (`counter`, a repeated warm-up timestep), Heun (second
    order: every timestep but the first twice, one denoiser call each) and DPM-Solver (`step_index`); Euler is the
    tiny pipeline's default, in the tests above."""
    import diffusers

    def make():
        pipe = tiny_sd_pipeline()
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
        return pipe

    pipe = make()
    load_merged_adapters(pipe, sd_loras, SCHEDULE)
    image = render(pipe)
    np.testing.assert_allclose(image, by_hand(make(), sd_loras, schedule_by_hand), atol=2e-5, rtol=0)
    if scheduler == "HeunDiscreteScheduler":
        assert pipe.num_timesteps == 2 * STEPS - 1


def test_flux_true_cfg_calls_the_transformer_twice_per_step_at_the_same_progress(flux_loras):
    negative = flux_prompt_embeds(seed=1)
    true_cfg = {
        "true_cfg_scale": 2.0,
        "negative_prompt_embeds": negative["prompt_embeds"],
        "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
    }
    pipe = tiny_flux_pipeline()
    load_merged_adapters(pipe, flux_loras, SCHEDULE)
    image = render(pipe, **true_cfg)
    expected = by_hand(tiny_flux_pipeline(), flux_loras, schedule_by_hand, **true_cfg)
    np.testing.assert_allclose(image, expected, atol=2e-5, rtol=0)


def test_the_denoiser_hook_is_replaced_on_reload_and_removed_with_the_schedule_or_the_adapter(sd_loras):
    pipe = tiny_sd_pipeline()
    load_merged_adapters(pipe, sd_loras, SCHEDULE)
    load_merged_adapters(pipe, sd_loras, SCHEDULE)
    assert denoiser_hooks(pipe) == (1, 1) and len(getattr(pipe, HOOKS_ATTRIBUTE)["merged"]) == 1
    load_merged_adapters(pipe, sd_loras, method="k_lora", adapter_name="fusion")
    assert denoiser_hooks(pipe) == (2, 2)  # one per live merge
    load_merged_adapters(pipe, sd_loras, [1.0, 0.5], method="k_lora", adapter_name="fusion")
    load_merged_adapters(pipe, sd_loras, [1.0, 0.5], adapter_name="fusion")  # no schedule: no hook
    assert denoiser_hooks(pipe) == (1, 1)
    set_merge_weights(pipe, [0.3, 0.2])
    assert denoiser_hooks(pipe) == (0, 0)
    set_merge_weights(pipe, SCHEDULE)
    assert denoiser_hooks(pipe) == (1, 1)

    base = tiny_sd_pipeline()
    pipe.delete_adapters(["merged", "fusion"])
    np.testing.assert_array_equal(render(pipe), render(base))  # the next call drops the hook of a deleted merge
    assert denoiser_hooks(pipe) == (0, 0) and list(host_live(pipe)) == ["fusion"]
    load_merged_adapters(pipe, sd_loras, SCHEDULE)
    assert list(host_live(pipe)) == ["merged"]  # loading forgets the live state of deleted merges
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(render(pipe), render(base))
    assert denoiser_hooks(pipe) == (0, 0) and not host_live(pipe)


def test_denoising_step_reads_the_scheduler_and_refuses_timesteps_it_cannot_place():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    ddim = DDIMScheduler()
    ddim.set_timesteps(STEPS)
    sample = torch.zeros(2, 4, 8, 8)
    for index, t in enumerate(ddim.timesteps):
        assert denoising_step(ddim, (sample, t)) == index
        assert denoising_step(ddim, (sample,), {"timestep": t.expand(2).float()}) == index  # batched, as a float
    with pytest.raises(InvalidParameterError, match="not exactly one entry of scheduler.timesteps"):
        denoising_step(ddim, (sample, torch.tensor(ddim.timesteps[0] - 1)))
    with pytest.raises(InvalidParameterError, match="not exactly one entry"):
        denoising_step(ddim, (sample, torch.stack([ddim.timesteps[0], ddim.timesteps[1]])))
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(STEPS)
    assert denoising_step(euler, (sample, torch.tensor(-5.0))) == 0  # the counter, whatever the value's convention
    euler.set_begin_index(2)
    assert denoising_step(euler) == 2
    euler.step(torch.zeros(1), euler.timesteps[2], torch.zeros(1))
    assert denoising_step(euler) == 3


def test_a_schedule_that_adapts_no_denoiser_warns(tmp_path):
    from adaptermerge import load_adapter
    from adaptermerge.errors import AdapterMergeWarning

    from .tiny_models import save_random_pipeline_lora

    pipe = tiny_sd_pipeline()
    full = load_adapter(save_random_pipeline_lora(pipe, tmp_path / "lora"))
    encoder_only = full.with_modules({m: u for m, u in full.items() if m.startswith("text_encoder.")})
    with pytest.warns(AdapterMergeWarning, match="adapts no denoiser"):
        load_merged_adapters(pipe, [encoder_only], [[[0.0, 1.0], [0.5, 0.0]]])
    assert denoiser_hooks(pipe) == (0, 0)
