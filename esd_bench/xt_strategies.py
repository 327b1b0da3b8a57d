"""How to produce x_t faster: the fast-mode candidates against the paper's procedure, on the toy benchmark.

    python -m esd_bench.xt_strategies [--n 8] [--iterations 200] [--out BENCHMARKS.md]

For each erasure (ESD-x on a background style, ESD-u on a shape) and each x_t strategy, one run of the same number of
iterations on the toy model, timed (wall seconds of `esd_core.trainer.erase`, one torch thread), then judged by the
detector: the target's rate and the mean absolute change of the 14 other concepts, against the default (the paper's
fresh partial trajectory per iteration, sampled by the model being trained). The fast mode (`esd_core.config.FAST_PRESET`)
is the fastest strategy whose erasure stays within 5 points of the default's on the target and on the others.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esd_core.diffusers_adapter import quiet_hf_logging

from . import world
from .erasure import ToyErasure, erased_pipeline
from .evaluate import SamplingConfig, evaluate_prompts, load_toy_pipeline

SECTION = "x_t strategies"


@dataclass(frozen=True)
class Strategy:
    """One way of producing x_t (the settings of `ESDConfig` it changes)."""

    name: str
    sample_with: str = "trained"
    trajectory_pool: int = 0
    ddim_steps: int = 25

    def apply(self, erasure: ToyErasure) -> ToyErasure:
        return erasure.but(sample_with=self.sample_with, trajectory_pool=self.trajectory_pool,
                           ddim_steps=self.ddim_steps)


STRATEGIES = [
    Strategy("paper: fresh partial trajectory per iteration, trained model samples (default)"),
    Strategy("fresh partial trajectory per iteration, frozen model samples", sample_with="frozen"),
    Strategy("fewer, larger DDIM steps (10 instead of 25)", ddim_steps=10),
    Strategy("pool of 1 trajectory, trained model samples (refreshed every 25 iterations)", trajectory_pool=1),
    Strategy("pools of 4 trajectories in one batch, trained model samples (refreshed every 100)", trajectory_pool=4),
    Strategy("pool of 1 trajectory, frozen model samples, teacher recorded", sample_with="frozen", trajectory_pool=1),
    Strategy("pools of 4 trajectories in one batch, frozen model, teacher recorded", sample_with="frozen",
             trajectory_pool=4),
    Strategy("pools of 8 trajectories in one batch, frozen model, teacher recorded", sample_with="frozen",
             trajectory_pool=8),
]
ERASURES = [ToyErasure(concept=world.prompt_for(style="striped"), method="esd-x"),
            ToyErasure(concept=world.prompt_for(shape="circle"), method="esd-u")]


def concepts() -> list[tuple[str, str]]:
    return [(a, v) for a, values in world.ATTRIBUTES.items() for v in values]


def target_of(erasure: ToyErasure) -> tuple[str, str]:
    (pair,) = world.attributes_in_text(erasure.concept).items()
    return pair


def measure(base, erasure: ToyErasure, n: int, sampling: SamplingConfig, base_rates: dict) -> dict:
    t0 = time.perf_counter()
    pipe, result, _ = erased_pipeline(base, erasure)
    seconds = time.perf_counter() - t0
    prompts = [world.prompt_for(**{a: v}) for a, v in concepts()]
    rates = {c: r.hit_rate(c[0]) for c, r in zip(concepts(), evaluate_prompts(pipe, prompts, n_per_prompt=n,
                                                                             sampling=sampling))}
    target = target_of(erasure)
    others = [abs(rates[c] - base_rates[c]) for c in concepts() if c != target]
    return {"seconds": seconds, "target": rates[target], "others": float(np.mean(others)),
            "final_loss": float(np.mean(result.losses[-20:]))}


def run(n: int, iterations: int, log=print) -> str:
    quiet_hf_logging()
    torch.set_num_threads(1)
    sampling = SamplingConfig(guidance_scale=7.5, num_inference_steps=20)
    base = load_toy_pipeline()
    prompts = [world.prompt_for(**{a: v}) for a, v in concepts()]
    base_rates = {c: r.hit_rate(c[0]) for c, r in zip(concepts(), evaluate_prompts(base, prompts, n_per_prompt=n,
                                                                                  sampling=sampling))}
    lines = []
    for erasure in ERASURES:
        erasure = erasure.but(iterations=iterations)
        target = target_of(erasure)
        lines += [f"\n{erasure.method} on '{erasure.concept}' ({iterations} iterations, lr {erasure.lr:g}; "
                  f"target rate before: {100 * base_rates[target]:.0f}%)\n",
                  "| x_t strategy | seconds | speed-up | target rate | other concepts: mean abs change | "
                  "within 5 points of the default |", "|---|---:|---:|---:|---:|---|"]
        default = None
        for strategy in STRATEGIES:
            m = measure(base, strategy.apply(erasure), n, sampling, base_rates)
            default = default or m
            close = (abs(m["target"] - default["target"]) <= 0.05 and abs(m["others"] - default["others"]) <= 0.05)
            lines.append(f"| {strategy.name} | {m['seconds']:.0f} | {default['seconds'] / m['seconds']:.1f}x | "
                         f"{100 * m['target']:.0f} | {100 * m['others']:.1f} | {'yes' if close else 'no'} |")
            log(lines[-1])
    header = (f"Generated by `python -m esd_bench.xt_strategies --n {n} --iterations {iterations}` (one torch thread; "
              f"{n} samples per prompt, seeds 0..{n - 1}, DDIM 20, CFG 7.5; seconds = wall time of the erasure "
              "alone, in one process, one after the other).")
    return header + "\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write the tables into this markdown file's section")
    args = parser.parse_args(argv)
    text = run(args.n, args.iterations, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
