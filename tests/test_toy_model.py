"""Fast checks of the toy world, the committed toy Stable Diffusion pipeline and the committed detector."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The repo root holds the esd_bench package; make it importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esd_bench import TOY_SD_DIR, world  # noqa: E402

torch.set_num_threads(1)


def test_world_is_deterministic():
    a, b = world.make_sample(3, 7), world.make_sample(3, 7)
    assert np.array_equal(a.image, b.image)
    assert (a.caption, a.labels) == (b.caption, b.labels)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    # A sample does not depend on how many samples are drawn around it.
    images, labels, captions = world.make_dataset(3, 4, start=5)
    assert np.array_equal(images[2], a.image)
    assert captions[2] == a.caption
    assert list(labels[2]) == world.label_indices(a.labels)
    assert not np.array_equal(world.make_sample(3, 8).image, a.image)
    assert not np.array_equal(world.make_sample(4, 7).image, a.image)


def test_captions_name_only_true_attributes_and_some_are_empty():
    samples = [world.make_sample(11, i) for i in range(400)]
    empty = sum(not s.caption for s in samples) / len(samples)
    assert 0.05 < empty < 0.16
    for s in samples:
        named = world.attributes_in_text(s.caption)
        assert all(s.labels[a] == v for a, v in named.items()), (s.caption, s.labels)
        assert bool(named) == bool(s.caption)


def test_prompt_helpers_round_trip():
    prompt = world.prompt_for(shape="circle", color="red", style="striped")
    assert prompt == "a red circle on a striped background"
    assert world.attributes_in_text(prompt) == {"shape": "circle", "color": "red", "style": "striped"}
    assert world.attributes_in_text("an azure round disc, banded") == {"shape": "circle", "color": "blue",
                                                                      "style": "striped"}


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


def test_detector_classifies_fresh_clean_images():
    from esd_bench import detector

    images, labels, _ = world.make_dataset(seed=12345, n=24)
    preds = detector.classify(images)
    for i, attribute in enumerate(world.ATTRIBUTE_NAMES):
        truth = [world.ATTRIBUTES[attribute][j] for j in labels[:, i]]
        assert preds[attribute] == truth, attribute


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
