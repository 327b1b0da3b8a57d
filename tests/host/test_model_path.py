"""The model you wire in is the model you erase from: training predicts through the MODEL as KSampler runs it (weight
patches, model options, wrappers) or refuses it, and the base recorded in the file is compared with like (the same
weights, patches included, whatever dtype they were loaded in)."""
from __future__ import annotations

import pytest
import torch
from checkpoints import ensure_checkpoint
from comfy_probe import run_probe
from comfy_server import DEFAULT_COMFY, ROOT
from safetensors.torch import load_file, save_file
from test_nodes import assert_success, sample_nodes, train_node

from esd_core.keymap import module_stem

UNET = "model.diffusion_model."


def lora_file(checkpoint, out, scale: float = 0.3, seed: int = 0):
    """A rank-4 kohya LoRA on every cross-attention key/value projection of ``checkpoint``'s UNet, each changing its
    weight by ``scale`` of the weight's spread (a LoRA at a useful strength)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, w in load_file(str(checkpoint)).items():
        if key.startswith(UNET) and key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            stem = module_stem(key[len(UNET):].rpartition(".")[0])
            up, down = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
            up *= scale * float(w.float().std()) / float((up @ down).std())
            lora |= {f"{stem}.lora_up.weight": up.half(), f"{stem}.lora_down.weight": down.half(),
                     f"{stem}.alpha": torch.tensor(4.0)}
    save_file(lora, str(out))


def test_model_options_apply_as_in_ksampler_or_are_refused(comfy_dir):
    """The adapter's guided epsilon equals KSampler's for MODELs with a LoRA, block patches, attention replacements,
    model_function_wrapper and diffusion-model wrappers (each visibly changing the prediction); an attention patch
    sees the same cond/uncond branches on both paths; guidance functions and sampling-loop wrappers are refused by
    name."""
    result = run_probe("model_options", ensure_checkpoint("sd15", comfy_dir=comfy_dir), DEFAULT_COMFY, ROOT)
    refused = result.pop("refused")
    for name, r in result.items():
        assert r["gap_to_ksampler"] < 1e-4 * r["scale"], (name, r)  # the same computation, float rounding
        if name != "plain":
            assert r["change_from_plain"] > 1e-2 * r["scale"], (name, r)  # the option really acts
    seen = result["attn2_patch"]["cond_or_uncond"]
    assert seen["adapter"] == seen["ksampler"] and [1, 0] in seen["adapter"], seen  # both branches, one call
    assert "sampler_cfg_function" in refused["rescale_cfg"]
    assert "sampler_post_cfg_function" in refused["perturbed_attention_guidance"]
    assert "outer_sample" in refused["sampler_wrapper"]
    assert all("KSampler" in message for message in refused.values()), refused


def test_base_fingerprint_survives_dtype_and_sees_patches(comfy_dir):
    """Weights loaded in fp32 and in fp16 are the same base (their exact hashes differ); a MODEL with a LoRA patched
    in is the base its training started from, in either dtype, and not the plain model's (nor the other way)."""
    result = run_probe("base_fingerprints", ensure_checkpoint("sd15", comfy_dir=comfy_dir), DEFAULT_COMFY, ROOT)
    assert result["dtypes"]["fp16"] == "torch.float16" and result["dtypes"]["fp32"] == "torch.float32"
    assert result["fp32 -> fp16"] == {"same_base": True, "same_exact_hash": False}  # why a fingerprint
    for a, b in (("fp16", "fp32"), ("fp32+lora", "fp16+lora"), ("fp16+lora", "fp32+lora"), ("fp32", "fp32"),
                 ("fp32+lora", "fp32+lora")):
        assert result[f"{a} -> {b}"]["same_base"], (a, b)
    for a, b in (("fp32", "fp32+lora"), ("fp32+lora", "fp32"), ("fp16", "fp16+lora"), ("fp16+lora", "fp32")):
        assert not result[f"{a} -> {b}"]["same_base"], (a, b)


def test_erasure_trained_over_a_lora_applies_to_it_without_a_false_warning(comfy_server, tiny_checkpoint):
    """Through the nodes: a LoRA loaded before ESD Erase Concept; the file applied to the same LoRA'd MODEL gives no
    warning, applied to the model without the LoRA (other weights) it warns."""
    sd15 = tiny_checkpoint("sd15")
    lora_file(comfy_server.checkpoints_dir / sd15, comfy_server.loras_dir / "path_test_lora.safetensors")
    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 1.0,
                                                                  "lora_name": "path_test_lora.safetensors"}}}
    assert_success(comfy_server.run(load | {"3": train_node(["2", 0], ["1", 1], filename_prefix="over_lora")},
                                    timeout=600))

    def apply_to(model_ref):
        prompt = load | {"4": {"class_type": "ApplyErasedWeights", "inputs": {
            "model": model_ref, "strength": 1.0, "erased_weights": "esd/over_lora_00001_.safetensors"}}}
        prompt |= sample_nodes(f"over_lora_{model_ref[0]}", ["4", 0], ["1", 1], ["1", 2], 10)  # uses the MODEL
        entry = comfy_server.run(prompt, timeout=300)
        assert_success(entry)
        return entry["outputs"]["4"]["text"][0]

    assert "warning" not in apply_to(["2", 0])
    assert "warning: the MODEL's weights differ" in apply_to(["1", 0])


@pytest.mark.parametrize("save_dtype, expected", [("fp16", torch.float16), ("model", torch.float32)])
def test_saved_checkpoint_holds_base_plus_diff_rounded_once(comfy_server, tiny_checkpoint, save_dtype, expected):
    """ESD Save Erased Checkpoint: the UNet in the dtype named (or the MODEL's own: float32 on this CPU host), each
    erased tensor equal to the base file's value + the trained difference rounded once to it."""
    from esd_core.erased_weights import load_erased_weights

    sd15 = tiny_checkpoint("sd15")
    prefix = f"saved_{save_dtype}"
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix=prefix, save_dtype="fp32"),
              "3": {"class_type": "SaveErasedCheckpoint", "inputs": {
                  "model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": prefix,
                  "save_dtype": save_dtype}}}
    assert_success(comfy_server.run(prompt, timeout=600))
    base = load_file(str(comfy_server.checkpoints_dir / sd15))
    saved = load_file(str(comfy_server.checkpoints_dir / "esd" / f"{prefix}_00001_.safetensors"))
    erased = load_erased_weights(comfy_server.loras_dir / "esd" / f"{prefix}_00001_.safetensors")
    unet = [k for k in saved if k.startswith(UNET)]
    assert {saved[k].dtype for k in unet} == {expected}
    changed = 0
    for stem, change in erased.modules.items():
        module = next(k[len(UNET):-len(".weight")] for k in unet
                      if k.endswith(".weight") and module_stem(k[len(UNET):-len(".weight")]) == stem)
        for part, diff in (("weight", change.weight), ("bias", change.bias)):
            if diff is not None:
                key = f"{UNET}{module}.{part}"
                assert torch.equal(saved[key], (base[key].float() + diff).to(expected)), key
                changed += 1
    assert changed > 0
    assert torch.equal(saved[f"{UNET}out.2.weight"], base[f"{UNET}out.2.weight"].to(expected))  # not trained
