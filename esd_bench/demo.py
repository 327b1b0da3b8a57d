"""`make demo`: erase a concept from the embedded toy model on the CPU and show what changed.

Prints a before/after table of the detector's rates for every single-attribute prompt, writes a before/after image
grid (PNG) and the erased-weights file (loadable by the ComfyUI nodes and `python -m esd_core apply`).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from esd_core.diffusers_adapter import quiet_hf_logging
from esd_core.erased_weights import save_erased_weights

from . import TOY_SD_DIR, world
from .erasure import ToyErasure, erased_pipeline
from .evaluate import SamplingConfig, evaluate_prompts, generate, load_toy_pipeline

DEFAULT_CONCEPT = world.prompt_for(style="striped")


def single_attribute_prompts() -> list[str]:
    return [world.prompt_for(**{a: v}) for a, values in world.ATTRIBUTES.items() for v in values]


def rates_table(prompts: Sequence[str], before, after) -> str:
    """Markdown table: for each prompt, how often the detector sees what it asks for, before and after."""
    rows = ["| prompt | asks for | before | after | change |", "|---|---|---:|---:|---:|"]
    for p, b, a in zip(prompts, before, after):
        (attribute, value), = b.expected.items()
        rb, ra = b.hit_rate(attribute), a.hit_rate(attribute)
        rows.append(f"| {p} | {attribute} = {value} | {100 * rb:.0f}% | {100 * ra:.0f}% | {100 * (ra - rb):+.0f} |")
    return "\n".join(rows)


def image_grid(before: np.ndarray, after: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """Rows = prompts; left block = before, right block = after (same seeds), separated by a white gap."""
    rows, cols, h, w, _ = before.shape
    gap = 8
    canvas = np.full((rows * (h + 2), 2 * cols * w + gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y = r * (h + 2)
            canvas[y:y + h, c * w:(c + 1) * w] = before[r, c]
            canvas[y:y + h, cols * w + gap + c * w:cols * w + gap + (c + 1) * w] = after[r, c]
    Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(path)
    return path


def run(erasure: ToyErasure, n: int, out_dir: Path, sampling: SamplingConfig, pipeline: Path = TOY_SD_DIR) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = load_toy_pipeline(pipeline)
    prompts = single_attribute_prompts()
    t0 = time.perf_counter()
    before = evaluate_prompts(base, prompts, n_per_prompt=n, sampling=sampling)
    t_eval = time.perf_counter() - t0
    pipe, result, adapter = erased_pipeline(base, erasure, on_progress=_progress(erasure.iterations))
    after = evaluate_prompts(pipe, prompts, n_per_prompt=n, sampling=sampling)
    print(f"\nErased {erasure.concept!r} ({erasure.label()}) in {result.seconds:.0f}s; "
          f"detector rates over {n} samples per prompt (seeds 0..{n - 1}), sampled before in {t_eval:.0f}s:\n")
    print(rates_table(prompts, before, after))

    shown = [erasure.concept] + [p for p in prompts if p != erasure.concept][::4]
    seeds = list(range(min(n, 6)))
    grid = image_grid(generate(base, shown, seeds, sampling), generate(pipe, shown, seeds, sampling), shown,
                      out_dir / f"demo-{stamp}.png")
    weights = save_erased_weights(out_dir / f"demo-{stamp}.safetensors", result.to_erased_weights(adapter))
    print(f"\nBefore | after grid ({len(shown)} prompts: {', '.join(shown)}): {grid}\nErased weights: {weights}")
    return {"before": before, "after": after, "result": result, "grid": grid, "weights": weights}


def _progress(total: int):
    def show(p) -> None:
        if p.step % 25 == 0 or p.step == total:
            print(f"  erasing: step {p.step}/{total}, loss {p.loss:.4g}, {p.elapsed:.0f}s", flush=True)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concept", default=DEFAULT_CONCEPT, help="prompt of the concept to erase")
    parser.add_argument("--method", default="esd-x")
    parser.add_argument("--iterations", type=int, default=ToyErasure.iterations)
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per method, esd_bench/erasure.py)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt for the rates")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for the evaluation images")
    parser.add_argument("--out", type=Path, default=Path(".demo"))
    parser.add_argument("--pipeline", type=Path, default=TOY_SD_DIR, help="diffusers pipeline folder (64 px images)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_hf_logging()
    torch.set_num_threads(1)
    erasure = ToyErasure(concept=args.concept, method=args.method, iterations=args.iterations,
                         learning_rate=args.lr)
    run(erasure, args.n, args.out, SamplingConfig(num_inference_steps=args.steps), args.pipeline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
