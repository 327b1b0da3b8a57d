"""ComfyUI's path computes what the command line's computes: the pack's ComfyUI adapter on the SD1.5-shaped toy
(loaded by ComfyUI's own checkpoint loader, in a subprocess) predicts the same noise as the diffusers adapter on the
same embedded model for the same x_t, t and prompt; epsilon, and the same weights read as a v-prediction model
(ComfyUI's stock ModelSamplingDiscrete patch; diffusers' scheduler prediction_type)."""
from __future__ import annotations

import pytest
import torch
from comfy_probe import run_probe
from comfy_server import DEFAULT_COMFY, ROOT

from esd_bench import comfy_toy
from esd_bench.embedding_steps import embedded_pipeline
from esd_core.adapter import BaseModelInfo
from esd_core.diffusers_adapter import DiffusersSDAdapter

PROMPTS = ["a striped background", "a red star on a dotted background"]
TIMESTEPS = [100, 500, 900]


@pytest.fixture(scope="module")
def embedded():
    """The embedded toy in diffusers with the checkpoint file's fp16 rounding (what ComfyUI loads), CLIP prompts
    padded to 77 tokens as ComfyUI pads them (the toy's pad token is CLIP's end token, as ComfyUI's)."""
    pipe = embedded_pipeline()
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for p in module.parameters():
                p.copy_(p.half().float())
    pipe.tokenizer.model_max_length = 77
    return pipe


@pytest.mark.parametrize("v_prediction", [False, True], ids=["epsilon", "v"])
def test_comfyui_adapter_predicts_what_diffusers_predicts(comfy_dir, embedded, v_prediction):
    checkpoint = comfy_toy.cached_checkpoint()
    result = run_probe("predictions", checkpoint, DEFAULT_COMFY, ROOT, prompts=PROMPTS, timesteps=TIMESTEPS,
                       resolution=128, v_prediction=v_prediction, fp32_text_encoder=True)
    embedded.scheduler.register_to_config(prediction_type="v_prediction" if v_prediction else "epsilon")
    adapter = DiffusersSDAdapter(embedded, BaseModelInfo("embedded toy"))
    worst = 0.0
    for row in result["eps"]:
        x_t = torch.tensor(row["x_t"]).view(1, 4, 16, 16)
        comfy_eps = torch.tensor(row["eps"]).view(1, 4, 16, 16)
        with torch.no_grad():
            eps = adapter.predict_noise(x_t, torch.tensor([row["t"]]), adapter.encode_prompts([row["prompt"]]))
            # not a trivially shared answer: another prompt gives another prediction
            other = adapter.predict_noise(x_t, torch.tensor([row["t"]]),
                                          adapter.encode_prompts(["a plain background"]))
        worst = max(worst, float((eps - comfy_eps).abs().max() / eps.abs().max()))
        assert float((other - comfy_eps).abs().max()) > 10 * float((eps - comfy_eps).abs().max()), row["prompt"]
    assert worst < 1e-4, worst  # float32 on both sides (measured 1.6e-6): kernels round differently
    assert result["gap_to_ksampler"] < 1e-4  # and the adapter's prediction is KSampler's own


def test_a_few_iterations_through_the_nodes_give_the_command_lines_weights(tmp_path, embedded):
    """The same seed, float32 and settings: ESD Erase Concept in the real host (the toy's checkpoint, its CLIP in fp32)
    and `python -m esd_core erase` (the same embedded model as a diffusers folder) train the same changes."""
    from comfy_server import ComfyServer
    from test_nodes import assert_success

    from esd_core.cli import main
    from esd_core.erased_weights import load_erased_weights

    embedded.scheduler.register_to_config(prediction_type="epsilon")
    folder = tmp_path / "embedded_toy"
    embedded.tokenizer.init_kwargs["model_max_length"] = 77  # saved with the 77-token padding ComfyUI uses
    embedded.save_pretrained(folder)
    settings = {"concept": "a striped background", "method": "esd-x", "iterations": 2, "ddim_steps": 4,
                "learning_rate": 5e-5, "seed": 3}
    cli_file = tmp_path / "cli.safetensors"
    assert main(["erase", "--model", str(folder), "--concept", settings["concept"], "--method", settings["method"],
                 "--iterations", "2", "--ddim-steps", "4", "--lr", "5e-5", "--seed", "3", "--resolution", "64",
                 "--dtype", "fp32", "--save-dtype", "fp32", "--out", str(cli_file)]) == 0

    with ComfyServer(tmp_path / "host", extra_args=["--fp32-text-enc"]) as server:
        (server.checkpoints_dir / "toy.safetensors").symlink_to(comfy_toy.cached_checkpoint())
        prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "toy.safetensors"}},
                  "2": {"class_type": "ESDTrain", "inputs": {
                      "model": ["1", 0], "clip": ["1", 1], **settings, "negative_guidance": 1.0,
                      "start_guidance": 3.0, "resolution": 128, "filename_prefix": "nodes", "sample_with": "trained",
                      "training_dtype": "fp32", "save_dtype": "fp32"}}}
        assert_success(server.run(prompt, timeout=1200))
        nodes = load_erased_weights(server.loras_dir / "esd" / "nodes_00001_.safetensors")
    cli = load_erased_weights(cli_file)
    assert nodes.modules.keys() == cli.modules.keys() and nodes.modules
    gaps, sizes = [], []
    for stem, change in cli.modules.items():
        for part in ("weight", "bias"):
            a, b = getattr(change, part), getattr(nodes.modules[stem], part)
            if a is not None:
                gaps.append(float((a - b).norm()) ** 2)
                sizes.append(float(a.norm()) ** 2)
    # Adam's first steps are lr * sign(gradient): an element whose gradient is at rounding level may flip, so the
    # comparison is of the whole change, not element by element
    assert (sum(gaps) / sum(sizes)) ** 0.5 < 1e-3, ((sum(gaps) / sum(sizes)) ** 0.5)
