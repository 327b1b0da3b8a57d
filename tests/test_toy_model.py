"""Fast checks of the committed toy Stable Diffusion pipeline and of the evaluation API on it.

(The world's determinism and the committed detector are checked in test_world_and_detector.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esd_bench import TOY_SD_DIR, world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_SD_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_pipeline_has_sd_layout(toy_pipe):
    from transformers import CLIPTokenizer

    assert toy_pipe.safety_checker is None and toy_pipe.feature_extractor is None
    assert isinstance(toy_pipe.tokenizer, CLIPTokenizer) and len(toy_pipe.tokenizer) == 49408
    assert toy_pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert toy_pipe.tokenizer.model_max_length == 20  # prompts are padded to 20 tokens (see esd_bench/README.md)
    sched = toy_pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.num_train_timesteps, sched.prediction_type) == (1000, "epsilon")
    assert toy_pipe.vae_scale_factor == 4 and toy_pipe.unet.config.in_channels == 4  # 16x16x4 latents
    attn2 = [n for n, _ in toy_pipe.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(toy_pipe.unet.get_submodule(n).to_k.in_features == toy_pipe.text_encoder.config.hidden_size
                         for n in attn2)
    assert {p.dtype for p in toy_pipe.components["unet"].parameters()} == {torch.float32}
    assert toy_pipe.text_encoder.dtype == torch.float32


def test_toy_pipeline_generates_64px(toy_pipe):
    out = toy_pipe("a red circle on a striped background", num_inference_steps=10, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.05  # not a blank or NaN image


def test_evaluate_returns_rates(toy_pipe):
    from esd_bench import evaluate

    results = evaluate.evaluate_prompts(toy_pipe, ["a red circle"], seeds=[0, 1],
                                        sampling=evaluate.SamplingConfig(num_inference_steps=5))
    (r,) = results
    assert r.n == 2 and r.expected == {"shape": "circle", "color": "red"}
    for attribute, rates in r.rates.items():
        assert set(rates) == set(world.ATTRIBUTES[attribute])
        assert sum(rates.values()) == pytest.approx(1.0)
    assert 0.0 <= r.hit_rate("color") <= 1.0


def test_committed_toy_draws_what_it_is_prompted_with(toy_pipe):
    """A small sample of the committed model's quality, well above chance (20%), to catch a broken model being
    committed: 3 full prompts x 8 seeds, judged by the detector (measured: shape 100%, colour 83%, style 100%).
    esd_bench/README.md has the full measurement (shape 95%, colour 92%, style 94% over 240 samples each)."""
    from esd_bench import evaluate

    prompts = [world.prompt_for(shape=s, color=c, style=st)
               for s, c, st in (("circle", "red", "striped"), ("star", "blue", "dotted"), ("square", "yellow", "plain"))]
    results = evaluate.evaluate_prompts(toy_pipe, prompts, n_per_prompt=8,
                                        sampling=evaluate.SamplingConfig(num_inference_steps=20, guidance_scale=7.5))
    floors = {"shape": 0.75, "color": 0.7, "style": 0.75}
    for attribute in world.ATTRIBUTES:
        rate = np.mean([r.hit_rate(attribute) for r in results])
        assert rate >= floors[attribute], (attribute, rate)


def test_committed_toy_embeds_in_sd15_shapes(toy_pipe):
    from esd_bench import comfy_toy

    unet, text, vae = comfy_toy.expand_pipeline(toy_pipe.unet, toy_pipe.text_encoder, toy_pipe.vae)
    ckpt = comfy_toy.to_ldm_checkpoint(unet, text, vae, len(toy_pipe.vae.config.block_out_channels))
    assert ckpt["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert ckpt["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
    assert ckpt["first_stage_model.decoder.conv_in.weight"].shape[:2] == (512, 4)
