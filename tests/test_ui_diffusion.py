"""`adaptermerge ui --base PIPELINE --adapters DIR`: a user's diffusers pipeline previewed by images, driven through
gradio_client on a tiny SD pipeline saved with `save_pretrained` and LoRA files in kohya and diffusers formats."""

import re
import socket
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("gradio")
pytest.importorskip("diffusers")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from adaptermerge import save_adapter  # noqa: E402
from adaptermerge.cli import main  # noqa: E402
from adaptermerge.ui import MAX_ADAPTERS, launch  # noqa: E402
from adaptermerge.ui.diffusion import is_pipeline, random_pipeline_loras, tiny_sd_pipeline  # noqa: E402
from tests.factories import make_adapter  # noqa: E402
from tests.tiny_models import save_random_pipeline_lora  # noqa: E402

PROMPT, STEPS, SIZE = "a photo of a cat", 3, 32
NO_PARAMS = [
    0.2,
    0.2,
    2.0,
    0,
    None,
    0.2,
    "total",
    0.8,
    True,
    True,
    1.0,
    None,
    "input",
    40.0,
]  # every method parameter's box (in the app's order, as tests/test_ui.py's PARAMS), ignored by linear


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny SD pipeline, and an adapters folder: `smudge` written by diffusers' own `save_lora_weights`
    (UNet and text encoder), `sparkle` a kohya file of ours (UNet attention)."""
    root = tmp_path_factory.mktemp("diffusion-ui")
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "base")
    save_random_pipeline_lora(pipe, root / "adapters" / "smudge", seed=1, rank=2)
    sparkle = random_pipeline_loras(pipe, ["sparkle"])[0]
    save_adapter(sparkle, root / "adapters" / "sparkle" / "sparkle.safetensors", format="kohya")
    return root


@pytest.fixture(scope="module")
def client(folders):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = launch(
        port=port,
        base=str(folders / "base"),
        adapters_dir=folders / "adapters",
        steps=STEPS,
        size=SIZE,
        prevent_thread_lock=True,
    )
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def show(client, smudge=0.0, sparkle=0.0, method="linear", advanced=""):
    """The served preview for the slider weights (adapters sorted by path: smudge, then sparkle)."""
    weights = [smudge, sparkle] + [0.0] * (MAX_ADAPTERS - 2)
    html, path, heatmap, timing = client.predict(method, *weights, *NO_PARAMS, advanced, api_name="/preview")
    assert html == "" and path is not None
    return np.asarray(Image.open(path).convert("RGB")).astype(int), float(re.search(r"(\d+) ms", timing).group(1))


@pytest.fixture(scope="module")
def host_render(folders):
    """The image diffusers itself gives: each LoRA loaded with `load_lora_weights`, weighted by `set_adapters`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folders / "base"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folders / "adapters" / "smudge"), adapter_name="smudge")
    pipe.load_lora_weights(str(folders / "adapters" / "sparkle" / "sparkle.safetensors"), adapter_name="sparkle")

    def render(weights):
        pipe.set_adapters(["smudge", "sparkle"], weights)
        return diffusers_image(pipe)

    return render


@torch.no_grad()
def diffusers_image(pipe, callback=None):
    """The image of `pipe` with the page's prompt, steps, size and seed, as integers in [0, 255]."""
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=generator,
        output_type="np",
        callback_on_step_end=callback,
    )
    return (np.clip(image.images[0], 0.0, 1.0) * 255).round().astype(int)


def test_pipeline_folders_are_told_from_other_bases(folders, tmp_path):
    assert is_pipeline(str(folders / "base"))
    assert not is_pipeline(str(folders / "adapters")) and not is_pipeline(str(tmp_path))
    assert not is_pipeline("not a valid/hub id/at all")


def test_linear_sliders_reweight_the_loaded_pipeline_as_diffusers_does(client, host_render, monkeypatch):
    base, _ = show(client)
    import adaptermerge.ui.diffusion as diffusion

    monkeypatch.setattr(diffusion, "load_pipeline", lambda *_, **__: pytest.fail("pipeline rebuilt"))
    monkeypatch.setattr("adaptermerge.load_merged_adapters", lambda *_, **__: pytest.fail("adapters reloaded"))
    monkeypatch.setattr("adaptermerge.ui.workbench.load_adapter", lambda *_, **__: pytest.fail("file re-read"))
    started = time.perf_counter()
    mixed, server_ms = show(client, smudge=1.0, sparkle=-0.5)
    round_trip = time.perf_counter() - started
    assert base.shape == (SIZE, SIZE, 3)
    assert np.abs(mixed - base).mean() > 2  # the LoRAs change the image
    assert np.array_equal(show(client)[0], base)  # re-weighted in place: zero weights give the base back
    monkeypatch.undo()
    expected = host_render([1.0, -0.5])
    assert np.abs(mixed - expected).max() <= 2, "the merge's image differs from diffusers' set_adapters"
    print(f"diffusion base, slider → image: {server_ms:.0f} ms in the server, {1000 * round_trip:.0f} ms round trip")
    assert server_ms < 2000


def test_other_methods_load_their_merge_and_linear_comes_back(client):
    base, _ = show(client)
    linear, _ = show(client, smudge=1.0, sparkle=1.0)
    ties, _ = show(client, smudge=1.0, sparkle=1.0, method="ties")
    assert np.abs(ties - linear).mean() > 0.5
    assert np.array_equal(show(client, method="ties")[0], base)  # nothing to merge: LoRAs off
    assert np.array_equal(show(client, smudge=1.0, sparkle=1.0)[0], linear)  # and back on


def test_advanced_weights_reach_the_pipeline_times_the_slider(client, host_render):
    plain, _ = show(client, sparkle=1.0)
    no_up, _ = show(client, sparkle=1.0, advanced='sparkle: {"unet": {"up": 0.0}}')
    assert np.abs(no_up - plain).mean() > 0.5
    expected = host_render([0.0, {"unet": {"up": 0.0}}])
    assert np.abs(no_up - expected).max() <= 2
    with pytest.raises(AppError, match="unknown UNet keys"):
        show(client, sparkle=1.0, advanced='sparkle: {"unet": {"left": 0.0}}')


def test_prompt_box_changes_the_image(client):
    before, _ = show(client, smudge=0.5)
    client.predict("the cat", api_name="/set_prompt")
    try:
        after, _ = show(client, smudge=0.5)
    finally:
        client.predict(PROMPT, api_name="/set_prompt")
    assert not np.array_equal(before, after)


def test_adapters_for_another_model_are_refused_before_serving(folders, tmp_path):
    save_adapter(make_adapter({"fc1": (8, 4)}, rank=2, seed=0), tmp_path / "mlp", format="peft")
    result = CliRunner().invoke(main, ["ui", "--base", str(folders / "base"), "--adapters", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "'fc1'" in result.output and "does not exist in StableDiffusionPipeline" in result.output


def test_uploads_are_checked_against_the_pipeline_and_join_the_live_merge(client, folders, tmp_path):
    wrong = make_adapter({"unet.down_blocks.0.attentions.0.proj_in": (8, 3)}, rank=2, seed=0, name="wrong")
    path = save_adapter(wrong, tmp_path / "wrong.safetensors", format="diffusers")
    *_, status = client.predict([handle_file(str(path))], api_name="/upload")
    assert "Adapter refused" in status and "proj_in" in status, status
    base, _ = show(client)
    stripes = random_pipeline_loras(tiny_sd_pipeline(seed=0), ["a", "b", "stripes"])[2]
    path = save_adapter(stripes, tmp_path / "stripes.safetensors", format="kohya")
    *sliders, status = client.predict([handle_file(str(path))], api_name="/upload")
    assert "Added stripes" in status and sliders[2]["visible"], status
    weights = [0.0, 0.0, 1.0] + [0.0] * (MAX_ADAPTERS - 3)
    _, image_path, _, _ = client.predict("linear", *weights, *NO_PARAMS, "", api_name="/preview")
    assert np.abs(np.asarray(Image.open(image_path).convert("RGB")).astype(int) - base).mean() > 2
    # the page refreshes the fusion section's dropdowns after an upload (`/fusion_adapters`, chained after
    # `/upload`); once they list it, the upload can be fused
    subject, style = client.predict("smudge", "sparkle", api_name="/fusion_adapters")
    assert (
        [name for name, _ in subject["choices"]]
        == ["smudge", "sparkle", "stripes"]
        == [name for name, _ in style["choices"]]
    )
    assert (subject["value"], style["value"]) == ("smudge", "sparkle")
    path, timing = client.predict("smudge", "stripes", "linear", 1.0, 1.0, 1.0, 0, 1, 0, 1, api_name="/fusion")
    assert "linear" in timing and np.abs(np.asarray(Image.open(path).convert("RGB")).astype(int) - base).mean() > 2


def test_pair_choices_keep_the_picks_that_exist():
    from adaptermerge.ui.fusion import pair_choices

    assert pair_choices(["a", "b", "c"], "b", "a") == ("b", "a")
    assert pair_choices(["a", "b", "c"], None, "gone") == ("a", "c")
    assert pair_choices([], "a", None) == (None, None)


def test_dora_adapters_preview_and_export_their_exact_merge(folders, tmp_path):
    """DoRA LoRAs cannot be re-weighted in place (their magnitudes depend on the weights): each slider move merges
    them with the pipeline's own base weights. The image equals diffusers rendering the merge of the same adapters
    with the saved pipeline as `base`, and the export holds that merge; advanced weights are refused for them."""
    from diffusers import DiffusionPipeline

    from adaptermerge import load_adapter, merge_adapters
    from adaptermerge.errors import InvalidParameterError
    from adaptermerge.ui.workbench import export, make_workbench

    pipe = DiffusionPipeline.from_pretrained(str(folders / "base"))
    paths = [
        save_random_pipeline_lora(
            pipe, tmp_path / "doras" / f"dora{i}", seed=i, rank=2, text_encoder=False, use_dora=True
        )
        for i in range(2)
    ]
    bench = make_workbench(str(folders / "base"), tmp_path / "doras", steps=STEPS, size=SIZE)
    assert bench.names == ["dora0", "dora1"]
    weights = [0.8, -0.5]
    image = bench.show(weights, "linear", {})

    reference = merge_adapters(paths, weights, base=folders / "base")
    expected = DiffusionPipeline.from_pretrained(str(folders / "base"))
    expected.set_progress_bar_config(disable=True)
    expected.load_lora_weights(str(save_adapter(reference, tmp_path / "reference", format="diffusers")))
    assert np.abs(image.astype(int) - diffusers_image(expected)).max() <= 2
    assert np.abs(image.astype(int) - bench.show([0.0, 0.0], "linear", {}).astype(int)).mean() > 1

    exported = load_adapter(export(bench, weights, "linear", {}, "diffusers"))
    for module, update in reference.items():
        torch.testing.assert_close(exported[module].magnitude, update.magnitude.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidParameterError, match="DoRA"):
        bench.show(weights, "linear", {}, {bench.names[0]: {"default": 0.5}})


def fusion(client, mode, subject_weight=1.0, style_weight=1.0, mu=1.0, schedule=(0.0, 1.0, 0.0, 1.0)):
    """The `/fusion` image for subject `smudge` and style `sparkle`."""
    path, timing = client.predict(
        "smudge", "sparkle", mode, subject_weight, style_weight, mu, *schedule, api_name="/fusion"
    )
    assert mode in timing
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_fusion_np_lora_mu_slider_runs_from_the_sum_to_the_projection_diffusers_renders(client, folders, tmp_path):
    from diffusers import DiffusionPipeline

    from adaptermerge import merge_adapters

    linear = fusion(client, "linear")
    assert np.array_equal(fusion(client, "np_lora", mu=0.0), linear)
    projected = fusion(client, "np_lora", mu=1.0)
    assert np.abs(projected - linear).mean() > 0.5
    adapters = [folders / "adapters" / "smudge", folders / "adapters" / "sparkle" / "sparkle.safetensors"]
    merged = merge_adapters(adapters, [1.0, 1.0], "np_lora", mu=1.0)
    expected = DiffusionPipeline.from_pretrained(str(folders / "base"))
    expected.set_progress_bar_config(disable=True)
    expected.load_lora_weights(str(save_adapter(merged, tmp_path / "np", format="diffusers")))
    assert np.abs(projected - diffusers_image(expected)).max() <= 2


def test_fusion_schedule_equals_set_adapters_changed_by_hand(client, folders):
    """Style started at 50% of 3 steps: off at progress 0 and 1/3, on at 2/3."""
    from diffusers import DiffusionPipeline

    scheduled = fusion(client, "schedule", schedule=(0.0, 1.0, 0.5, 1.0))
    assert np.abs(scheduled - fusion(client, "linear")).mean() > 0.5
    pipe = DiffusionPipeline.from_pretrained(str(folders / "base"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folders / "adapters" / "smudge"), adapter_name="smudge")
    pipe.load_lora_weights(str(folders / "adapters" / "sparkle" / "sparkle.safetensors"), adapter_name="sparkle")
    by_step = [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    pipe.set_adapters(["smudge", "sparkle"], by_step[0])

    def callback(pipe, step, timestep, kwargs):
        pipe.set_adapters(["smudge", "sparkle"], by_step[(step + 1) % STEPS])
        return kwargs

    assert np.abs(scheduled - diffusers_image(pipe, callback)).max() <= 2
    with pytest.raises(AppError, match="start < stop"):
        fusion(client, "schedule", schedule=(0.6, 0.5, 0.0, 1.0))


def test_fusion_k_lora_and_the_main_sliders_share_the_pipeline(client):
    base, _ = show(client)
    switched = fusion(client, "k_lora")
    assert np.abs(switched - fusion(client, "linear")).mean() > 0.5
    assert np.array_equal(fusion(client, "k_lora"), switched)
    assert np.array_equal(show(client)[0], base)  # the workbench's own preview comes back unchanged


def xy_grid(client, x_values, y_values):
    """`/fusion_grid` of np_lora (smudge, sparkle at weight 1, mu 1): style weight on x, mu on y."""
    settings = ["smudge", "sparkle", "np_lora", 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    return client.predict(*settings, "style weight", x_values, "mu", y_values, api_name="/fusion_grid")


def test_xy_grid_of_style_weight_by_mu_is_one_png_of_the_single_renders(client):
    grid_path, png = xy_grid(client, "0, 1", "0, 0.5, 1")
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(int)
    assert png.endswith(".png") and np.array_equal(np.asarray(Image.open(png).convert("RGB")).astype(int), grid)
    factor, gap, top = 128 // SIZE, 4, 16
    cell = SIZE * factor
    assert grid.shape[0] == top + 3 * (cell + gap)
    left = grid.shape[1] - 2 * (cell + gap)
    single = fusion(client, "np_lora", style_weight=1.0, mu=0.5)
    crop = grid[top + (cell + gap) : top + (cell + gap) + cell, left + cell + gap : left + 2 * cell + gap]
    assert np.array_equal(crop, single.repeat(factor, axis=0).repeat(factor, axis=1))
    with pytest.raises(AppError, match="comma-separated"):
        xy_grid(client, "a, b", "0")
