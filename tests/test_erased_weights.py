"""The erased-weights file: round trip, keys, header, atomic no-overwrite writes, applying, refusing bad files."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_adapter

from esd_core.config import ESDConfig
from esd_core.errors import ErasedWeightsError
from esd_core.erased_weights import (FORMAT_ID, apply_to_module, file_key, load_erased_weights, param_name,
                                     read_header, save_erased_weights)
from esd_core.testing import TinyPipelineSpec
from esd_core.trainer import erase

CONFIG = ESDConfig(concepts=("a cat", "a dog"), iterations=3, learning_rate=1e-3, ddim_steps=4, seed=0)


@pytest.fixture(scope="module")
def trained():
    """(adapter with trained weights left in, erased weights, base state) from one short run."""
    adapter = make_adapter()
    base = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    result = erase(adapter, CONFIG, restore=False)
    return adapter, result.to_erased_weights(adapter), base


def fresh_base():
    return make_adapter()


def test_round_trip_keeps_tensors_and_header(tmp_path, trained):
    _, erased, _ = trained
    path = save_erased_weights(tmp_path / "e.safetensors", erased)
    loaded = load_erased_weights(path)
    assert loaded.diffs.keys() == erased.diffs.keys()
    assert all(torch.equal(loaded.diffs[k], erased.diffs[k]) for k in erased.diffs)
    h = loaded.header
    assert h == erased.header
    assert h.concepts == ("a cat", "a dog") and h.method == "esd-x" and h.iterations_run == 3
    assert h.hyperparameters["learning_rate"] == 1e-3 and h.hyperparameters["ddim_steps"] == 4
    assert h.model_family == "sd1" and h.base_model == "tiny-seed0" and len(h.base_tensors_hash) == 64
    assert read_header(path) == h


def test_keys_are_comfyui_lora_diff_keys(tmp_path, trained):
    _, erased, _ = trained
    path = save_erased_weights(tmp_path / "e.safetensors", erased)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert keys and all(k.startswith("diffusion_model.input_blocks.") or k.startswith("diffusion_model.output_blocks.")
                        or k.startswith("diffusion_model.middle_block.") for k in keys)
    assert any(k.endswith(".attn2.to_k.diff") for k in keys) and any(k.endswith(".attn2.to_out.0.diff_b") for k in keys)
    assert dtypes == {torch.float32}
    assert meta["esd.format"] == FORMAT_ID and json.loads(meta["esd.concepts"]) == ["a cat", "a dog"]
    for required in ("esd.format_version", "esd.method", "esd.hyperparameters", "esd.iterations_run", "esd.base_model",
                     "esd.base_hash", "esd.base_tensors_hash", "esd.model_family", "esd.created", "esd.esd_version"):
        assert required in meta


def test_key_names_convert_both_ways():
    assert file_key("input_blocks.1.1.proj_in.weight") == "diffusion_model.input_blocks.1.1.proj_in.diff"
    assert file_key("out.2.bias") == "diffusion_model.out.2.diff_b"
    assert param_name("diffusion_model.out.2.diff_b") == "out.2.bias"
    with pytest.raises(ErasedWeightsError):
        param_name("lora_unet_x.lora_up.weight")


def test_strength_one_reproduces_the_trained_weights_and_zero_the_base(trained):
    trained_adapter, erased, base = trained
    for strength, expected in ((1.0, dict(trained_adapter.unet.named_parameters())), (0.0, base)):
        target = fresh_base()
        assert apply_to_module(target.unet, erased, strength, target.naming) is None  # same base: no warning
        for n, p in target.unet.named_parameters():
            assert torch.equal(p.data, expected[n].data), (strength, n)


def test_half_strength_is_half_the_change(trained):
    _, erased, base = trained
    target = fresh_base()
    apply_to_module(target.unet, erased, 0.5, target.naming)
    moved = [n for n, p in target.unet.named_parameters() if not torch.equal(p.data, base[n])]
    assert moved and all(".attn2." in n for n in moved)


def test_never_overwrites_and_leaves_no_partial_file(tmp_path, trained):
    _, erased, _ = trained
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_erased_weights(path, erased)
    assert path.read_bytes() == b"precious"
    broken = erased.__class__(header=erased.header, diffs={"not.a.weight.name": torch.zeros(1)})
    with pytest.raises(ErasedWeightsError):
        save_erased_weights(tmp_path / "new.safetensors", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_file_for_another_architecture_is_refused(trained):
    _, erased, _ = trained
    other = make_adapter(TinyPipelineSpec(cross_attention_dim=48))
    before = {n: p.detach().clone() for n, p in other.unet.named_parameters()}
    with pytest.raises(ErasedWeightsError, match="made for a sd1 model"):
        apply_to_module(other.unet, erased, 1.0, other.naming)
    assert all(torch.equal(p, before[n]) for n, p in other.unet.named_parameters())  # nothing was changed


def test_other_base_weights_get_a_warning(trained):
    _, erased, _ = trained
    other = make_adapter(TinyPipelineSpec(seed=1))
    warning = apply_to_module(other.unet, erased, 1.0, other.naming)
    assert warning and "differ from the base" in warning


def damaged_files(tmp_path, good):
    data = good.read_bytes()
    yield "truncated", data[: len(data) // 2]
    yield "random bytes", bytes(range(256)) * 4
    yield "bad header length", struct.pack("<Q", 10 ** 12) + data[8:]
    meta_json = data[8: 8 + struct.unpack("<Q", data[:8])[0]]
    yield "mangled header", data[:8] + meta_json.replace(b'"esd.iterations_run":"3"', b'"esd.iterations_run":"x"') \
        + data[8 + len(meta_json):]


def test_damaged_files_are_refused(tmp_path, trained):
    _, erased, _ = trained
    good = save_erased_weights(tmp_path / "good.safetensors", erased)
    for label, content in damaged_files(tmp_path, good):
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ErasedWeightsError, match="damaged|not a safetensors"):
            load_erased_weights(path)


def test_other_safetensors_files_are_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ErasedWeightsError, match="not an ESD erased-weights file"):
        load_erased_weights(path)
    with pytest.raises(ErasedWeightsError, match="does not exist"):
        load_erased_weights(tmp_path / "missing.safetensors")
