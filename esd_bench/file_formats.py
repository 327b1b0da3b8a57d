"""What the file format costs the erasure, on the toy model: save dtypes (fp32 / fp16 / bf16) and LoRA exports by rank.

    python -m esd_bench.file_formats [--n 12] [--out BENCHMARKS.md]

Two erasures (ESD-x on "a striped background", ESD-u on "a circle", the benchmark's settings) are trained once, saved
with every save dtype and exported as LoRAs of several ranks and energies (`esd_core.lora_export`); each file is loaded
back, applied to a fresh copy of the toy's UNet with `esd_core.erased_weights.apply_to_module` (what
`python -m esd_core apply` does), and the detector judges N samples per prompt of the erased concept and of the 14
other values of its attribute (the other background styles or shapes). The deviation table compares the stored
differences with the float32 ones.

Writes its own marked section of ``--out`` (``esd_bench.file_formats``, see `esd_bench.markdown`), leaving the rest
of the file as it is.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from esd_core.adapter import ParameterNaming
from esd_core.diffusers_adapter import quiet_hf_logging
from esd_core.erased_weights import SAVE_DTYPES, ErasedWeights, apply_to_module, load_erased_weights, save_erased_weights
from esd_core.lora_export import export_lora

from . import TOY_SD_DIR, world
from .benchmark import Bench, mean_abs_change, pct
from .erasure import ToyErasure, erased_pipeline
from .evaluate import SamplingConfig, load_toy_pipeline, with_unet
from .markdown import replace_section

SECTION = "esd_bench.file_formats"
ERASURES = (("style", "striped", "esd-x"), ("shape", "circle", "esd-u"))
EXPORTS = (("rank", 1), ("rank", 4), ("rank", 16), ("energy", 0.9))


def deviation(erased: ErasedWeights, stored: ErasedWeights) -> tuple[float, float, float]:
    """(largest absolute deviation, largest deviation relative to the largest |diff|, mean absolute deviation relative
    to the mean |diff|) of ``stored``'s dense differences from ``erased``'s, over every tensor."""
    pairs = [(t, getattr(stored.modules[stem], part)) for stem, c in erased.modules.items()
             for part, t in (("weight", c.weight), ("bias", c.bias)) if t is not None]
    ref = torch.cat([t.float().flatten() for t, _ in pairs])
    got = torch.cat([s.float().flatten() for _, s in pairs])
    err = (got - ref.float()).abs()
    return float(err.max()), float(err.max() / ref.abs().max()), float(err.mean() / ref.abs().mean())


def applied_pipe(base_pipe, path: Path):
    """The toy pipeline with the file applied at strength 1 to a fresh copy of its UNet."""
    unet = copy.deepcopy(base_pipe.unet)
    warning = apply_to_module(unet, load_erased_weights(path), 1.0, ParameterNaming.DIFFUSERS)
    if warning:
        raise RuntimeError(f"{path}: {warning}")  # same base: the check must pass
    return with_unet(base_pipe, unet)


def measure(b: Bench, path: Path, attribute: str, value: str, key: str) -> tuple[float, float]:
    """(the erased concept's rate, the mean absolute change of the other values of its attribute: the other 4 styles
    or shapes, where an erasure interferes most) with the file applied."""
    pipe = applied_pipe(b.base, path)
    target = b.rate(None, world.prompt_for(**{attribute: value}), attribute, value, pipe=pipe, key=key)
    others = [(attribute, v) for v in world.ATTRIBUTES[attribute] if v != value]
    return target, mean_abs_change(b, None, others, pipe=pipe, key=key)


def run(b: Bench, folder: Path, log=print) -> list[tuple[str, str]]:
    dtype_rows = ["| erasure | save dtype | file size | largest deviation | largest, relative to the largest diff "
                  "| mean deviation, relative to the mean diff | target rate | other values of the attribute: mean abs change |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
    lora_rows = ["| erasure | LoRA | file size | kept energy | target rate | other values of the attribute: mean abs change |",
                 "|---|---|---:|---:|---:|---:|"]
    for attribute, value, method in ERASURES:
        concept = world.prompt_for(**{attribute: value})
        t0 = time.perf_counter()
        _, result, adapter = erased_pipeline(b.base, ToyErasure(concept=concept, method=method,
                                                                iterations=b.iterations))
        erased = result.to_erased_weights(adapter)
        log(f"  erased {concept!r} with {method} in {time.perf_counter() - t0:.0f}s", flush=True)
        label = f"{method} {value}"
        base_rate = b.rate(None, concept, attribute, value)
        lora_rows.append(f"| {label} | *(none: base model)* | - | - | {pct(base_rate)} | - |")
        paths, measured = {}, {}
        for name in SAVE_DTYPES:
            paths[name] = save_erased_weights(folder / f"{method}_{value}_{name}.safetensors", erased, save_dtype=name)
            big, rel, mean_rel = deviation(erased, load_erased_weights(paths[name]))
            target, drift = measured[name] = measure(b, paths[name], attribute, value, key=paths[name].name)
            dtype_rows.append(f"| {label} | {name} | {_size(paths[name])} | {big:.2g} | {rel:.2g} | {mean_rel:.2g} "
                              f"| {pct(target)} | {100 * drift:.1f} |")
            log(f"  {label} {name}: target {pct(target)}, drift {100 * drift:.1f}", flush=True)
        target, drift = measured["fp32"]
        lora_rows.append(f"| {label} | full (fp32 file) | {_size(paths['fp32'])} | 1 | {pct(target)} | "
                         f"{100 * drift:.1f} |")
        for how, amount in EXPORTS:
            lora = export_lora(erased, **{how: amount}, source=paths["fp32"].name)
            path = save_erased_weights(folder / f"{method}_{value}_{how}{amount}.safetensors", lora)
            target, drift = measure(b, path, attribute, value, key=path.name)
            ranks = sorted({c.lora.rank for c in lora.modules.values() if c.lora is not None})
            desc = f"rank {amount}" if how == "rank" else f"energy {amount:g} (ranks {ranks[0]}-{ranks[-1]})"
            lora_rows.append(f"| {label} | {desc} | {_size(path)} | {lora.header.kept_energy:.3f} | {pct(target)} | "
                             f"{100 * drift:.1f} |")
            log(f"  {label} {desc}: target {pct(target)}, drift {100 * drift:.1f}", flush=True)
    return [("Save dtype: fp16 and bf16 files against the float32 differences", "\n".join(dtype_rows)),
            ("LoRA export by rank (fp16 files): size against erasure kept", "\n".join(lora_rows))]


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12, help="samples per prompt")
    parser.add_argument("--iterations", type=int, default=ToyErasure.iterations)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_hf_logging()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    b = Bench(n=args.n, iterations=args.iterations, sampling=SamplingConfig(guidance_scale=7.5, num_inference_steps=20))
    b.base = load_toy_pipeline(TOY_SD_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        sections = run(b, Path(tmp))
    command = "python -m esd_bench.file_formats " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"## File formats: save dtypes and LoRA exports on the toy\n\nGenerated by `{command.strip()}` in "
            f"{(time.perf_counter() - t0) / 60:.0f} min ({torch.get_num_threads()} torch thread). Each file is "
            f"applied at strength 1 to the toy's UNet; rates over N = {b.n} samples per prompt (seeds 0..{b.n - 1}, "
            f"DDIM 20, CFG 7.5); erasures of {b.iterations} iterations with the benchmark's settings. Deviations "
            f"are over every stored difference. Kept energy: the share of the erasure's squared Frobenius norm "
            f"the LoRA keeps (biases of low-rank layers, dropped, count as lost).\n")
    body = head + "".join(f"\n### {title}\n\n{table}\n" for title, table in sections)
    replace_section(args.out, SECTION, body)
    print(body, f"\nwrote {args.out}", sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
