"""ESD Erase Concept on each supported model family (SD2 v-prediction, SDXL) and the refusal of others."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from test_nodes import assert_success, error_message, pixels, sample_nodes, train_node


@pytest.mark.parametrize("family,expected", [("sd2v", "sd2"), ("sdxl", "sdxl")])
def test_erase_on_family(comfy_server, tiny_checkpoint, family, expected):
    ckpt = tiny_checkpoint(family)
    prefix = f"family_{family}"
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": ckpt}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix=prefix, iterations=2)}
    prompt |= sample_nodes(f"{family}_base", ["1", 0], ["1", 1], ["1", 2], 10)
    prompt |= sample_nodes(f"{family}_erased", ["2", 0], ["1", 1], ["1", 2], 20)
    entry = comfy_server.run(prompt, timeout=1200)
    assert_success(entry)
    assert not np.array_equal(pixels(comfy_server, entry, "15"), pixels(comfy_server, entry, "25"))
    with safe_open(str(comfy_server.loras_dir / "esd" / f"{prefix}_00001_.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["esd.model_family"] == expected
    assert json.loads(meta["esd.hyperparameters"])["resolution"] == 64


def test_unsupported_family_is_refused(comfy_server, tiny_checkpoint):
    ckpt = tiny_checkpoint("ip2p")
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix="refused")}
    prompt |= sample_nodes("refused", ["2", 0], ["1", 1], ["1", 2], 10)
    message = error_message(comfy_server.run(prompt, timeout=300))
    assert "supports Stable Diffusion 1.x, 2.x and SDXL" in message and "SD15_instructpix2pix" in message
    assert comfy_server.alive()
