"""The demo's erasure measured through the real ComfyUI host: the SD1.5-shaped toy (esd_bench/comfy_toy.py) loaded
by the stock CheckpointLoaderSimple, erased by ESD Erase Concept, every single-attribute prompt sampled by the stock
KSampler from the base and from the erased MODEL (seeds as one batch), the images judged by esd_bench's detector.
Prints the before/after table as `make demo` does, and the target's fall and the others' mean change.

    OMP_NUM_THREADS=1 .venv/bin/python tools/host_erasure.py [--n 8] [--steps 20] [--iterations 200]
        [--lr 5e-5] [--fast] [--out FILE.md]

Starts its own server (tests/host/comfy_server.py) in a temporary folder with this checkout as the pack. `make test`
does not run it (an erasure through the SD1.5-shaped toy takes CPU-hours at these settings); its regression test runs
the same erasure through the core (tests/test_erasure_regression.py), tied to the host path by
tests/host/test_equivalence.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "host")]

from comfy_server import ComfyServer  # noqa: E402

from esd_bench import comfy_toy, demo, detector, world  # noqa: E402

#: ComfyUI counts 8 pixels per latent; the toy's 16x16 latents are a 128 px EmptyLatentImage (64 px images).
TOY_LATENT_PX = 128


@dataclass(frozen=True)
class HostErasure:
    """The erasure and the evaluation (defaults: the demo's settings, `esd_bench.erasure.ToyErasure`, except the
    learning rate, chosen for the embedding: see esd_bench/embedding_steps.py)."""

    concept: str = demo.DEFAULT_CONCEPT
    method: str = "esd-x"
    iterations: int = 200
    learning_rate: float = 5e-5
    ddim_steps: int = 25
    fast: bool = False
    n: int = 8              # images per prompt (seeds of one batch)
    steps: int = 20         # KSampler steps of the evaluation images
    cfg: float = 7.5
    seed: int = 0


def _graph(ckpt: str, e: HostErasure, prompts: list[str]) -> dict:
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "2": {"class_type": "ESDTrain", "inputs": {
                 "model": ["1", 0], "clip": ["1", 1], "concept": e.concept, "method": e.method,
                 "negative_guidance": 1.0, "start_guidance": 3.0, "iterations": e.iterations,
                 "learning_rate": e.learning_rate, "ddim_steps": e.ddim_steps, "resolution": TOY_LATENT_PX,
                 "seed": e.seed, "filename_prefix": "host_erasure", "sample_with": "trained", "fast": e.fast}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": TOY_LATENT_PX, "height": TOY_LATENT_PX,
                                                                "batch_size": e.n}}}
    for i, text in enumerate(prompts):
        graph[f"p{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
        for side, model in (("before", ["1", 0]), ("after", ["2", 0])):
            graph[f"k{side}{i}"] = {"class_type": "KSampler", "inputs": {
                "model": model, "positive": [f"p{i}", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": e.seed, "steps": e.steps, "cfg": e.cfg, "sampler_name": "euler", "scheduler": "normal",
                "denoise": 1.0}}
            graph[f"d{side}{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"k{side}{i}", 0],
                                                                          "vae": ["1", 2]}}
            graph[f"s{side}{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"d{side}{i}", 0],
                                                                         "filename_prefix": f"{side}_{i}"}}
    return graph


def erasure_rates(server: ComfyServer, ckpt: str, e: HostErasure, prompts: list[str] | None = None,
                  timeout: float = 7200) -> dict:
    """Run the erasure and the evaluation in ``server`` (``ckpt`` in its checkpoints); per prompt the detector's rate
    of the attribute it asks for, before and after: {"prompts", "before", "after", "seconds"}."""
    prompts = prompts or demo.single_attribute_prompts()
    t0 = time.monotonic()
    entry = server.run(_graph(ckpt, e, prompts), timeout=timeout)
    status = entry["status"]
    if status["status_str"] != "success":
        raise RuntimeError(f"the host run failed: {status['messages']}"[-4000:])
    model = detector.default_detector()
    rates = {"before": [], "after": []}
    for i, text in enumerate(prompts):
        (attribute, value), = world.attributes_in_text(text).items()
        for side in rates:
            files = entry["outputs"][f"s{side}{i}"]["images"]
            images = np.stack([np.asarray(Image.open(server.output_dir / f["subfolder"] / f["filename"])
                                          .convert("RGB")) for f in files])
            found = detector.classify(images, model)[attribute]
            rates[side].append(float(np.mean([v == value for v in found])))
    return {"prompts": prompts, **rates, "seconds": time.monotonic() - t0}


def summary(e: HostErasure, r: dict) -> str:
    rows = ["| prompt | before | after | change |", "|---|---:|---:|---:|"]
    others = []
    for p, b, a in zip(r["prompts"], r["before"], r["after"]):
        rows.append(f"| {p} | {100 * b:.0f}% | {100 * a:.0f}% | {100 * (a - b):+.0f} |")
        if p != e.concept:
            others.append(abs(a - b))
    i = r["prompts"].index(e.concept)
    return "\n".join(rows) + (
        f"\n\nTarget {e.concept!r}: {100 * r['before'][i]:.0f}% -> {100 * r['after'][i]:.0f}%; the "
        f"{len(others)} others move {100 * float(np.mean(others)):.1f} points on average (mean absolute change).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = HostErasure()
    parser.add_argument("--n", type=int, default=d.n)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--iterations", type=int, default=d.iterations)
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument("--fast", action="store_true", help="ESD Erase Concept's fast mode")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    e = HostErasure(iterations=args.iterations, learning_rate=args.lr, fast=args.fast, n=args.n, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        ckpt = server.checkpoints_dir / "esd_toy_sd15.safetensors"
        ckpt.symlink_to(comfy_toy.cached_checkpoint())
        r = erasure_rates(server, ckpt.name, e)
    text = (f"Through ComfyUI: {e.method} erasing {e.concept!r}, {e.iterations} iterations, lr {e.learning_rate:g}, "
            f"DDIM {e.ddim_steps}{', fast' if e.fast else ''}; KSampler euler {e.steps} steps, cfg {e.cfg}, {e.n} "
            f"images per prompt; {r['seconds']:.0f} s\n\n" + summary(e, r))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
