"""Generate images with a (possibly erased) toy pipeline and measure, with the detector, how often each attribute
value appears.

Typical use (benchmark / demo)::

    from esd_bench import evaluate
    pipe = evaluate.load_toy_pipeline()
    erased = evaluate.with_unet(pipe, my_erased_unet)          # same text encoder, VAE, tokenizer, scheduler
    results = evaluate.evaluate_prompts(erased, ["a circle", "a round disc", "a red square"], n_per_prompt=16)
    results[0].hit_rate("shape")      # fraction of "a circle" samples the detector calls a circle
    results[0].rates["shape"]         # {"circle": 0.06, "square": 0.31, ...}

CLI (the README's numbers): ``python -m esd_bench.evaluate --n 16 --guidance 7.5 --steps 25``
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import TOY_SD_DIR, world

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How images are sampled (DDIM, the scheduler saved with the pipeline, with classifier-free guidance)."""

    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    batch_size: int = 32
    negative_prompt: str | None = None


@dataclass
class PromptResult:
    """Detector statistics of the samples of one prompt."""

    prompt: str
    n: int
    expected: dict[str, str]  # attribute -> value the prompt asks for (may be empty)
    rates: dict[str, dict[str, float]]  # attribute -> value -> fraction of samples
    all_expected_rate: float  # fraction of samples where every expected attribute is detected
    predictions: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def hit_rate(self, attribute: str) -> float:
        """Fraction of samples showing the value the prompt asks for (KeyError if it names none)."""
        return self.rates[attribute][self.expected[attribute]]

    def rate(self, attribute: str, value: str) -> float:
        return self.rates[attribute][value]


# ------------------------------------------------------------------------------------------------- pipelines


def load_toy_pipeline(path: str | Path = TOY_SD_DIR, dtype: torch.dtype = torch.float32):
    """The committed toy pipeline (``StableDiffusionPipeline``; DDIM scheduler, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(unet, text_encoder, vae, tokenizer=None, scheduler=None):
    """Assemble a ``StableDiffusionPipeline`` from parts; tokenizer/scheduler default to the toy pipeline's."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = tokenizer or CLIPTokenizer.from_pretrained(str(TOY_SD_DIR / "tokenizer"))
    scheduler = scheduler or DDIMScheduler.from_pretrained(str(TOY_SD_DIR / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_unet(pipe, unet):
    """A pipeline sharing every component of ``pipe`` except the UNet (e.g. an erased copy)."""
    comps = dict(pipe.components)
    comps["unet"] = unet
    new = type(pipe)(**comps, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


# ------------------------------------------------------------------------------------------------ generation


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingConfig | None = None) -> np.ndarray:
    """uint8 images of shape (len(prompts), len(seeds), 64, 64, 3).

    Sample (p, s) uses ``torch.Generator().manual_seed(seeds[s])`` for its initial noise, so it does not depend on
    batching, and the same seed gives the same starting noise for every prompt (paired comparisons).
    """
    sampling = sampling or SamplingConfig()
    jobs = [(p, s) for p in prompts for s in seeds]
    out: list[np.ndarray] = []
    for i in range(0, len(jobs), sampling.batch_size):
        chunk = jobs[i:i + sampling.batch_size]
        result = pipe(
            prompt=[p for p, _ in chunk],
            negative_prompt=[sampling.negative_prompt] * len(chunk) if sampling.negative_prompt else None,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            generator=[torch.Generator().manual_seed(int(s)) for _, s in chunk],
            output_type="np",
        )
        out.append(np.clip(np.rint(result.images * 255), 0, 255).astype(np.uint8))
    images = np.concatenate(out)
    return images.reshape(len(prompts), len(seeds), *images.shape[1:])


def attribute_rates(predictions: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Detector predictions -> fraction of samples per attribute value (every value listed, zeros included)."""
    rates: dict[str, dict[str, float]] = {}
    for attribute, values in world.ATTRIBUTES.items():
        preds = list(predictions[attribute])
        n = max(1, len(preds))
        rates[attribute] = {v: preds.count(v) / n for v in values}
    return rates


def evaluate_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, n_per_prompt: int = 16,
                     base_seed: int = 0, sampling: SamplingConfig | None = None, detector=None,
                     expected: Sequence[Mapping[str, str]] | None = None) -> list[PromptResult]:
    """Generate ``len(seeds)`` (default ``range(base_seed, base_seed + n_per_prompt)``) samples per prompt and
    measure attribute rates with the detector.

    ``expected[i]`` overrides which attribute values prompt i asks for; by default they are read from the prompt's
    words (canonical names and paraphrases, ``world.attributes_in_text``).
    """
    from . import detector as det

    seeds = list(seeds) if seeds is not None else list(range(base_seed, base_seed + n_per_prompt))
    images = generate(pipe, prompts, seeds, sampling)
    model = detector or det.default_detector()
    results = []
    for i, prompt in enumerate(prompts):
        preds = det.classify(images[i], model)
        exp = dict(expected[i]) if expected is not None else world.attributes_in_text(prompt)
        all_hit = np.ones(len(seeds), dtype=bool)
        for attribute, value in exp.items():
            all_hit &= np.array(preds[attribute]) == value
        results.append(PromptResult(prompt=prompt, n=len(seeds), expected=exp, rates=attribute_rates(preds),
                                    all_expected_rate=float(all_hit.mean()), predictions=preds))
    return results


# ------------------------------------------------------------------------------------------------- benchmark


def standard_prompts() -> list[str]:
    """15 single-attribute prompts + 25 full prompts (a Latin square: every shape/colour/style pair appears)."""
    single = ([world.prompt_for(shape=s) for s in world.ATTRIBUTES["shape"]]
              + [world.prompt_for(color=c) for c in world.ATTRIBUTES["color"]]
              + [world.prompt_for(style=s) for s in world.ATTRIBUTES["style"]])
    shapes, colors, styles = (world.ATTRIBUTES[a] for a in ("shape", "color", "style"))
    full = [world.prompt_for(shape=shapes[i], color=colors[(i + j) % 5], style=styles[(i + 2 * j) % 5])
            for i in range(5) for j in range(5)]
    return single + full


def summarize(results: Sequence[PromptResult]) -> dict[str, Any]:
    """Mean hit rate per attribute over the prompts naming it, and the all-attributes rate of full prompts."""
    per_attr = {a: [r.hit_rate(a) for r in results if a in r.expected] for a in world.ATTRIBUTES}
    full = [r.all_expected_rate for r in results if len(r.expected) == len(world.ATTRIBUTES)]
    return {
        "prompted_rate": {a: float(np.mean(v)) if v else None for a, v in per_attr.items()},
        "prompts_per_attribute": {a: len(v) for a, v in per_attr.items()},
        "all_attributes_rate_full_prompts": float(np.mean(full)) if full else None,
        "n_per_prompt": results[0].n if results else 0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prompted-attribute rates of a toy pipeline")
    parser.add_argument("--pipeline", type=Path, default=TOY_SD_DIR)
    parser.add_argument("--n", type=int, default=16, help="samples per prompt")
    parser.add_argument("--base-seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=SamplingConfig.guidance_scale)
    parser.add_argument("--steps", type=int, default=SamplingConfig.num_inference_steps)
    parser.add_argument("--prompts", nargs="*", default=None, help="default: standard_prompts()")
    parser.add_argument("--grid", type=Path, default=None, help="save a PNG grid of the first 8 samples per prompt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    pipe = load_toy_pipeline(args.pipeline)
    prompts = args.prompts or standard_prompts()
    sampling = SamplingConfig(guidance_scale=args.guidance, num_inference_steps=args.steps)
    t0 = time.time()
    results = evaluate_prompts(pipe, prompts, n_per_prompt=args.n, base_seed=args.base_seed, sampling=sampling)
    seconds = time.time() - t0
    if args.grid:
        imgs = generate(pipe, prompts, list(range(args.base_seed, args.base_seed + min(8, args.n))), sampling)
        world.render_grid(imgs.reshape(-1, *imgs.shape[2:]), columns=min(8, args.n)).save(args.grid)
    for r in results:
        hits = {a: round(r.hit_rate(a), 2) for a in r.expected}
        print(f"{r.prompt!r:55} {hits} all={r.all_expected_rate:.2f}")
    summary = summarize(results)
    summary.update(sampling=asdict(sampling), seconds=round(seconds, 1),
                   seconds_per_image=round(seconds / (len(prompts) * args.n), 3))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
