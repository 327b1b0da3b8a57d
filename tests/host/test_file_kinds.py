"""Every kind of file the pack writes, in the real ComfyUI host: loaded by the stock LoraLoaderModelOnly and LoraLoader
with no unloaded key, sampling exactly like the pack's own ESD Apply Erased Weights, strength 0 giving the base; the
ESD Export LoRA node; and the refusals (another architecture, mixed key forms, a rank too large).

The erasure is a seeded random change of the UNet parameters ESD-u and ESD-x train together in the tiny SD1.5
checkpoint (convolutions, linears, norms, biases: everything but the output layer and the embeddings), built in the
test process with the pack's own writers, so each kind is exercised on every
layer type without minutes of training; real trained files are covered by test_nodes.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_nodes import assert_success, error_message, pixels, sample_nodes

from esd_core.erased_weights import (ErasedWeights, ErasedWeightsHeader, load_erased_weights,
                                     save_erased_weights)
from esd_core.keymap import module_stem
from esd_core.lora import LoRAFactors
from esd_core.lora_export import export_lora
from esd_core.methods import select_parameter_names
from esd_core.weights import tensors_hash

UNET_PREFIX = "model.diffusion_model."
KINDS = ("full_fp32", "full_fp16", "full_bf16", "v1_fp32", "lora_exported_r8", "lora_trained_layout")
UNLOADED = ("lora key not loaded", "NOT LOADED", "ERROR lora")


def checkpoint_unet(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}


def random_erasure(unet: dict[str, torch.Tensor], base_model: str) -> ErasedWeights:
    """A seeded change of every parameter, about a tenth of each tensor's spread."""
    g = torch.Generator().manual_seed(0)
    names = sorted({*select_parameter_names("esd-u", unet), *select_parameter_names("esd-x", unet)})
    diffs = {}
    for n in names:
        t = unet[n].float()
        spread = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.1
        diffs[n] = 0.1 * spread * torch.randn(t.shape, generator=g)
    header = ErasedWeightsHeader(concepts=("a random change",), method="esd-u", hyperparameters={"seed": 0},
                                 iterations_run=0, base_model=base_model, base_hash="",
                                 base_tensors_hash=tensors_hash({n: unet[n] for n in names}), model_family="sd1")
    return ErasedWeights.from_diffs(header, diffs)


def trained_layout(erased: ErasedWeights, unet: dict[str, torch.Tensor]) -> ErasedWeights:
    """The layout a LoRA-trained erasure has: rank-4 factors for Linear/Conv2d weights (their biases untrained),
    norms as dense diffs; its base hash covers what it changes."""
    unet_names = unet
    g = torch.Generator().manual_seed(1)
    modules = {module_stem(n.rpartition(".")[0]): n.rpartition(".")[0] for n in unet_names}
    factors, dense = {}, {}
    for stem, change in erased.modules.items():
        w = change.weight
        if w.ndim >= 2:
            kernel = [1, 1] if w.ndim == 4 else []
            factors[modules[stem]] = LoRAFactors(down=0.05 * torch.randn(4, *w.shape[1:], generator=g),
                                                 up=0.05 * torch.randn(w.shape[0], 4, *kernel, generator=g),
                                                 alpha=4.0)
        else:
            dense[f"{modules[stem]}.weight"] = w
            if change.bias is not None:
                dense[f"{modules[stem]}.bias"] = change.bias
    changed = [f"{m}.weight" for m in factors] + list(dense)
    header = dataclasses.replace(erased.header, base_tensors_hash=tensors_hash({n: unet[n] for n in changed}))
    return ErasedWeights.from_lora(header, factors, dense)


def write_v1(path, v2_fp32, unet_names):
    """The same content in the version-1 key form (diffusion_model.<module>.diff) older versions of the pack wrote."""
    modules = {module_stem(n.rpartition(".")[0]): n.rpartition(".")[0] for n in unet_names}
    tensors = load_file(str(v2_fp32))
    with safe_open(str(v2_fp32), "pt") as f:
        meta = f.metadata()
    v1 = {f"diffusion_model.{modules[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": t for k, t in tensors.items()}
    meta = {k: v for k, v in meta.items() if k not in ("esd.kind", "esd.save_dtype", "esd.dropped")}
    save_file(v1, str(path), metadata={**meta, "esd.format_version": "1"})


@pytest.fixture(scope="module")
def kinds(comfy_server, tiny_checkpoint):
    """ckpt_name and the file of every kind, written into loras/esd/kinds/."""
    ckpt = tiny_checkpoint("sd15")
    unet = checkpoint_unet(comfy_server.checkpoints_dir / ckpt)
    erased = random_erasure(unet, ckpt)
    folder = comfy_server.loras_dir / "esd" / "kinds"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}.safetensors" for k in KINDS}
    for kind in ("fp32", "fp16", "bf16"):
        save_erased_weights(paths[f"full_{kind}"], erased, save_dtype=kind)
    write_v1(paths["v1_fp32"], paths["full_fp32"], unet)
    save_erased_weights(paths["lora_exported_r8"], export_lora(erased, rank=8, source="full_fp32.safetensors"))
    save_erased_weights(paths["lora_trained_layout"], trained_layout(erased, unet))
    return ckpt, {k: f"esd/kinds/{k}.safetensors" for k in KINDS}


def test_every_file_kind_loads_with_the_stock_loaders_like_the_packs_apply(comfy_server, kinds):
    ckpt, names = kinds
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    prompt |= sample_nodes("kinds_base", ["1", 0], ["1", 1], ["1", 2], 10)
    out = {}  # (kind, loader) -> SaveImage node id
    for i, kind in enumerate(KINDS):
        loaders = {
            "model_only": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["1", 0], "lora_name": names[kind], "strength_model": 1.0}},
            "lora_loader": {"class_type": "LoraLoader", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "lora_name": names[kind], "strength_model": 1.0,
                "strength_clip": 1.0}},
            "pack": {"class_type": "ApplyErasedWeights", "inputs": {
                "model": ["1", 0], "erased_weights": names[kind], "strength": 1.0}},
            "strength_0": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["1", 0], "lora_name": names[kind], "strength_model": 0.0}},
        }
        for j, (loader, node) in enumerate(loaders.items()):
            node_id = str(1000 + 100 * i + 10 * j)
            prompt[node_id] = node
            start = 1000 + 100 * i + 10 * j + 1
            prompt |= sample_nodes(f"kinds_{kind}_{loader}", [node_id, 0], ["1", 1], ["1", 2], start)
            out[kind, loader] = str(start + 5)
    log_before = len(comfy_server.log_text())
    entry = comfy_server.run(prompt, timeout=900)
    assert_success(entry)
    log = comfy_server.log_text()[log_before:]
    assert not [line for line in log.splitlines() if any(u in line for u in UNLOADED)], log[-3000:]
    base = pixels(comfy_server, entry, "15")
    image = {key: pixels(comfy_server, entry, node) for key, node in out.items()}
    for kind in KINDS:
        assert not np.array_equal(image[kind, "pack"], base), kind  # the erasure changed the model
        assert np.array_equal(image[kind, "model_only"], image[kind, "pack"]), kind  # stock == the pack's apply
        assert np.array_equal(image[kind, "lora_loader"], image[kind, "pack"]), kind
        assert np.array_equal(image[kind, "strength_0"], base), kind
    assert np.array_equal(image["v1_fp32", "pack"], image["full_fp32", "pack"])  # same numbers, other key form
    texts = {kind: entry["outputs"][str(1000 + 100 * i + 20)]["text"][0] for i, kind in enumerate(KINDS)}
    assert [k for k, t in texts.items() if "warning" in t] == [], texts  # the base check holds for every kind
    assert "LoRA rank 8" in texts["lora_exported_r8"] and "full, fp16" in texts["full_fp16"]


def test_export_node_writes_the_lora_the_core_exports(comfy_server, kinds):
    ckpt, names = kinds
    prompt = {"1": {"class_type": "ExportErasureLoRA", "inputs": {
        "erased_weights": names["full_fp32"], "keep": "rank", "rank": 8, "energy": 0.9, "save_dtype": "fp16",
        "filename_prefix": "exported"}}}
    entry = comfy_server.run(prompt, timeout=600)
    assert_success(entry)
    assert "saved loras/esd/exported_00001_.safetensors" in entry["outputs"]["1"]["text"][0]
    node_file = load_file(str(comfy_server.loras_dir / "esd" / "exported_00001_.safetensors"))
    core_file = load_file(str(comfy_server.loras_dir / "esd" / "kinds" / "lora_exported_r8.safetensors"))
    assert node_file.keys() == core_file.keys()
    assert all(torch.allclose(node_file[k].float(), core_file[k].float(), rtol=1e-2, atol=1e-4) for k in node_file)
    exported = load_erased_weights(comfy_server.loras_dir / "esd" / "exported_00001_.safetensors")
    assert exported.header.export["source"] == names["full_fp32"] and exported.header.rank == 8

    too_large = {"1": {"class_type": "ExportErasureLoRA", "inputs": {
        "erased_weights": names["full_fp32"], "keep": "rank", "rank": 4000, "energy": 0.9, "save_dtype": "fp16",
        "filename_prefix": "too_large"}}}
    assert "rank 4000 is larger than" in error_message(comfy_server.run(too_large, timeout=300))
    assert not list((comfy_server.loras_dir / "esd").glob("too_large*"))


def test_apply_refuses_other_architectures_and_mixed_files(comfy_server, kinds, tiny_checkpoint):
    ckpt, names = kinds
    other = tiny_checkpoint("sd2v")
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": other}},
              "2": {"class_type": "ApplyErasedWeights", "inputs": {
                  "model": ["1", 0], "erased_weights": names["lora_exported_r8"], "strength": 1.0}}}
    prompt |= sample_nodes("other_arch", ["2", 0], ["1", 1], ["1", 2], 10)
    assert "made for a sd1 model" in error_message(comfy_server.run(prompt, timeout=300))

    folder = comfy_server.loras_dir / "esd" / "kinds"
    v2, v1 = load_file(str(folder / "full_fp32.safetensors")), load_file(str(folder / "v1_fp32.safetensors"))
    with safe_open(str(folder / "full_fp32.safetensors"), "pt") as f:
        meta = f.metadata()
    first_v1 = sorted(v1)[0]
    mixed = {**{k: t for i, (k, t) in enumerate(sorted(v2.items())) if i}, first_v1: v1[first_v1]}
    save_file(mixed, str(folder / "mixed.safetensors"), metadata=meta)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "2": {"class_type": "ApplyErasedWeights", "inputs": {
                  "model": ["1", 0], "erased_weights": "esd/kinds/mixed.safetensors", "strength": 1.0}}}
    prompt |= sample_nodes("mixed", ["2", 0], ["1", 1], ["1", 2], 10)
    assert "mixes key forms" in error_message(comfy_server.run(prompt, timeout=300))
    assert comfy_server.alive()


def test_a_lora_trained_by_esd_erase_concept_loads_with_the_stock_loader(comfy_server, tiny_checkpoint):
    from test_nodes import train_node

    ckpt = tiny_checkpoint("sd15")
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": ckpt}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix="trained_lora", lora_rank=2, seed=3,
                              learning_rate=1e-2)}
    prompt |= sample_nodes("trained_lora_model", ["2", 0], ["1", 1], ["1", 2], 10)
    entry = comfy_server.run(prompt, timeout=600)
    assert_success(entry)
    name = "esd/trained_lora_00001_.safetensors"
    erased = load_erased_weights(comfy_server.loras_dir / name)
    assert erased.kind == "lora" and erased.header.rank == 2
    log_before = len(comfy_server.log_text())
    stock = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name,
                                                                   "strength_model": 1.0}},
             "3": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "erased_weights": name,
                                                                  "strength": 1.0}}}
    stock |= sample_nodes("trained_lora_stock", ["2", 0], ["1", 1], ["1", 2], 10)
    stock |= sample_nodes("trained_lora_pack", ["3", 0], ["1", 1], ["1", 2], 20)
    stock |= sample_nodes("trained_lora_base", ["1", 0], ["1", 1], ["1", 2], 30)
    out = comfy_server.run(stock, timeout=600)
    assert_success(out)
    log = comfy_server.log_text()[log_before:]
    assert not [line for line in log.splitlines() if any(u in line for u in UNLOADED)], log[-3000:]
    from_file = pixels(comfy_server, out, "15")
    assert np.array_equal(from_file, pixels(comfy_server, out, "25"))
    assert not np.array_equal(from_file, pixels(comfy_server, out, "35"))
    assert "warning" not in out["outputs"]["3"]["text"][0]  # the frozen biases are listed as not carried
    trained = pixels(comfy_server, entry, "15").astype(int)
    assert np.abs(from_file.astype(int) - trained).max() <= 2  # fp16 factors: the trained model within rounding


def test_a_checkpoint_saved_with_a_lora_applied_samples_like_the_lora(comfy_server, kinds):
    ckpt, names = kinds
    applied = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
               "2": {"class_type": "ApplyErasedWeights", "inputs": {
                   "model": ["1", 0], "erased_weights": names["lora_exported_r8"], "strength": 1.0}},
               "3": {"class_type": "SaveErasedCheckpoint", "inputs": {
                   "model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "with_lora"}}}
    applied |= sample_nodes("with_lora_applied", ["2", 0], ["1", 1], ["1", 2], 10)
    first = comfy_server.run(applied, timeout=600)
    assert_success(first)
    saved = comfy_server.checkpoints_dir / "esd" / "with_lora_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        erasures = json.loads(f.metadata()["esd.erasures"])
    assert erasures[0]["esd.kind"] == "lora" and erasures[0]["esd.rank"] == "8"
    back = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "esd/with_lora_00001_.safetensors"}}}
    back |= sample_nodes("with_lora_reloaded", ["1", 0], ["1", 1], ["1", 2], 10)
    second = comfy_server.run(back, timeout=600)
    assert_success(second)
    assert np.array_equal(pixels(comfy_server, second, "15"), pixels(comfy_server, first, "15"))
