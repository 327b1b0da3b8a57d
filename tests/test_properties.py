"""Property-based tests (Hypothesis): the file loaders against damaged and hostile files, and the input validation
against any value. A loader either returns a valid object or raises its own error with a message, never anything
else; a setting is either accepted within its documented limits or refused with a `ConfigError`."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from esd_core.config import (MAX_CONCEPT_CHARS, MAX_CONCEPTS, MAX_DDIM_STEPS, MAX_GUIDANCE, MAX_RESOLUTION, ESDConfig,
                             check_schedule)
from esd_core.erased_weights import (STORED_DTYPES, ErasedWeights, ErasedWeightsHeader, load_erased_weights,
                                     save_erased_weights)
from esd_core.errors import ConfigError, ErasedWeightsError, ResumeError
from esd_core.files import WINDOWS_RESERVED, check_output_name
from esd_core.resume import Identity, RunState, load_checkpoint, save_checkpoint
from esd_core.sampling import ddim_timesteps

FILES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(max_examples=300, deadline=None)
WORK = Path(tempfile.mkdtemp(prefix="esd_properties_"))


@functools.cache
def good_file() -> bytes:
    """A valid erased-weights file (full differences, fp16, two modules) as bytes."""
    header = ErasedWeightsHeader(concepts=("a cat",), method="esd-x", hyperparameters={"seed": 0}, iterations_run=1,
                                 base_model="tiny", base_hash="", base_tensors_hash="0" * 64, model_family="sd1")
    diffs = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 6),
             "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": torch.randn(8),
             "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": torch.randn(8, 8)}
    path = save_erased_weights(WORK / f"good_{os.getpid()}.safetensors", ErasedWeights.from_diffs(header, diffs))
    data = path.read_bytes()
    path.unlink()
    return data


def load_bytes(data: bytes, name: str = "f.safetensors"):
    path = WORK / name
    path.write_bytes(data)
    try:
        return load_erased_weights(path)
    finally:
        path.unlink()


def assert_valid(erased: ErasedWeights) -> None:
    assert erased.modules
    for key, t in erased.tensors().items():
        assert t.dtype in STORED_DTYPES and torch.isfinite(t).all(), key
        assert key.startswith("lora_unet_")


def loads_or_refuses(data: bytes) -> None:
    try:
        erased = load_bytes(data)
    except ErasedWeightsError as e:
        assert str(e)  # a message, never an empty error
        return
    assert_valid(erased)


@FILES
@given(st.integers(min_value=0, max_value=10**6))
def test_a_truncated_file_is_refused(cut):
    data = good_file()
    assume(cut < len(data))
    loads_or_refuses(data[:cut])


@FILES
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8))
def test_flipped_bytes_load_as_a_valid_erasure_or_are_refused(flips):
    data = bytearray(good_file())
    for pos, byte in flips:
        data[pos % len(data)] = byte
    loads_or_refuses(bytes(data))


@FILES
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data):
    try:
        load_bytes(data)
    except ErasedWeightsError:
        return
    raise AssertionError("random bytes loaded as an erasure")


def _header_and_rest(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + rest


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)
META_KEYS = ["esd.format", "esd.format_version", "esd.kind", "esd.save_dtype", "esd.concepts", "esd.method",
             "esd.hyperparameters", "esd.iterations_run", "esd.base_tensors_hash", "esd.model_family", "esd.dropped",
             "esd.rank", "esd.alpha", "esd.kept_energy", "esd.export"]


@FILES
@given(st.dictionaries(st.sampled_from(META_KEYS), st.text(max_size=40) | json_values.map(json.dumps), max_size=6),
       st.booleans())
def test_hostile_header_values_are_refused_or_read_as_a_valid_header(changes, drop):
    header, rest = _header_and_rest(good_file())
    meta = dict(header["__metadata__"])
    for key, value in changes.items():
        if drop:
            meta.pop(key, None)
        else:
            meta[key] = value
    header["__metadata__"] = meta
    loads_or_refuses(_with_header(header, rest))


@FILES
@given(st.integers(min_value=1, max_value=3000))
def test_deeply_nested_header_json_is_refused(depth):
    header, rest = _header_and_rest(good_file())
    header["__metadata__"]["esd.hyperparameters"] = "[" * depth + "]" * depth
    loads_or_refuses(_with_header(header, rest))


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX"]


@FILES
@given(st.sampled_from(DTYPES), st.lists(st.integers(min_value=0, max_value=64), max_size=3), st.text(max_size=30),
       st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=600))
def test_tensor_entries_with_other_dtypes_shapes_keys_or_offsets_are_refused(dtype, shape, key, start, end):
    header, rest = _header_and_rest(good_file())
    name = next(k for k in header if k != "__metadata__")
    entry = header.pop(name)
    header[key or name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]} if start % 3 else \
        {**entry, "dtype": dtype}
    loads_or_refuses(_with_header(header, rest))


# ------------------------------------------------------------------ resume checkpoints

IDENTITY = Identity(ESDConfig(concepts=("a cat",), iterations=5), base_tensors_hash="h" * 64, base_model="tiny")


@functools.cache
def good_checkpoint() -> bytes:
    state = RunState(iteration=2, losses=[0.5, 0.25], rng=random.Random(0).getstate(),
                     noise=torch.Generator().manual_seed(0).get_state(), source={"pool": torch.zeros(2, 4)},
                     trainables={"w": torch.ones(3)}, optimizer={"state": {0: {"step": torch.tensor(2.0),
                                                                               "exp_avg": torch.zeros(3)}}},
                     scaler={})
    path = save_checkpoint(WORK / f"good_{os.getpid()}.esd-resume", state, IDENTITY)
    data = path.read_bytes()
    path.unlink()
    return data


@FILES
@given(st.integers(min_value=0), st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                                          max_size=6))
def test_a_damaged_resume_checkpoint_is_refused_or_read_whole(cut, flips):
    data = bytearray(good_checkpoint())
    for pos, byte in flips:
        data[pos % len(data)] = byte
    data = bytes(data[: max(cut % (len(data) + 1), 0)] if cut % 2 else data)
    path = WORK / "c.esd-resume"
    path.write_bytes(data)
    try:
        state = load_checkpoint(path, IDENTITY)
    except ResumeError as e:
        assert str(e)
        return
    finally:
        path.unlink()
    assert isinstance(state.trainables, dict) and isinstance(state.losses, list)


# ------------------------------------------------------------------ input validation

numbers = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-2**70, max_value=2**70)
           | st.booleans() | st.none() | st.text(max_size=5))
texts = st.text(max_size=MAX_CONCEPT_CHARS + 50)


@CHEAP
@given(concepts=st.lists(texts, max_size=5) | st.just([f"c{i}" for i in range(MAX_CONCEPTS + 1)]),
       iterations=numbers, learning_rate=numbers, negative_guidance=numbers, start_guidance=numbers,
       ddim_steps=numbers, resolution=numbers, seed=numbers, method=st.text(max_size=12) | st.sampled_from(["esd-x", "xattn"]))
def test_any_setting_is_accepted_within_its_limits_or_refused_with_a_config_error(concepts, iterations, learning_rate,
                                                                                  negative_guidance, start_guidance,
                                                                                  ddim_steps, resolution, seed, method):
    try:
        config = ESDConfig(concepts=tuple(concepts), iterations=iterations, learning_rate=learning_rate,
                           negative_guidance=negative_guidance, start_guidance=start_guidance, ddim_steps=ddim_steps,
                           resolution=resolution, seed=seed, method=method)
    except ConfigError as e:
        assert str(e)
        return
    assert 1 <= len(config.concepts) <= MAX_CONCEPTS
    assert all(c == c.strip() and 0 < len(c) <= MAX_CONCEPT_CHARS for c in config.concepts)
    assert all(c.encode("utf-8") for c in config.concepts)  # every concept can be written into a file header
    assert isinstance(config.iterations, int) and 1 <= config.iterations
    assert math.isfinite(config.learning_rate) and 0 < config.learning_rate < 1
    assert 0 <= config.negative_guidance <= MAX_GUIDANCE and 0 <= config.start_guidance <= MAX_GUIDANCE
    assert 2 <= config.ddim_steps <= MAX_DDIM_STEPS
    assert 0 <= config.resolution <= MAX_RESOLUTION and config.resolution % 8 == 0
    assert 0 <= config.seed < 2**64
    torch.Generator().manual_seed(config.seed)  # the seed is one torch takes


@CHEAP
@given(st.integers(min_value=2, max_value=4000), st.data())
def test_every_accepted_ddim_schedule_stays_inside_the_models(length, data):
    steps = data.draw(st.integers(min_value=2, max_value=length + 5))
    try:
        check_schedule(steps, length)
    except ConfigError:
        assert steps >= length
        return
    timesteps = ddim_timesteps(length, steps)
    assert 0 <= int(timesteps.min()) and int(timesteps.max()) < length


@CHEAP
@given(st.text(max_size=250) | st.lists(st.sampled_from(["..", ".", "", "a", "CON", "b.", "x y", "/", "\\", "C:"]),
                                        max_size=5).map("/".join))
def test_an_accepted_output_name_stays_in_its_folder_on_every_os(name):
    try:
        clean = check_output_name(name)
    except ConfigError as e:
        assert str(e)
        return
    root = Path("/models/loras/esd")
    assert os.path.normpath(root / clean).startswith(str(root) + os.sep)
    for part in clean.split("/"):
        assert part not in ("", ".", "..") and part == part.rstrip(". ")
        assert part.split(".")[0].strip().lower() not in WINDOWS_RESERVED
        assert not set(part) & set('<>:"|?*\\') and part.isprintable()
