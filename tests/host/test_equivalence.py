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
    assert worst < 2e-3, worst  # float32 on both sides; ComfyUI's attention and conv kernels round differently
    assert result["gap_to_ksampler"] < 1e-4  # and the adapter's prediction is KSampler's own
