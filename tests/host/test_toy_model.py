"""The esd_bench toy model inside ComfyUI: detected as SD1.5, it draws what it is prompted with (judged by the
project's detector), and the toy erasure workflow runs through the nodes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open
from test_nodes import assert_success
from workflow_api import to_api

from esd_bench import detector

ROOT = Path(__file__).resolve().parents[2]


def saved_images(server, entry, node_id: str) -> np.ndarray:
    files = entry["outputs"][node_id]["images"]
    return np.stack([np.asarray(Image.open(server.output_dir / f["subfolder"] / f["filename"]).convert("RGB"))
                     for f in files])


def test_comfyui_draws_the_prompted_attributes(comfy_server, toy_checkpoint, timings):
    import time

    # a prompt the toy draws well (diffusers, 8 samples, DDIM 20: shape, colour and style 100%)
    text = "a blue circle on a dotted background"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": toy_checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        # 128 "pixels" = the toy's 16x16 latents (ComfyUI counts 8 px per latent; the toy's VAE decodes 4 px)
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": 3, "steps": 15, "cfg": 7.5,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "toy"}},
    }
    t0 = time.monotonic()
    entry = comfy_server.run(prompt, timeout=900)
    timings["toy: 4 images, 15 steps, in ComfyUI (s)"] = f"{time.monotonic() - t0:.1f}"
    assert_success(entry)
    images = saved_images(comfy_server, entry, "7")
    assert images.shape == (4, 64, 64, 3)  # the toy's f=4 VAE, detected by ComfyUI
    found = detector.classify(images)
    hits = {a: np.mean([v == want for v in found[a]]) for a, want in (("shape", "circle"), ("color", "blue"),
                                                                      ("style", "dotted"))}
    assert all(rate >= 0.75 for rate in hits.values()), (hits, found)  # chance is 20%
    assert "NOT LOADED" not in comfy_server.log_text()


def test_toy_erasure_workflow_runs(comfy_server, toy_checkpoint):
    workflow = json.loads((ROOT / "workflows" / "esd_toy_erase_in_comfyui.json").read_text())
    train = next(n for n in workflow["nodes"] if n["type"] == "ESDTrain")
    assert train["widgets_values"][:2] == ["a striped background", "esd-x"]
    assert train["widgets_values"][5] == 5e-5  # the demo's 5e-4 over the embedding's step factor (README)
    fast = {"ESDTrain": {"iterations": 2, "ddim_steps": 4}, "KSampler": {"steps": 3},
            "EmptyLatentImage": {"batch_size": 1}}
    entry = comfy_server.run(to_api(workflow, comfy_server.object_info(), fast), timeout=900)
    assert_success(entry)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    stitched = [img for img in images if img["filename"].startswith("ESD_toy_striped_before_after")]
    assert Image.open(comfy_server.output_dir / stitched[0]["subfolder"] / stitched[0]["filename"]).size[1] == 64
    saved = comfy_server.loras_dir / "esd" / "ESD_toy_striped_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["esd.concepts"]) == ["a striped background"]
    assert keys and all("_attn2_" in k for k in keys)  # esd-x: cross-attention only
