"""The paper's experiments in miniature, on the toy model, judged by the detector: this generator's section of
BENCHMARKS.md (``esd_bench.benchmark``; the rest of the file is kept, see `esd_bench.markdown`).

    python -m esd_bench.benchmark [--n 16] [--iterations 200] [--out BENCHMARKS.md]

Sections: object erasure with ESD-u (the paper's Imagenette table), style erasure with ESD-x (the artist matrix),
ESD-x against ESD-u, a negative-guidance (eta) sweep, who samples x_t, the inference-time baselines (negative prompt,
Safe Latent Diffusion) and robustness to prompts that describe the concept without naming it. Every number is the
detector's rate over N samples per prompt with seeds 0..N-1, sampled with DDIM and CFG as stated in the header.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from esd_core.config import parse_method
from esd_core.diffusers_adapter import quiet_hf_logging

from . import TOY_SD_DIR, world
from .erasure import LEARNING_RATES, ToyErasure, erased_pipeline
from .evaluate import SamplingConfig, evaluate_prompts, load_toy_pipeline
from .markdown import replace_section

SHAPES, STYLES = world.ATTRIBUTES["shape"], world.ATTRIBUTES["style"]
SECTION = "esd_bench.benchmark"  # this generator's section of BENCHMARKS.md (esd_bench.markdown)


@dataclass
class Bench:
    """Shared state: the base pipeline, sampling settings and a cache of rates per (model key, prompt)."""

    n: int
    iterations: int
    sampling: SamplingConfig
    base: object = None
    rates: dict = field(default_factory=dict)
    pipes: dict = field(default_factory=dict)
    log: Callable[[str], None] = print

    def pipe(self, erasure: ToyErasure | None):
        if erasure is None:
            return self.base
        if erasure not in self.pipes:
            t0 = time.perf_counter()
            self.pipes[erasure], _, _ = erased_pipeline(self.base, erasure)
            self.log(f"  erased {erasure.concept!r} ({erasure.label()}) in {time.perf_counter() - t0:.0f}s")
        return self.pipes[erasure]

    def rate(self, erasure: ToyErasure | None, prompt: str, attribute: str, value: str,
             sampling: SamplingConfig | None = None, pipe=None, key: str = "") -> float:
        """Fraction of the N samples of ``prompt`` in which the detector sees ``attribute = value``."""
        cache_key = (erasure, key, prompt)
        if cache_key not in self.rates:
            model = pipe if pipe is not None else self.pipe(erasure)
            self.rates[cache_key] = evaluate_prompts(model, [prompt], n_per_prompt=self.n,
                                                     sampling=sampling or self.sampling)[0].rates
        return self.rates[cache_key][attribute][value]

    def erasure(self, concept: str, method: str, **kw) -> ToyErasure:
        return ToyErasure(concept=concept, method=method, iterations=self.iterations, **kw)


def pct(x: float) -> str:
    return f"{100 * x:.0f}"


def mean_abs_change(b: Bench, erasure: ToyErasure | None, concepts: Sequence[tuple[str, str]], **rate_kw) -> float:
    """Mean absolute change of the rates of ``concepts`` ((attribute, value) pairs, each prompted on its own)
    under ``erasure`` (and ``rate_kw``), relative to the base model: the interference of an erasure."""
    return float(np.mean([abs(b.rate(erasure, world.prompt_for(**{a: v}), a, v, **rate_kw) -
                              b.rate(None, world.prompt_for(**{a: v}), a, v)) for a, v in concepts]))


def other_concepts_drift(b: Bench, erasure: ToyErasure, attribute: str, value: str) -> float:
    """Interference on every other concept the toy knows (the 14 other single-attribute prompts)."""
    return mean_abs_change(b, erasure, [(a, v) for a, values in world.ATTRIBUTES.items() for v in values
                                        if (a, v) != (attribute, value)])


def object_erasure(b: Bench) -> tuple[str, list[tuple[float, float, float]]]:
    """ESD-u on each shape: its own rate before/after, the mean change of the other shapes and of all 14 other
    concepts."""
    rows = ["| erased | its rate before | after | change | other shapes: mean change | mean abs change "
            "| all 14 other concepts: mean abs change |", "|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for s in SHAPES:
        e = b.erasure(world.prompt_for(shape=s), "esd-u")
        before, after = b.rate(None, e.concept, "shape", s), b.rate(e, e.concept, "shape", s)
        others = [b.rate(e, world.prompt_for(shape=o), "shape", o) - b.rate(None, world.prompt_for(shape=o), "shape", o)
                  for o in SHAPES if o != s]
        drift = other_concepts_drift(b, e, "shape", s)
        rows.append(f"| {s} | {pct(before)} | {pct(after)} | {100 * (after - before):+.0f} | "
                    f"{100 * np.mean(others):+.1f} | {100 * np.mean(np.abs(others)):.1f} | {100 * drift:.1f} |")
        summary.append((before, after, drift))
    return "\n".join(rows), summary


def style_matrix(b: Bench) -> tuple[str, list[tuple[float, float, float]]]:
    """ESD-x on each style; cell = rate of the column's style prompt after erasing the row's (diagonal = target)."""
    head = "| erased \\ prompt | " + " | ".join(STYLES) + " |"
    rows = [head, "|---|" + "---:|" * len(STYLES),
            "| *(none: base model)* | " + " | ".join(pct(b.rate(None, world.prompt_for(style=t), "style", t))
                                                  for t in STYLES) + " |"]
    rows[0] += " all 14 other concepts: mean abs change |"
    rows[1] += "---:|"
    rows[2] += " - |"
    summary = []
    for s in STYLES:
        e = b.erasure(world.prompt_for(style=s), "esd-x")
        cells = []
        for t in STYLES:
            p = world.prompt_for(style=t)
            after = b.rate(e, p, "style", t)
            cells.append(f"**{pct(after)}**" if t == s else pct(after))
        drift = other_concepts_drift(b, e, "style", s)
        rows.append(f"| {s} | " + " | ".join(cells) + f" | {100 * drift:.1f} |")
        summary.append((b.rate(None, e.concept, "style", s), b.rate(e, e.concept, "style", s), drift))
    return "\n".join(rows), summary


def x_versus_u(b: Bench, shape: str = "circle") -> str:
    """Same concept, both methods: the named prompt, prompts that combine it with other attributes, other shapes."""
    concept = world.prompt_for(shape=shape)
    combined = [world.prompt_for(shape=shape, color=c, style=st) for c, st in zip(world.ATTRIBUTES["color"], STYLES)]
    others = [o for o in SHAPES if o != shape]
    rows = ["| method | weights trained | named prompt | combined prompts (mean) | other shapes (mean change) |",
            "|---|---|---:|---:|---:|", f"| base | - | {pct(b.rate(None, concept, 'shape', shape))} | "
            f"{pct(np.mean([b.rate(None, p, 'shape', shape) for p in combined]))} | - |"]
    for method, what in (("esd-x", "cross-attention"), ("esd-u", "all but cross-attention")):
        e = b.erasure(concept, method)
        change = np.mean([b.rate(e, world.prompt_for(shape=o), "shape", o) -
                          b.rate(None, world.prompt_for(shape=o), "shape", o) for o in others])
        rows.append(f"| {method} | {what} | {pct(b.rate(e, concept, 'shape', shape))} | "
                    f"{pct(np.mean([b.rate(e, p, 'shape', shape) for p in combined]))} | {100 * change:+.1f} |")
    return "\n".join(rows)


def style_drift(b: Bench, erasure: ToyErasure | None, style: str, **rate_kw) -> float:
    """Interference on the other styles."""
    return mean_abs_change(b, erasure, [("style", t) for t in STYLES if t != style], **rate_kw)


def variants_table(b: Bench, column: str, variants: Sequence[tuple[str, ToyErasure]], style: str) -> str:
    """One ESD-x erasure of ``style`` per row, varying one setting."""
    concept = world.prompt_for(style=style)
    rows = [f"| {column} | target rate | other styles: mean abs change |", "|---|---:|---:|"]
    for label, e in variants:
        rows.append(f"| {label} | {pct(b.rate(e, concept, 'style', style))} | {100 * style_drift(b, e, style):.1f} |")
    return "\n".join(rows)


def eta_sweep(b: Bench, style: str = "striped") -> str:
    concept = world.prompt_for(style=style)
    return variants_table(b, "negative guidance (eta)", [
        (f"{eta:g}", b.erasure(concept, "esd-x", negative_guidance=eta)) for eta in (0.5, 1.0, 2.0, 4.0)], style)


def who_samples(b: Bench, style: str = "striped") -> str:
    concept = world.prompt_for(style=style)
    return variants_table(b, "x_t sampled by", [
        (who, b.erasure(concept, "esd-x", sample_with=who)) for who in ("trained", "frozen")], style)


def baselines(b: Bench, style: str = "striped") -> str:
    """Inference-time methods on the base model, measured like ESD: negative prompt and Safe Latent Diffusion."""
    from diffusers import StableDiffusionPipelineSafe
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    concept = world.prompt_for(style=style)
    sld = StableDiffusionPipelineSafe(**{k: v for k, v in b.base.components.items() if k != "image_encoder"},
                                      requires_safety_checker=False)
    sld.safety_concept = concept
    sld.set_progress_bar_config(disable=True)

    class SLDPipe:  # evaluate_prompts calls pipe(...); add SLD's medium settings to every call
        def __call__(self, **kw):
            return sld(**kw, **SafetyConfig.MEDIUM)

    methods = [("none (base)", None, None, ""), ("negative prompt", None,
                                                 SamplingConfig(**{**b.sampling.__dict__, "negative_prompt": concept}),
                                                 "neg"),
               ("SLD (medium)", SLDPipe(), None, "sld"),
               ("ESD-x", b.erasure(concept, "esd-x"), None, "")]
    rows = ["| method | target rate | other styles: mean abs change | cost |", "|---|---:|---:|---|"]
    cost = {"none (base)": "-", "negative prompt": "free at inference", "SLD (medium)": "a third UNet pass per step",
            "ESD-x": "training once, then free"}
    for name, model, sampling, key in methods:
        erasure = model if isinstance(model, ToyErasure) else None
        pipe = model if model is not None and not isinstance(model, ToyErasure) else None

        def r(prompt, value):
            return b.rate(erasure, prompt, "style", value, sampling=sampling, pipe=pipe, key=key)

        drift = style_drift(b, erasure, style, sampling=sampling, pipe=pipe, key=key)
        rows.append(f"| {name} | {pct(r(concept, style))} | {100 * drift:.1f} | {cost[name]} |")
    return "\n".join(rows)


def robustness(b: Bench) -> str:
    """Prompts that describe the erased concept without its canonical name, or in another word order."""
    cases = [("shape", "circle", "esd-u", {"color": "red", "style": "dotted"}),
             ("style", "striped", "esd-x", {"color": "red", "shape": "square"})]
    rows = ["| erased (method) | prompt | base | erased |", "|---|---|---:|---:|"]
    for attribute, value, method, context in cases:
        e = b.erasure(world.prompt_for(**{attribute: value}), method)
        probes = [f"a {w}" if attribute == "shape" else f"a {w} background" for w in world.PARAPHRASES[attribute][value]]
        full = world.prompt_for(**{attribute: value, **context})  # "a red circle on a dotted background"
        thing, _, background = full.partition(" on ")
        probes += [full, f"{background} with {thing}"]  # the same scene, other word order
        for p in dict.fromkeys([e.concept] + probes):
            rows.append(f"| {value} ({method}) | {p} | {pct(b.rate(None, p, attribute, value))} | "
                        f"{pct(b.rate(e, p, attribute, value))} |")
    return "\n".join(rows)


def report(b: Bench, command: str, seconds: float, sections: Sequence[tuple[str, str]], verdict: str) -> str:
    s = b.sampling
    lrs = " / ".join(f"{LEARNING_RATES[parse_method(m)]:g} for {m}" for m in ("esd-x", "esd-u"))
    head = (f"## Erasure quality on the toy model\n\nGenerated by `{command}` in {seconds / 60:.0f} min on 2 CPU cores "
            f"({torch.get_num_threads()} torch thread(s)). Every rate is the attribute detector's "
            f"(`esd_bench/detector.py`) fraction of "
            f"**N = {b.n} samples per prompt, seeds 0..{b.n - 1}**, sampled with DDIM {s.num_inference_steps} steps, "
            f"CFG {s.guidance_scale}. Erasures: {b.iterations} iterations, Adam lr {lrs} (`esd_bench/erasure.py`), "
            f"start guidance {ToyErasure.start_guidance:g}, DDIM {ToyErasure.ddim_steps} for x_t, seed 0, "
            f"eta 1 unless stated. Rates are percentages.\n\n{verdict}\n")
    return head + "".join(f"\n### {title}\n\n{body}\n" for title, body in sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="samples per prompt")
    parser.add_argument("--iterations", type=int, default=ToyErasure.iterations)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the evaluation samples")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--pipeline", type=Path, default=TOY_SD_DIR, help="diffusers pipeline folder (64 px images)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is best on a shared 2-core machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_hf_logging()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    b = Bench(n=args.n, iterations=args.iterations,
              sampling=SamplingConfig(guidance_scale=args.guidance, num_inference_steps=args.steps))
    b.base = load_toy_pipeline(args.pipeline)
    sections = []
    for title, fn in [("Object erasure with ESD-u (the paper's Imagenette table)", object_erasure),
                      ("Style erasure with ESD-x (the paper's artist matrix)", style_matrix)]:
        print(title, flush=True)
        table, summary = fn(b)
        sections.append((title, table))
        if fn is object_erasure:
            objects = summary
        else:
            styles = summary
    for title, fn in [("ESD-x against ESD-u on the same concept", x_versus_u),
                      ("Negative guidance (eta) sweep, ESD-x on 'striped'", eta_sweep),
                      ("Who samples x_t, ESD-x on 'striped'", who_samples),
                      ("Inference-time baselines on 'striped'", baselines),
                      ("Robustness: describing the erased concept without naming it", robustness)]:
        print(title, flush=True)
        sections.append((title, fn(b)))
    verdict = _verdict(objects, styles)
    command = "python -m esd_bench.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    replace_section(args.out, SECTION, report(b, command.strip(), time.perf_counter() - t0, sections, verdict))
    print(verdict, f"\nwrote the {SECTION} section of {args.out}", sep="\n")
    return 0


def _verdict(objects, styles) -> str:
    """The project's bar: the target falls by >= 70 points (a target drawn less often than that: to 0) while the 14
    other concepts move by <= 10 points on average. ``objects``/``styles``: (before, after, drift) per erasure."""
    lines = ["**Bar** (the target's rate falls by at least 70 points, or to 0 where it was below 70; the 14 other "
             "concepts move by at most 10 points on average):"]
    for name, rows in (("ESD-u objects", objects), ("ESD-x styles", styles)):
        falls = [before - after for before, after, _ in rows]
        drift = [d for _, _, d in rows]
        ok = all(fall >= min(0.70, before) - 1e-9 for fall, (before, _, _) in zip(falls, rows)) and max(drift) <= 0.10
        lines.append(f"- {name}: the target's rate falls by {100 * min(falls):.0f} to {100 * max(falls):.0f} points "
                     f"(after erasure: {', '.join(pct(after) for _, after, _ in rows)}); "
                     f"the others move by {100 * min(drift):.1f} to {100 * max(drift):.1f} on average: "
                     f"{'met' if ok else 'not met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
