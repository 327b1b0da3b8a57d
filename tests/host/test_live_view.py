"""The live training view's server side inside the real host: ESD Erase Concept's ``esd.progress`` messages (rate,
completeness, who receives them, how a run ends) and its previews (ComfyUI's preview-image channel).
The same run in a real browser: test_browser.py."""
from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from test_nodes import ROOT, assert_success, train_node
from workflow_api import to_api

EVENT = "esd.progress"
PREVIEW_IMAGE = 1  # ComfyUI's binary frame type of a preview sent to a client without the metadata feature


@pytest.fixture(scope="module")
def sd15(tiny_checkpoint):
    return tiny_checkpoint("sd15")


def erase_prompt(sd15, **overrides):
    return {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
            "2": train_node(["1", 0], ["1", 1], **overrides)}


def live_messages(listener, prompt_id):
    return [(t, m["data"]) for t, m in zip(listener.received, listener.messages)
            if m["type"] == EVENT and m["data"]["prompt_id"] == prompt_id]


def preview_images(listener) -> list[Image.Image]:
    frames = [f for f in listener.binary if struct.unpack(">I", f[:4])[0] == PREVIEW_IMAGE]
    return [Image.open(io.BytesIO(f[8:])) for f in frames]


def test_messages_are_complete_rate_bounded_and_only_for_the_queuing_client(comfy_server, sd15, timings):
    queuing, other = comfy_server.listen(), comfy_server.listen()
    iterations = 120  # 1x1 latents, DDIM 2: iterations as fast as this model goes
    t0 = time.monotonic()
    prompt_id = comfy_server.queue(erase_prompt(sd15, iterations=iterations, ddim_steps=2, resolution=8, seed=31,
                                                filename_prefix="live"), client_id=queuing.client_id)
    assert_success(comfy_server.wait(prompt_id, timeout=600))
    timings["live view: 120 fast iterations (s)"] = f"{time.monotonic() - t0:.1f}"
    sent = live_messages(queuing, prompt_id)
    messages = [m for _, m in sent]
    assert all(m["node"] == "2" and m["total"] == iterations for m in messages)
    assert messages[0]["phase"] == "loading" and "training" in {m["phase"] for m in messages}
    done = messages[-1]
    assert done["phase"] == "done" and done["file"] == "esd/live_00001_.safetensors" and done["step"] == iterations
    assert done["message"].startswith("saved loras/esd/live_00001_.safetensors")
    points = [p for m in messages for p in m["points"]]
    assert [s for s, _ in points] == list(range(1, iterations + 1))  # every iteration's loss, once, in order
    assert all(np.isfinite(loss) and loss > 0 for _, loss in points) and done["loss"] == points[-1][1]
    # at most 10 a second: over the run, no more messages than 0.1 s intervals (the batching itself, on a fake
    # clock at any speed: tests/test_live_view.py)
    times = [t for t, _ in sent]
    assert len(sent) <= (times[-1] - times[0]) / 0.1 + 3
    timings["live view: messages / iterations"] = f"{len(sent)} / {iterations}"
    # the other client gets none of it: no live messages, no progress text, no previews
    assert not [m for m in other.messages if m["type"] == EVENT] and other.binary_frames == 0
    queuing.close(), other.close()


def test_previews_use_the_vae_else_the_latent_previewer_and_leave_training_unchanged(comfy_server, sd15):
    outputs_before = set(comfy_server.output_dir.rglob("*"))
    def run(prefix, **preview):
        listener = comfy_server.listen()
        prompt = erase_prompt(sd15, iterations=4, seed=41, filename_prefix=prefix, **preview)
        entry = comfy_server.run(prompt, timeout=600, client_id=listener.client_id)
        assert_success(entry)
        listener.close()
        weights = load_file(str(comfy_server.loras_dir / "esd" / f"{prefix}_00001_.safetensors"))
        return weights, preview_images(listener), entry["outputs"]["2"]

    plain, none_sent, plain_ui = run("no_preview")
    with_vae, vae_previews, vae_ui = run("vae_preview", preview_every=2, vae=["1", 2])
    latent, latent_previews, _ = run("latent_preview", preview_every=2)
    # same seed, with and without previews: bit-identical erased weights (previews draw their own noise)
    assert plain.keys() == with_vae.keys() == latent.keys()
    assert all(np.array_equal(plain[k], with_vae[k]) and np.array_equal(plain[k], latent[k]) for k in plain)
    # previews before training, at iterations 2 and 4, then the final image: through ComfyUI's preview channel
    assert [im.size for im in vae_previews[:3]] == [(64, 64)] * 3  # the tiny model's VAE at 64 px
    assert [im.size for im in latent_previews[:3]] == [(8, 8)] * 3  # Latent2RGB: one pixel per latent
    assert len(vae_previews) == 4 and vae_previews[3].width == 512  # the loss plot under before | after
    assert len(none_sent) == 1 and none_sent[0].width == 512  # without previews: the loss plot alone
    assert not np.array_equal(np.asarray(vae_previews[0]), np.asarray(vae_previews[2]))  # the weights moved
    # the final image is also the node's ui output, in the temp folder (nothing added to output/)
    assert vae_ui["images"][0]["type"] == "temp" and vae_ui["text"][0].startswith("saved loras/esd/vae_preview")
    saved, = comfy_server.temp_dir.rglob(vae_ui["images"][0]["filename"])
    assert Image.open(saved).size == vae_previews[3].size
    assert vae_previews[3].height > none_sent[0].height  # with the before | after strip
    assert set(comfy_server.output_dir.rglob("*")) == outputs_before


def test_cancel_is_reported_as_cancelled_nothing_saved(comfy_server, sd15):
    listener = comfy_server.listen()
    prompt_id = comfy_server.queue(erase_prompt(sd15, iterations=100000, seed=51, filename_prefix="live_cancel"),
                                   client_id=listener.client_id)
    deadline = time.monotonic() + 120
    while not any(m["step"] >= 1 for _, m in live_messages(listener, prompt_id)):  # an iteration was trained
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    time.sleep(0.5)  # the last message is queued on the server's event loop
    last = live_messages(listener, prompt_id)[-1][1]
    assert last["phase"] == "cancelled" and last["message"].endswith(", nothing saved")
    assert last["message"].startswith(f"cancelled at step {last['step']}/100000") and last["step"] >= 1
    assert not (comfy_server.loras_dir / "esd" / "live_cancel_00001_.safetensors").exists()
    listener.close()


def test_example_workflows_preview_with_their_vae(comfy_server):
    """The example erasure workflows give ESD Erase Concept a preview every 50 iterations and their VAE (widget
    values in the server's own order: a workflow out of step with the node's inputs fails here)."""
    info = comfy_server.object_info()
    for name in ("esd_x_erase_artist_style", "esd_u_erase_global_concept", "esd_toy_erase_in_comfyui"):
        prompt = to_api(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), info)
        loader = next(k for k, n in prompt.items() if n["class_type"] == "LoadFrozenUNet")
        train = next(n["inputs"] for n in prompt.values() if n["class_type"] == "ESDTrain")
        assert train["preview_every"] == 50 and train["vae"] == [loader, 2], name
        assert train["checkpoint_every"] == 0 and train["save_dtype"] == "fp16" and train["optimizer"] == "adam"
