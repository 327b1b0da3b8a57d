"""The erased-weights file: round trip, keys, header, save dtypes, version 1 files, LoRA files, resolving stems against
a target model, atomic no-overwrite writes, applying, and refusing bad files."""
import dataclasses
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_adapter

from esd_core.config import ESDConfig
from esd_core.erased_weights import (FORMAT_ID, ErasedWeights, ModuleChange, apply_to_module, load_erased_weights,
                                     module_ldm_names, read_header, resolve,
                                     save_erased_weights)
from esd_core.errors import ErasedWeightsError
from esd_core.keymap import module_stem, stems_of
from esd_core.lora import LoRAFactors
from esd_core.testing import TinyPipelineSpec
from esd_core.trainer import erase

CONFIG = ESDConfig(concepts=("a cat", "a dog"), iterations=3, learning_rate=1e-3, ddim_steps=4, seed=0)
ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def trained():
    """(adapter with trained weights left in, erased weights, base state) from one short esd-x run."""
    adapter = make_adapter()
    base = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    result = erase(adapter, CONFIG, restore=False)
    return adapter, result.to_erased_weights(adapter), base


@pytest.fixture(scope="module")
def trained_u():
    """The same for esd-u: convolutions, norms, biases."""
    adapter = make_adapter()
    result = erase(adapter, dataclasses.replace(CONFIG, method="esd-u"), restore=False)
    return adapter, result.to_erased_weights(adapter)


def fresh_base():
    return make_adapter()


def file_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def unet_equal(module, expected):
    return all(torch.equal(p.data, expected[n].data) for n, p in module.named_parameters())


def test_round_trip_keeps_tensors_and_header(tmp_path, trained):
    _, erased, _ = trained
    path = save_erased_weights(tmp_path / "e.safetensors", erased, save_dtype="fp32")
    loaded = load_erased_weights(path)
    assert loaded.modules.keys() == erased.modules.keys()
    for stem, change in erased.modules.items():
        assert torch.equal(loaded.modules[stem].weight, change.weight)
        assert (change.bias is None) == (loaded.modules[stem].bias is None)
    h = loaded.header
    assert h == dataclasses.replace(erased.header, save_dtype="fp32")
    assert h.concepts == ("a cat", "a dog") and h.method == "esd-x" and h.iterations_run == 3
    assert h.hyperparameters["learning_rate"] == 1e-3 and h.hyperparameters["ddim_steps"] == 4
    assert h.model_family == "sd1" and h.base_model == "tiny-seed0" and len(h.base_tensors_hash) == 64
    assert h.format_version == 2 and h.kind == "full"
    assert read_header(path) == h


def test_keys_are_the_form_every_ui_loads(tmp_path, trained):
    _, erased, _ = trained
    tensors, meta = file_tensors(save_erased_weights(tmp_path / "e.safetensors", erased))
    assert tensors and all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in tensors)
    assert f"{module_stem(ATTN2_K)}.diff" == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.diff"
    assert f"{module_stem(ATTN2_K)}.diff" in tensors
    assert any(k.endswith("_attn2_to_out_0.diff_b") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # the default save dtype
    assert meta["esd.format"] == FORMAT_ID and meta["esd.format_version"] == "2" and meta["esd.kind"] == "full"
    assert meta["esd.save_dtype"] == "fp16" and json.loads(meta["esd.concepts"]) == ["a cat", "a dog"]
    for required in ("esd.method", "esd.hyperparameters", "esd.iterations_run", "esd.base_model", "esd.base_hash",
                     "esd.base_tensors_hash", "esd.model_family", "esd.created", "esd.esd_version"):
        assert required in meta


@pytest.mark.parametrize("save_dtype,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_save_dtypes_round_each_value_once(tmp_path, trained, save_dtype, dtype):
    _, erased, _ = trained
    fp32 = save_erased_weights(tmp_path / "reference.safetensors", erased, save_dtype="fp32")
    path = save_erased_weights(tmp_path / f"{save_dtype}.safetensors", erased, save_dtype=save_dtype)
    tensors, _ = file_tensors(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    if dtype != torch.float32:  # half the bytes (plus the same header)
        assert path.stat().st_size < 0.55 * fp32.stat().st_size
    loaded = load_erased_weights(path)
    for stem, change in erased.modules.items():
        got, want = loaded.modules[stem].weight.float(), change.weight
        assert torch.equal(got, want.to(dtype).float())  # exactly the round-to-nearest value, nothing else


def test_strength_one_of_an_fp32_file_is_the_trained_model_and_zero_the_base(tmp_path, trained):
    trained_adapter, erased, base = trained
    loaded = load_erased_weights(save_erased_weights(tmp_path / "e.safetensors", erased, save_dtype="fp32"))
    for strength, expected in ((1.0, dict(trained_adapter.unet.named_parameters())), (0.0, base)):
        target = fresh_base()
        assert apply_to_module(target.unet, loaded, strength, target.naming) is None  # same base: no warning
        assert unet_equal(target.unet, expected), strength


def test_half_strength_is_half_the_change(trained):
    trained_adapter, erased, base = trained
    full = dict(trained_adapter.unet.named_parameters())
    target = fresh_base()
    apply_to_module(target.unet, erased.cast(torch.float32), 0.5, target.naming)
    moved = [n for n, p in target.unet.named_parameters() if not torch.equal(p.data, base[n])]
    assert moved and all(".attn2." in n for n in moved)
    for n, p in target.unet.named_parameters():  # base + half of what training changed, every tensor
        half = base[n] + 0.5 * (full[n].data - base[n])
        assert torch.allclose(p.data, half, rtol=0, atol=1e-6 * float(base[n].abs().max()) + 1e-12), n


def v1_copy(tmp_path, v2_path, name="v1.safetensors"):
    """A version-1 file (as older versions of the pack wrote) with the same content as a v2 fp32 file."""
    tensors, meta = file_tensors(v2_path)
    ldm = {module_stem(m): m for m in _ldm_modules()}
    v1 = {f"diffusion_model.{ldm[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": t for k, t in tensors.items()}
    meta = {k: v for k, v in meta.items() if k not in ("esd.kind", "esd.save_dtype", "esd.dropped")}
    meta["esd.format_version"] = "1"
    save_file(v1, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def _ldm_modules():
    adapter = make_adapter()
    return {n.rpartition(".")[0] for n in module_ldm_names(adapter.unet, adapter.naming)}


def test_version_1_files_still_load_and_apply_the_same(tmp_path, trained):
    trained_adapter, erased, _ = trained
    v2 = save_erased_weights(tmp_path / "v2.safetensors", erased, save_dtype="fp32")
    v1 = v1_copy(tmp_path, v2)
    assert all(k.startswith("diffusion_model.") for k in load_file(str(v1)))
    loaded = load_erased_weights(v1)
    assert loaded.header.format_version == 1 and loaded.kind == "full" and loaded.header.save_dtype == "fp32"
    assert loaded.modules.keys() == erased.modules.keys()  # v1 keys converted to the v2 stems
    target = fresh_base()
    assert apply_to_module(target.unet, loaded, 1.0, target.naming) is None
    assert unet_equal(target.unet, dict(trained_adapter.unet.named_parameters()))


def test_a_file_mixing_key_forms_is_refused(tmp_path, trained):
    _, erased, _ = trained
    v2 = save_erased_weights(tmp_path / "v2.safetensors", erased, save_dtype="fp32")
    tensors, meta = file_tensors(v2)
    v1_tensors = load_file(str(v1_copy(tmp_path, v2)))
    first_v1 = next(iter(v1_tensors))
    mixed = {**{k: t for k, t in tensors.items() if not k.startswith(module_stem(ATTN2_K))},
             first_v1: v1_tensors[first_v1]}
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=meta)
    with pytest.raises(ErasedWeightsError, match="mixes key forms"):
        load_erased_weights(tmp_path / "mixed.safetensors")
    stem = module_stem(ATTN2_K)
    both = {**tensors, f"{stem}.lora_down.weight": torch.zeros(2, 32), f"{stem}.lora_up.weight": torch.zeros(32, 2)}
    save_file(both, str(tmp_path / "both.safetensors"), metadata=meta)
    with pytest.raises(ErasedWeightsError, match="mixes a full difference and a LoRA"):
        load_erased_weights(tmp_path / "both.safetensors")


def attn2_lora(erased: ErasedWeights, rank=2, alpha=4.0, seed=0):
    """Random LoRA factors for every attn2 Linear of the erasure (the shape a LoRA trainer produces), with the
    module paths of the tiny model."""
    g = torch.Generator().manual_seed(seed)
    paths = {module_stem(m): m for m in _ldm_modules()}
    factors = {}
    for stem, change in erased.modules.items():
        out, inp = change.weight.shape
        factors[paths[stem]] = LoRAFactors(down=torch.randn(rank, inp, generator=g) * 0.01,
                                           up=torch.randn(out, rank, generator=g) * 0.01, alpha=alpha)
    return factors


def test_lora_files_round_trip_and_apply_their_product(tmp_path, trained):
    _, erased, base = trained
    factors = attn2_lora(erased)
    biases = {f"{module}.bias": torch.full((32,), 0.5) for module in factors if module.endswith("to_out.0")}
    lora = ErasedWeights.from_lora(erased.header, factors, biases)
    assert lora.kind == "lora" and lora.header.rank == 2 and lora.header.alpha == 4.0
    assert sorted(lora.header.dropped) == sorted(f"{module_stem(m[:-5])}.diff_b" for m in biases)
    path = save_erased_weights(tmp_path / "lora.safetensors", lora, save_dtype="fp32")
    tensors, meta = file_tensors(path)
    assert meta["esd.kind"] == "lora" and meta["esd.rank"] == "2" and meta["esd.alpha"] == "4.0"
    assert not any(k.endswith(".diff_b") for k in tensors)  # never beside LoRA keys (A1111 would ignore it)
    stem = module_stem(ATTN2_K)
    assert tensors[f"{stem}.lora_down.weight"].shape == (2, 32) and tensors[f"{stem}.alpha"].item() == 4.0
    loaded = load_erased_weights(path)
    target = fresh_base()
    apply_to_module(target.unet, loaded, 0.5, target.naming)
    own = {ldm: n for ldm, n in module_ldm_names(target.unet, target.naming).items()}
    params = dict(target.unet.named_parameters())
    for module, f in factors.items():
        expected = base[own[f"{module}.weight"]] + 0.5 * (f.alpha / f.rank) * (f.up @ f.down)
        torch.testing.assert_close(params[own[f"{module}.weight"]].data, expected, rtol=0, atol=1e-7)
        if f"{module}.bias" in own:
            assert torch.equal(params[own[f"{module}.bias"]].data, base[own[f"{module}.bias"]])  # dropped


def test_conv_lora_shapes_and_norms_as_diffs(tmp_path, trained_u):
    """A trained-LoRA file for esd-u: convolutions as (r, in, kh, kw) / (out, r, 1, 1), norms as dense diffs."""
    _, erased = trained_u
    paths = {module_stem(m): m for m in _ldm_modules()}
    factors, diffs = {}, {}
    for stem, change in erased.modules.items():
        if change.weight.ndim >= 2:
            w = change.weight
            factors[paths[stem]] = LoRAFactors(down=torch.ones(1, *w.shape[1:]) * 1e-3,
                                               up=torch.ones(w.shape[0], 1, *([1, 1] if w.ndim == 4 else [])) * 1e-3,
                                               alpha=1.0)
        else:
            diffs[f"{paths[stem]}.weight"] = change.weight
            diffs[f"{paths[stem]}.bias"] = change.bias
    lora = ErasedWeights.from_lora(erased.header, factors, diffs)
    tensors, _ = file_tensors(save_erased_weights(tmp_path / "u.safetensors", lora))
    conv = module_stem("input_blocks.0.0")
    assert tensors[f"{conv}.lora_down.weight"].shape == (1, 4, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 1, 1, 1)
    norm = module_stem("input_blocks.1.1.norm")
    assert f"{norm}.diff" in tensors and f"{norm}.diff_b" in tensors
    target = fresh_base()
    apply_to_module(target.unet, load_erased_weights(tmp_path / "u.safetensors"), 1.0, target.naming)


def test_stems_resolve_only_against_the_targets_own_names():
    names = ["a.b_c.weight", "a_b.c.weight", "x.y.weight", "x.y.bias", "scale"]
    stems = stems_of(names)
    assert stems["lora_unet_x_y"] == "x.y" and stems["lora_unet_a_b_c"] is None and len(stems) == 2
    header = make_header()
    erasure = ErasedWeights(header, {"lora_unet_a_b_c": ModuleChange(weight=torch.zeros(1))})
    with pytest.raises(ErasedWeightsError, match="'lora_unet_a_b_c' names more than one module"):
        resolve(erasure, {n: torch.Size([1]) for n in names})
    erasure = ErasedWeights(header, {"lora_unet_x_z": ModuleChange(weight=torch.zeros(1))})
    with pytest.raises(ErasedWeightsError, match="has no module 'lora_unet_x_z'"):
        resolve(erasure, {n: torch.Size([1]) for n in names})
    assert resolve(ErasedWeights(header, {"lora_unet_x_y": ModuleChange(weight=torch.zeros(1))}),
                   {n: torch.Size([1]) for n in names}) == {"lora_unet_x_y": "x.y"}


def make_header(**changes):
    from esd_core.erased_weights import ErasedWeightsHeader

    return dataclasses.replace(ErasedWeightsHeader(concepts=("c",), method="esd-x", hyperparameters={},
                                                   iterations_run=1, base_model="m", base_hash="",
                                                   base_tensors_hash="", model_family="sd1"), **changes)


def test_never_overwrites_and_leaves_no_partial_file(tmp_path, trained):
    _, erased, _ = trained
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_erased_weights(path, erased)
    assert path.read_bytes() == b"precious"
    with pytest.raises(ErasedWeightsError, match="neither a weight nor a bias"):
        ErasedWeights.from_diffs(erased.header, {"not.a.weight.name": torch.zeros(1)})
    bias_only = ErasedWeights(erased.header, {"lora_unet_x": ModuleChange(bias=torch.zeros(2))})
    with pytest.raises(ErasedWeightsError, match="changes only its bias"):
        save_erased_weights(tmp_path / "bias.safetensors", bias_only)
    huge = ErasedWeights(erased.header, {"lora_unet_x": ModuleChange(weight=torch.full((2,), 1e6))})
    with pytest.raises(ErasedWeightsError, match="does not fit in fp16.*bf16 or fp32"):
        save_erased_weights(tmp_path / "huge.safetensors", huge)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_file_for_another_architecture_is_refused(trained):
    _, erased, _ = trained
    other = make_adapter(TinyPipelineSpec(cross_attention_dim=48))
    before = {n: p.detach().clone() for n, p in other.unet.named_parameters()}
    with pytest.raises(ErasedWeightsError, match="made for a sd1 model"):
        apply_to_module(other.unet, erased, 1.0, other.naming)
    assert unet_equal(other.unet, before)  # nothing was changed
    lora = ErasedWeights.from_lora(erased.header, attn2_lora(erased))
    with pytest.raises(ErasedWeightsError, match="made for a sd1 model.*shape"):
        apply_to_module(other.unet, lora, 1.0, other.naming)
    assert unet_equal(other.unet, before)


def test_other_base_weights_get_a_warning(trained):
    _, erased, _ = trained
    other = make_adapter(TinyPipelineSpec(seed=1))
    warning = apply_to_module(other.unet, erased, 1.0, other.naming)
    assert warning and "differ from the base" in warning


def damaged_files(good):
    data = good.read_bytes()
    yield "truncated", data[: len(data) // 2]
    yield "random bytes", bytes(range(256)) * 4
    yield "bad header length", struct.pack("<Q", 10 ** 12) + data[8:]
    meta_json = data[8: 8 + struct.unpack("<Q", data[:8])[0]]
    yield "mangled header", data[:8] + meta_json.replace(b'"esd.iterations_run":"3"', b'"esd.iterations_run":"x"') \
        + data[8 + len(meta_json):]
    yield "kind lies", data[:8] + meta_json.replace(b'"esd.kind":"full"', b'"esd.kind":"lora"') \
        + data[8 + len(meta_json):]


def test_damaged_files_are_refused(tmp_path, trained):
    _, erased, _ = trained
    good = save_erased_weights(tmp_path / "good.safetensors", erased)
    labels = []
    for label, content in damaged_files(good):
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ErasedWeightsError, match="damaged|not a safetensors"):
            load_erased_weights(path)
        labels.append(label)
    assert len(labels) == 5
    tensors, meta = file_tensors(good)
    stem = module_stem(ATTN2_K)
    half = {k: t for k, t in tensors.items() if not k.startswith(stem)}
    half[f"{stem}.lora_up.weight"] = torch.zeros(32, 2)
    save_file(half, str(tmp_path / "half_lora.safetensors"), metadata={**meta, "esd.kind": "lora"})
    with pytest.raises(ErasedWeightsError, match="not both lora_down and lora_up"):
        load_erased_weights(tmp_path / "half_lora.safetensors")


def test_other_safetensors_files_are_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ErasedWeightsError, match="not an ESD erased-weights file"):
        load_erased_weights(path)
    with pytest.raises(ErasedWeightsError, match="does not exist"):
        load_erased_weights(tmp_path / "missing.safetensors")


def test_a_lora_trained_run_saves_a_lora_file_that_applies_without_warning(tmp_path):
    adapter = make_adapter()
    base = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    result = erase(adapter, dataclasses.replace(CONFIG, lora_rank=2))
    erased = result.to_erased_weights(adapter)
    assert erased.kind == "lora" and erased.header.rank == 2 and erased.modules
    assert all(c.lora is not None for c in erased.modules.values())  # esd-x: Linear layers only
    assert erased.header.dropped and all(k.endswith("_attn2_to_out_0.diff_b") for k in erased.header.dropped)
    loaded = load_erased_weights(save_erased_weights(tmp_path / "lora.safetensors", erased, save_dtype="fp32"))
    target = fresh_base()
    assert apply_to_module(target.unet, loaded, 1.0, target.naming) is None  # the base check covers the dropped biases
    own = {ldm: n for ldm, n in module_ldm_names(target.unet, target.naming).items()}
    params = dict(target.unet.named_parameters())
    for ldm, delta in result.dense_diffs().items():
        torch.testing.assert_close(params[own[ldm]].data, base[own[ldm]] + delta, rtol=0, atol=1e-6)
