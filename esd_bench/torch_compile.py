"""Would `torch.compile` pay off for ESD? The toy UNet's two kinds of pass, eager against compiled.

    python -m esd_bench.torch_compile [--device cpu|cuda] [--passes 20]

ESD runs two passes per iteration: a guided sampling pass (batch 2, no gradients; tens per iteration in the paper's
mode, one per iteration in the fast mode's pools) and a training pass (batch 1, forward and backward through the
esd-x parameters). Both are timed eager and through `torch.compile` (inductor, default mode), after two warm-up
passes each; compilation is timed separately. CPU: process CPU seconds with one torch thread (robust to other work
on the machine); CUDA: wall seconds after synchronising.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .evaluate import load_toy_pipeline


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def per_pass(fn, device: torch.device, passes: int) -> float:
    fn(), fn()  # warm-up (and, compiled, any recompilation for the second call)
    start = clock(device)
    for _ in range(passes):
        fn()
    return (clock(device) - start) / passes


def measure(device: torch.device, passes: int) -> str:
    unet = load_toy_pipeline().unet.to(device).float()
    for name, p in unet.named_parameters():
        p.requires_grad_("attn2" in name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g).to(device)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device)
    t = torch.tensor([500, 500], device=device)

    def passes_of(model):
        def sample():
            with torch.no_grad():
                model(x, t, cond)

        def train():
            model(x[:1], t[:1], cond[:1]).sample.square().mean().backward()

        return sample, train

    eager = [per_pass(fn, device, passes) for fn in passes_of(unet)]
    start = clock(device)
    compiled_unet = torch.compile(unet)
    compiled_fns = passes_of(compiled_unet)
    for fn in compiled_fns:
        fn()
    compile_seconds = clock(device) - start
    compiled = [per_pass(fn, device, passes) for fn in compiled_fns]
    unit = "CPU s" if device.type == "cpu" else "s"
    rows = [f"| {name} | {1e3 * e:.1f} | {1e3 * c:.1f} | {e / c:.2f}x |"
            for name, e, c in zip(("sampling pass (batch 2, no gradients)", "training pass (batch 1, forward + "
                                   "backward, esd-x)"), eager, compiled)]
    return "\n".join([f"toy UNet on {device}, {passes} passes each after 2 warm-up passes; compilation of both: "
                      f"{compile_seconds:.0f} {unit}", "", f"| pass | eager ms ({unit}) | compiled ms | speed-up |",
                      "|---|---:|---:|---:|", *rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(measure(torch.device(args.device), args.passes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
