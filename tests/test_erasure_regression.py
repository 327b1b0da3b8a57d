"""Erasure regression: the demo's erasure (ESD-x, "a striped background", lr 5e-4, 200 iterations, fast mode) on the
committed toy through the core removes the target and leaves the other prompts, as the detector judges. A change
that stops erasing (or erases everything) fails here. The toy in ComfyUI computes the same predictions
(tests/host/test_equivalence.py); the host path's own erasure is measured by tools/host_erasure.py."""
from __future__ import annotations

import numpy as np

from esd_bench import demo
from esd_bench.erasure import ToyErasure, erased_pipeline
from esd_bench.evaluate import SamplingConfig, evaluate_prompts, load_toy_pipeline
from esd_core.config import FAST_CROSS_ATTENTION

#: the target and the prompts an erasure of it most easily disturbs (the other backgrounds) plus a shape and a colour
PROMPTS = [demo.DEFAULT_CONCEPT, "a dotted background", "a checkered background", "a plain background", "a cross",
           "a blue shape"]
SAMPLING = SamplingConfig(num_inference_steps=10, batch_size=48)
N = 8


def rates(pipe) -> list[float]:
    results = evaluate_prompts(pipe, PROMPTS, n_per_prompt=N, sampling=SAMPLING)
    return [r.hit_rate(next(iter(r.expected))) for r in results]


def test_esd_x_erases_the_target_and_keeps_the_others():
    base = load_toy_pipeline()
    erasure = ToyErasure(concept=demo.DEFAULT_CONCEPT, **FAST_CROSS_ATTENTION)
    pipe, result, _ = erased_pipeline(base, erasure)
    before, after = rates(base), rates(pipe)
    assert before[0] >= 0.75, before  # the toy draws the target (else the test proves nothing)
    assert after[0] <= 0.25, (before, after)  # erased
    drift = float(np.mean(np.abs(np.subtract(after[1:], before[1:]))))
    assert drift <= 0.15, (before, after)  # the others stay
