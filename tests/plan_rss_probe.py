"""Real peak memory of the parts of one ESD step on the CPU, for tests/test_plan.py (run as a script).

Each part's peak is the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above
its resident size just before the part. Run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then gives every tensor
above 64 KiB its own mapping and returns it on free, so resident memory follows the live tensors instead of the
allocator's free lists. Gradients are allocated before measuring (as in training from the second iteration on), so
the peaks are the working sets the planner reports.

    python plan_rss_probe.py UNET_CONFIG.json METHOD LATENT_SIDE
    -> JSON {"step": B, "sampling": B, "step_checkpointed": B}
"""
import json
import sys

import torch
from diffusers import UNet2DConditionModel

from esd_core.memory import checkpoint_units, gradient_checkpointing
from esd_core.methods import select_parameter_names


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _peak_of(fn) -> int:
    fn()  # warm-up: one-time allocations of the kernels are not part of a step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - before


def main(config: dict, method: str, side: int) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
    selected = set(select_parameter_names(method, [n for n, _ in unet.named_parameters()]))
    for n, p in unet.named_parameters():
        if n in selected:
            p.requires_grad_(True)
            p.grad = torch.zeros_like(p)
    x, t, context = torch.randn(2, 4, side, side), torch.tensor([500, 500]), torch.randn(2, 77, 32)

    def step():
        unet(x[:1], t[:1], context[:1]).sample.float().square().mean().backward()

    def sampling():
        with torch.no_grad():
            unet(x, t, context)

    out = {"step": _peak_of(step), "sampling": _peak_of(sampling)}
    with gradient_checkpointing(checkpoint_units(unet)):  # the trainer's units
        out["step_checkpointed"] = _peak_of(step)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        config = json.load(f)
    print(json.dumps(main(config, sys.argv[2], int(sys.argv[3]))))
