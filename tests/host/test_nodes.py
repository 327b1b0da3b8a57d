"""The pack's nodes inside the real ComfyUI host, driven through its HTTP API like the browser frontend."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from workflow_api import to_api

ROOT = Path(__file__).resolve().parents[2]
NODE_IDS = {"LoadFrozenUNet": "ESD Load Frozen UNet", "ESDTrain": "ESD Erase Concept",
            "ApplyErasedWeights": "ESD Apply Erased Weights", "SaveErasedCheckpoint": "ESD Save Erased Checkpoint",
            "ExportErasureLoRA": "ESD Export LoRA"}
ESD_TRAIN_INPUTS = ["model", "clip", "concept", "method", "negative_guidance", "start_guidance", "iterations",
                    "learning_rate", "ddim_steps", "resolution", "seed", "filename_prefix"]
# CPU scale for every workflow: tiny model, 64 px, a few iterations and sampler steps.
FAST_TRAIN = {"iterations": 3, "ddim_steps": 4, "resolution": 64, "learning_rate": 1e-4}
FAST = {"ESDTrain": FAST_TRAIN, "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}


def train_node(model_ref, clip_ref, **overrides):
    inputs = {"model": model_ref, "clip": clip_ref, "concept": "a painting by Van Gogh", "method": "esd-x",
              "negative_guidance": 1.0, "start_guidance": 3.0, "seed": 0, "filename_prefix": "test",
              "sample_with": "trained", **FAST_TRAIN}
    inputs.update(overrides)
    return {"class_type": "ESDTrain", "inputs": inputs}


def sample_nodes(prefix: str, model_ref, clip_ref, vae_ref, start: int, seed: int = 7) -> dict:
    """CLIPTextEncode x2 -> EmptyLatent -> KSampler -> VAEDecode -> SaveImage, node ids from ``start``."""
    i = [str(start + k) for k in range(6)]
    return {
        i[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a painting by Van Gogh", "clip": clip_ref}},
        i[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip_ref}},
        i[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[3]: {"class_type": "KSampler", "inputs": {"model": model_ref, "positive": [i[0], 0], "negative": [i[1], 0],
                                                   "latent_image": [i[2], 0], "seed": seed, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        i[4]: {"class_type": "VAEDecode", "inputs": {"samples": [i[3], 0], "vae": vae_ref}},
        i[5]: {"class_type": "SaveImage", "inputs": {"images": [i[4], 0], "filename_prefix": prefix}},
    }


def pixels(server, entry, node_id) -> np.ndarray:
    image = entry["outputs"][node_id]["images"][0]
    return np.asarray(Image.open(server.output_dir / image["subfolder"] / image["filename"]))


def assert_success(entry):
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:]


def error_message(entry) -> str:
    assert entry["status"]["status_str"] == "error"
    return next(d["exception_message"] for t, d in entry["status"]["messages"] if t == "execution_error")


@pytest.fixture(scope="module")
def sd15(tiny_checkpoint):
    return tiny_checkpoint("sd15")


def esd_files(server) -> set[Path]:
    return set((server.loras_dir / "esd").glob("*.safetensors")) if (server.loras_dir / "esd").exists() else set()


def test_nodes_are_registered_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    for node_id, display in NODE_IDS.items():
        assert node_id in info, node_id
        node = info[node_id]
        assert node["display_name"] == display and node["description"]
        specs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in specs.values()), node_id
        assert len(node.get("output_tooltips", [])) == len(node["output"]) and all(node["output_tooltips"])
    train = info["ESDTrain"]
    assert train["input_order"]["required"][:len(ESD_TRAIN_INPUTS)] == ESD_TRAIN_INPUTS
    assert train["input"]["required"]["method"][1]["options"] == ["esd-x", "esd-x-strict", "esd-u", "esd-all",
                                                                   "selfattn"]
    assert train["output"] == ["MODEL", "ERASED_WEIGHTS", "LOSS_MAP"]
    # no seed control: the frontend would add one ("randomize": retrain on every queue; shifted widget values)
    assert train["input"]["required"]["seed"][1]["control_after_generate"] is False
    defaults = {k: v[1].get("default") for k, v in train["input"]["required"].items() if len(v) > 1}
    assert defaults["iterations"] == 1000 and defaults["learning_rate"] == 1e-5 and defaults["ddim_steps"] == 50
    assert defaults["negative_guidance"] == 1.0 and defaults["start_guidance"] == 3.0 and defaults["resolution"] == 0


def test_train_apply_and_model_identity(comfy_server, sd15):
    """One graph: base image, erased image, strength 0 / 1 images, and the base branch again after training."""
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix="identity"),
              "3": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": 0.0,
                                                                   "erased_weights": "(none)",
                                                                   "erased_weights_in": ["2", 1]}},
              "4": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": 1.0,
                                                                   "erased_weights": "(none)",
                                                                   "erased_weights_in": ["2", 1]}}}
    prompt |= sample_nodes("base", ["1", 0], ["1", 1], ["1", 2], 10)
    prompt |= sample_nodes("erased", ["2", 0], ["1", 1], ["1", 2], 20)
    prompt |= sample_nodes("strength0", ["3", 0], ["1", 1], ["1", 2], 30)
    prompt |= sample_nodes("strength1", ["4", 0], ["1", 1], ["1", 2], 40)
    entry = comfy_server.run(prompt, timeout=600)
    assert_success(entry)
    base, erased = pixels(comfy_server, entry, "15"), pixels(comfy_server, entry, "25")
    assert not np.array_equal(base, erased)  # training changed the model
    assert np.array_equal(pixels(comfy_server, entry, "35"), base)  # strength 0 = base, bit for bit
    assert np.array_equal(pixels(comfy_server, entry, "45"), erased)  # strength 1 = the trained model
    # the MODEL the trainer received is unchanged: a new sampler on the original branch gives the base image again
    again = comfy_server.run({"1": prompt["1"], **sample_nodes("base_again", ["1", 0], ["1", 1], ["1", 2], 50)})
    assert_success(again)
    assert np.array_equal(pixels(comfy_server, again, "55"), base)
    assert "saved loras/esd/identity_00001_.safetensors" in entry["outputs"]["2"]["text"][0]


def test_saved_file_loads_with_stock_lora_loader(comfy_server, sd15):
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
              "2": train_node(["1", 0], ["1", 1], filename_prefix="stock", concept="a cat\na dog", seed=5)}
    prompt |= sample_nodes("trained_stock", ["2", 0], ["1", 1], ["1", 2], 10)
    entry = comfy_server.run(prompt, timeout=600)
    assert_success(entry)
    path = comfy_server.loras_dir / "esd" / "stock_00001_.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["esd.format"] == "esd-erased-weights" and json.loads(meta["esd.concepts"]) == ["a cat", "a dog"]
    assert meta["esd.base_model"] == sd15 and len(meta["esd.base_hash"]) == 64
    assert meta["esd.model_family"] == "sd1" and meta["esd.iterations_run"] == "3"
    assert meta["esd.format_version"] == "2" and meta["esd.kind"] == "full"
    # the key form ComfyUI, Forge and A1111 all load
    assert keys and all(k.startswith("lora_unet_") and "_attn2_" in k and k.endswith((".diff", ".diff_b"))
                        for k in keys)
    stock = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
             "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 1.0,
                                                                   "lora_name": "esd/stock_00001_.safetensors"}},
             "3": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": 1.0,
                                                                  "erased_weights": "esd/stock_00001_.safetensors"}}}
    stock |= sample_nodes("stock_lora", ["2", 0], ["1", 1], ["1", 2], 10)
    stock |= sample_nodes("stock_pack", ["3", 0], ["1", 1], ["1", 2], 20)
    stock_entry = comfy_server.run(stock, timeout=300)
    assert_success(stock_entry)
    from_file = pixels(comfy_server, stock_entry, "15")
    assert np.array_equal(from_file, pixels(comfy_server, stock_entry, "25"))  # stock loader == the pack's apply
    # the file holds fp16 differences; the trained model's own image agrees within rounding
    trained = pixels(comfy_server, entry, "15").astype(int)
    assert np.abs(from_file.astype(int) - trained).max() <= 2
    log = comfy_server.log_text()
    assert "NOT LOADED" not in log and "lora key not loaded" not in log  # the stock loader applied every tensor


def test_example_workflows_run(comfy_server, sd15):
    info = comfy_server.object_info()
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    assert {"esd_x_erase_artist_style", "esd_u_erase_global_concept", "apply_erased_weights_strengths",
            "save_erased_checkpoint"} <= set(names)
    loaders = {"LoadFrozenUNet": {"ckpt_name": sd15}, "CheckpointLoaderSimple": {"ckpt_name": sd15}}
    order = ["esd_x_erase_artist_style", "esd_u_erase_global_concept", "apply_erased_weights_strengths",
             "save_erased_checkpoint"]
    assert set(names) == set(order) | {"esd_toy_erase_in_comfyui"}  # that one runs on the toy: test_toy_model.py
    for name in order:
        workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        assert any(n["type"] == "MarkdownNote" for n in workflow["nodes"]), f"{name} explains itself in a note"
        info = comfy_server.object_info()  # refreshed: saved files appear in the loaders' lists
        entry = comfy_server.run(to_api(workflow, info, FAST | loaders), timeout=900)
        assert_success(entry)
        outputs = entry["outputs"]
        images = [img for out in outputs.values() for img in out.get("images", [])]
        if name != "save_erased_checkpoint":
            assert images, name
        if name == "esd_x_erase_artist_style":
            assert (comfy_server.loras_dir / "esd" / "ESD_van_gogh_00001_.safetensors").exists()
            stitched = [img for img in images if img["filename"].startswith("ESD_van_gogh_before_after")]
            w, h = Image.open(comfy_server.output_dir / stitched[0]["subfolder"] / stitched[0]["filename"]).size
            assert w > 2 * 64 and h == 64  # before | after side by side
    saved = comfy_server.checkpoints_dir / "esd" / "ESD_van_gogh_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        erasures = json.loads(f.metadata()["esd.erasures"])
    assert erasures[0]["esd.concepts"] == json.dumps(["a painting by Van Gogh"])
    # the saved checkpoint loads with the stock loader and samples like the erased model
    back = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "esd/ESD_van_gogh_00001_.safetensors"}}}
    back |= sample_nodes("reloaded", ["1", 0], ["1", 1], ["1", 2], 10)
    applied = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
               "2": {"class_type": "ApplyErasedWeights", "inputs": {
                   "model": ["1", 0], "strength": 1.0, "erased_weights": "esd/ESD_van_gogh_00001_.safetensors"}}}
    applied |= sample_nodes("applied", ["2", 0], ["1", 1], ["1", 2], 10)
    a, b = comfy_server.run(back, timeout=300), comfy_server.run(applied, timeout=300)
    assert_success(a), assert_success(b)
    assert np.array_equal(pixels(comfy_server, a, "15"), pixels(comfy_server, b, "15"))


def test_cancel_stops_training_and_keeps_the_server(comfy_server, sd15):
    before = esd_files(comfy_server)
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
              "2": train_node(["1", 0], ["1", 1], iterations=100000, filename_prefix="cancelled", seed=99)}
    prompt_id = comfy_server.queue(prompt)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _is_running(comfy_server, prompt_id):
        time.sleep(0.5)
    time.sleep(3)  # let training start
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert any(t == "execution_interrupted" for t, _ in entry["status"]["messages"])
    assert esd_files(comfy_server) == before  # nothing written
    assert not list(comfy_server.loras_dir.rglob("*.partial"))  # not even a partial file
    assert comfy_server.alive()
    # and the server still trains
    ok = comfy_server.run({"1": prompt["1"], "2": train_node(["1", 0], ["1", 1], filename_prefix="after_cancel")},
                          timeout=300)
    assert_success(ok)


def _is_running(server, prompt_id) -> bool:
    _, queue = server._request("GET", "/queue")
    return prompt_id in [item[1] for item in queue.get("queue_running", [])]


@pytest.mark.parametrize("overrides,expected", [
    ({"concept": "  \n "}, "no concept given"),
    ({"iterations": 0}, "iterations"),
    ({"method": "esd-q"}, "method"),
    ({"filename_prefix": "../../../escape"}, "outside the loras/esd folder"),
])
def test_bad_inputs_get_clear_errors(comfy_server, sd15, overrides, expected):
    prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
              "2": train_node(["1", 0], ["1", 1], **overrides)}
    status, resp = comfy_server.submit(prompt)
    if status == 400:  # rejected by ComfyUI's validation (e.g. a value outside the widget's options or range)
        assert expected in json.dumps(resp), resp
    else:
        assert expected in error_message(comfy_server.wait(resp["prompt_id"], timeout=120))
    assert comfy_server.alive()


def test_damaged_weights_file_is_refused(comfy_server, sd15):
    (comfy_server.loras_dir / "esd").mkdir(parents=True, exist_ok=True)
    (comfy_server.loras_dir / "esd" / "damaged.safetensors").write_bytes(b"\x00" * 100)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
              "2": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": 1.0,
                                                                   "erased_weights": "esd/damaged.safetensors"}}}
    prompt |= sample_nodes("damaged", ["2", 0], ["1", 1], ["1", 2], 10)
    entry = comfy_server.run(prompt, timeout=120)
    assert "damaged" in error_message(entry)
    assert comfy_server.alive()


def test_apply_refuses_other_architectures_and_warns_on_other_bases(comfy_server, sd15, tiny_checkpoint):
    trained = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
               "2": train_node(["1", 0], ["1", 1], filename_prefix="portable", seed=11)}
    assert_success(comfy_server.run(trained, timeout=600))

    def apply_to(ckpt):
        prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                  "2": {"class_type": "ApplyErasedWeights", "inputs": {
                      "model": ["1", 0], "strength": 1.0, "erased_weights": "esd/portable_00001_.safetensors"}}}
        return comfy_server.run(prompt | sample_nodes("portable", ["2", 0], ["1", 1], ["1", 2], 10), timeout=300)

    assert "made for a sd1 model" in error_message(apply_to(tiny_checkpoint("sd2v")))  # other shapes: refused
    other_base = apply_to(tiny_checkpoint("sd15_alt"))  # same shapes, other weights: applied with a warning
    assert_success(other_base)
    assert "warning: the MODEL's weights differ" in other_base["outputs"]["2"]["text"][0]
    same_base = apply_to(sd15)
    assert_success(same_base)
    assert "warning" not in same_base["outputs"]["2"]["text"][0]


def test_apply_without_a_file_is_a_clear_error(comfy_server, sd15):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15}},
              "2": {"class_type": "ApplyErasedWeights", "inputs": {"model": ["1", 0], "strength": 1.0,
                                                                   "erased_weights": "(none)"}}}
    message = error_message(comfy_server.run(prompt | sample_nodes("nofile", ["2", 0], ["1", 1], ["1", 2], 10)))
    assert "no erased weights chosen" in message


def test_gradient_checkpointing_and_bf16_options(comfy_server, sd15):
    """Memory options train the same erasure (checkpointing) or a close one (bf16 compute, float32 masters)."""
    def train(prefix, **options):
        prompt = {"1": {"class_type": "LoadFrozenUNet", "inputs": {"ckpt_name": sd15}},
                  "2": train_node(["1", 0], ["1", 1], filename_prefix=prefix, seed=21, **options)}
        assert_success(comfy_server.run(prompt, timeout=600))
        with safe_open(str(comfy_server.loras_dir / "esd" / f"{prefix}_00001_.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    plain = train("opt_plain")
    checkpointed = train("opt_ckpt", gradient_checkpointing=True)
    bf16 = train("opt_bf16", training_dtype="bf16")
    assert plain.keys() == checkpointed.keys() == bf16.keys()
    for k in plain:
        assert np.allclose(plain[k].numpy(), checkpointed[k].numpy(), rtol=0, atol=1e-7), k
    changed = sum(float((bf16[k] != 0).float().mean()) for k in bf16) / len(bf16)
    assert changed > 0.9  # bf16 compute still moves (almost) every weight through the float32 masters
