"""Smoke tests of the real ComfyUI host: stock nodes, stock txt2img on each tiny model family, interrupt.

These prove the test infrastructure itself (server harness, checkpoint builders, websocket listener)
before any ESD node exists, so later failures in pack tests can be blamed on the pack.
"""
import time

import pytest
from PIL import Image

from comfy_server import txt2img_prompt


def test_stock_nodes_present(comfy_server):
    info = comfy_server.object_info()
    # the nodes a user chains around the ESD nodes: load a checkpoint, apply the erased-weights file
    assert "CheckpointLoaderSimple" in info
    assert "LoraLoaderModelOnly" in info
    assert info["LoraLoaderModelOnly"]["input"]["required"]["strength_model"][0] == "FLOAT"
    # the yaml registered our custom_nodes folder (the pack itself may not be importable yet)
    assert f"Adding extra search path custom_nodes {comfy_server.custom_nodes_dir}" in comfy_server.log_text()
    # ...and ComfyUI imported the checkout through the symlink without an error
    assert comfy_server.pack_import_failed() is False, comfy_server.log_tail()


@pytest.mark.timeout(900)  # first run builds the checkpoint (SDXL: ~40 s, more on a busy machine)
@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_txt2img(comfy_server, tiny_checkpoint, timings, family):
    ckpt = tiny_checkpoint(family)
    prefix = f"smoke_{family}"
    with comfy_server.listen() as ws:
        t0 = time.monotonic()
        prompt_id = comfy_server.queue(txt2img_prompt(ckpt, prefix, steps=4, seed=1), client_id=ws.client_id)
        entry = comfy_server.wait(prompt_id, timeout=600)
        timings[f"txt2img {family} 4 steps incl. load (s)"] = f"{time.monotonic() - t0:.1f}"
        assert entry["status"]["status_str"] == "success", entry["status"]
        ws.wait_for("execution_success", prompt_id, timeout=30)
        # KSampler reported per-step progress to our client
        steps = [m["data"]["value"] for m in ws.of_type("progress", prompt_id=prompt_id) if m["data"]["node"] == "5"]
        assert steps[-1] == 4, steps

    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    png = comfy_server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert png.name.startswith(prefix) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size == (64, 64)


@pytest.mark.timeout(600)
def test_interrupt_long_ksampler(comfy_server, tiny_checkpoint, timings):
    ckpt = tiny_checkpoint("sd15")
    with comfy_server.listen() as ws:
        # 5000 steps would take minutes; a distinct seed keeps the output cache from answering
        prompt_id = comfy_server.queue(txt2img_prompt(ckpt, "smoke_interrupt", steps=5000, seed=12345),
                                       client_id=ws.client_id)
        ws.wait_for("progress", prompt_id, timeout=300)  # sampling has really started
        t0 = time.monotonic()
        assert comfy_server.interrupt()
        entry = comfy_server.wait(prompt_id, timeout=120)
        timings["interrupt -> prompt ended (s)"] = f"{time.monotonic() - t0:.2f}"
        ws.wait_for("execution_interrupted", prompt_id, timeout=30)
        done = max(m["data"]["value"] for m in ws.of_type("progress", prompt_id=prompt_id))
    assert done < 5000
    assert entry["status"]["status_str"] == "error"
    assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted"
    assert "7" not in entry["outputs"]  # SaveImage never ran
    # the server survives an interrupt and runs the next prompt
    assert comfy_server.alive()
    nxt = comfy_server.run(txt2img_prompt(ckpt, "smoke_after_interrupt", steps=1, seed=7), timeout=120)
    assert nxt["status"]["status_str"] == "success"
