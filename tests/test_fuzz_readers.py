"""Fuzzing every reader: mutated PEFT folders, kohya and diffusers files through `load_adapter`, `merge_adapters` and
`adaptermerge inspect`/`merge`.

Each example flips bytes of a valid file, mutates its safetensors JSON header (dtypes, shapes, offsets, keys,
metadata, the length prefix), rewrites one tensor consistently (any shape, dtype, fill value; or adds an `.alpha`),
or mutates its PEFT config. Every outcome must be a valid result or an `AdapterMergeError`
(exit 2 with one line in the CLI): never another exception, a hang, a partial output or a changed input.

The `fuzz-ci` profile runs a few hundred examples, derandomized; `ADAPTERMERGE_FUZZ=long` selects `fuzz-long`
(thousands, random, for a run of its own: `ADAPTERMERGE_FUZZ=long pytest tests/test_fuzz_readers.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptermerge import load_adapter, merge_adapters, save_adapter
from adaptermerge.cli import main
from adaptermerge.errors import AdapterMergeError, AdapterMergeWarning
from adaptermerge.io import peft
from tests.factories import make_adapter

settings.register_profile(
    "fuzz-ci",
    max_examples=110,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz-long", settings.get_profile("fuzz-ci"), max_examples=3000, derandomize=False)
FUZZ = settings.get_profile("fuzz-long" if os.environ.get("ADAPTERMERGE_FUZZ") == "long" else "fuzz-ci")
SECONDS_PER_EXAMPLE = 30

SEEDS = {
    "peft": ({"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.mlp.down_proj": (16, 32)}, "a"),
    "kohya": (
        {"unet.mid_block.attentions.0.proj_in": (8, 8), "text_encoder.text_model.encoder.layers.0.mlp.fc1": (8, 8)},
        "a.safetensors",
    ),
    "diffusers": (
        {"unet.mid_block.attentions.0.proj_in": (8, 8), "unet.down_blocks.0.attentions.0.proj_out": (8, 8)},
        "a.safetensors",
    ),
}
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**400), 10**400)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["q_proj", "(", "^model", ".*"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(["q_proj", "("]), inner, max_size=3)
    ),
    max_leaves=6,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "ZZ"]
CONFIG_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "peft_type"]
CONFIG_FIELDS += ["lora_bias", "base_model_name_or_path", "task_type", "target_modules"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A valid adapter per format, and a second one of the same model to merge with."""
    folder = tmp_path_factory.mktemp("seeds")
    made = {}
    for fmt, (shapes, name) in SEEDS.items():
        ranks = dict(zip(shapes, (2, 3)))
        made[fmt] = [
            save_adapter(make_adapter(shapes, ranks, seed=i), folder / fmt / f"{i}{name[1:]}", format=fmt)
            for i in (0, 1)
        ]
    return made


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def _split(raw: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _join(header: dict, body: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + body


def flip_bytes(data: st.DataObject, raw: bytes) -> bytes:
    buffer = bytearray(raw)
    (header_size,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        end = data.draw(st.sampled_from([8 + header_size, len(raw)]), label="region end")  # the header, or anywhere
        position = data.draw(st.integers(0, end - 1), label="position")
        buffer[position] ^= data.draw(st.integers(1, 255), label="xor")
    return bytes(buffer)


def mutate_header(data: st.DataObject, raw: bytes) -> bytes:
    header, body = _split(raw)
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="key")
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "entry", "metadata", "length"]))
    if kind == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        header[key]["shape"] = data.draw(st.lists(st.integers(-1, 2**33), max_size=5) | JSON, label="shape")
    elif kind == "offsets":
        header[key]["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**40), max_size=3) | JSON, label="offsets")
    elif kind == "drop":
        del header[key]
    elif kind == "rename":
        variants = [key.replace("A.", "B.").replace("down", "up"), key + ".x", key.removesuffix(".weight"), key[:9]]
        new = data.draw(st.sampled_from(variants) | st.text(max_size=12), label="new key")
        header[new] = header.pop(key)
    elif kind == "entry":
        header[key] = data.draw(JSON, label="entry")
    elif kind == "metadata":
        metadata = dict(header.get("__metadata__", {}))
        field = data.draw(st.sampled_from(["lora_adapter_metadata", "format", "adaptermerge"]), label="field")
        nested = st.dictionaries(
            st.sampled_from(["unet.r", "unet.lora_alpha", "unet.alpha_pattern", "unet.use_rslora"]), JSON
        )
        metadata[field] = json.dumps(data.draw(nested | JSON, label="value"))
        header["__metadata__"] = data.draw(st.just(metadata) | JSON, label="metadata")
    else:
        return _join(header, body, data.draw(st.integers(-64, 2**40), label="length delta"))
    return _join(header, body)


def mutate_tensor(data: st.DataObject, raw: bytes) -> bytes:
    """Rewrite one tensor (or add an `.alpha`) with a consistent header: any shape, dtype and fill value."""
    header, _ = _split(raw)
    tensors = safetensors.torch.load(raw)
    key = data.draw(st.sampled_from(sorted(tensors)), label="key")
    if data.draw(st.booleans(), label="add an alpha"):
        key = key.rsplit(".lora", 1)[0] + ".alpha"
    shape = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, 16, 32]), max_size=4), label="shape")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]))
    fill = data.draw(st.sampled_from([0.0, 1.0, -2.0, 7e4, 1e38, math.inf, math.nan]), label="fill")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting NaN or Inf to an integer dtype
        tensors[key] = torch.full(shape, fill, dtype=torch.float64).to(dtype)
    return safetensors.torch.save(tensors, header.get("__metadata__"))


def mutate_config(data: st.DataObject, raw: bytes) -> bytes:
    config = json.loads(raw)
    kind = data.draw(st.sampled_from(["set", "drop", "replace", "bytes"]), label="config mutation")
    if kind == "bytes":
        return data.draw(st.binary(max_size=40), label="config bytes")
    if kind == "replace":
        return json.dumps(data.draw(JSON, label="config")).encode()
    field = data.draw(st.sampled_from(CONFIG_FIELDS), label="field")
    if kind == "drop":
        config.pop(field, None)
    else:
        config[field] = data.draw(JSON, label="value")
    return json.dumps(config).encode()


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail an example that runs longer than `seconds` (a hang), instead of stalling the suite."""

    def hang(*_):
        raise AssertionError(f"the example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_library(path: Path, other: Path) -> None:
    """Reading every module and merging must succeed or raise an AdapterMergeError; nothing else."""
    try:
        adapter = load_adapter(path)
        for module in adapter:
            adapter[module].check_finite()
        merge_adapters([adapter, other], rank=1)
    except AdapterMergeError:
        pass


def check_cli(path: Path, other: Path, fmt: str, work: Path, rank: str | None) -> None:
    """`inspect` and `merge` exit 0 with a valid result or 2 with one line and no output."""
    runner = CliRunner()
    inspected = runner.invoke(main, ["-q", "inspect", "--json", str(path)])
    assert inspected.exit_code in (0, 2), (inspected.output, inspected.exception)
    out = work / ("out" if fmt == "peft" else "out.safetensors")
    merged = runner.invoke(
        main, ["-q", "merge", str(path), str(other), "-o", str(out), *(["-r", rank] if rank else [])]
    )
    assert merged.exit_code in (0, 2), (merged.output, merged.exception)
    for result in (inspected, merged):
        if result.exit_code == 2:
            assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    if merged.exit_code == 2:
        assert not out.exists()
    else:
        written = load_adapter(out)
        for module in written:
            written[module].check_finite()
    assert sorted(p.name for p in work.iterdir()) == sorted({path.name, *([out.name] if out.exists() else [])})


@pytest.mark.parametrize("fmt", list(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_adapters_are_read_or_refused_cleanly(seeds, fmt, data):
    seed, other = seeds[fmt]
    mutations = ["flip", "header", "tensor"] + (["config"] * 2 if fmt == "peft" else [])
    mutation = data.draw(st.sampled_from(mutations), label="mutation")
    work = Path(tempfile.mkdtemp(prefix=f"fuzz_{fmt}_"))
    try:
        path = work / seed.name
        if seed.is_dir():
            shutil.copytree(seed, path)
        else:
            shutil.copy(seed, path)
        target = path / (peft.CONFIG_NAME if mutation == "config" else peft.WEIGHTS_NAME) if path.is_dir() else path
        mutate = {"flip": flip_bytes, "header": mutate_header, "tensor": mutate_tensor, "config": mutate_config}[
            mutation
        ]
        target.write_bytes(mutate(data, target.read_bytes()))
        before, before_other = digest(path), digest(other)
        rank = data.draw(st.sampled_from([None, "1"]), label="rank")
        with time_limit(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
            warnings.simplefilter("ignore", AdapterMergeWarning)
            check_library(path, other)
            check_cli(path, other, fmt, work, rank)
        assert digest(path) == before and digest(other) == before_other, "an input changed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
