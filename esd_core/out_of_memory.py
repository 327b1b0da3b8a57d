"""What a run that ran out of memory tells its user: where it stopped, what it needed, and the settings that use less.

The trainer catches ``torch.OutOfMemoryError``, builds this message while the run's tensors still exist (so the
memory in use is what the run held), then releases them before raising `esd_core.errors.TrainingOutOfMemory`.
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ESDConfig, OptimizerName, RunOptions
from .plan import MemoryPlan, fitting_options

#: "Tried to allocate 2.00 GiB" (CUDA), "you tried to allocate 123456 bytes" (CPU allocator)
_REQUEST = re.compile(r"tried to allocate ([\d.]+) ?(bytes|B|KiB|MiB|GiB|TiB)", re.IGNORECASE)
_UNITS = {"bytes": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class RunPosition:
    """Where a run is: the latest phase and finished iteration, recorded by wrapping the trainer's callbacks."""

    total: int
    phase: str = "starting"
    step: int = 0
    plan: MemoryPlan | None = None  # the memory planner's estimate of the run (`esd_core.plan.preflight`), if any

    def progress(self, callback: Callable | None) -> Callable:
        def record(progress) -> None:
            self.step = progress.step
            if callback is not None:
                callback(progress)
        return record

    def phases(self, callback: Callable | None) -> Callable:
        def record(name: str) -> None:
            self.phase = name
            if callback is not None:
                callback(name)
        return record


def requested_bytes(error: BaseException) -> int | None:
    """The size of the allocation that failed, from the allocator's message (None if it does not say)."""
    m = _REQUEST.search(str(error))
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()]) if m else None


def gib(n: int) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB (so small figures are not shown as 0.00)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_saving_options(config: ESDConfig, options: RunOptions, compute_dtype: torch.dtype,
                          device: torch.device) -> list[str]:
    """Settings this run does not use yet that lower its memory, the ones that change the result least first."""
    out = []
    if not options.gradient_checkpointing:
        out.append("gradient_checkpointing on (same result, about a third slower)")
    if device.type == "cuda" and compute_dtype == torch.float32:
        out.append("training_dtype bf16 (activations in half the memory; trained tensors stay float32)")
    if config.optimizer == OptimizerName.ADAM:
        out.append("optimizer adamw8bit (a quarter of Adam's state) or adafactor (almost none)")
    if config.lora_rank == 0:
        out.append("lora_rank 16 (trains small adapters instead of the weights; raise the learning rate)")
    if config.trajectory_pool > 1:
        out.append(f"a smaller trajectory pool than {config.trajectory_pool} (fast off, or pool 1)")
    if config.resolution == 0 or config.resolution > 256:
        out.append("a lower resolution (e.g. half the native size)")
    return out


def planned_savings(plan: MemoryPlan | None, shortfall: int | None) -> list[str]:
    """The planner's option sets (`esd_core.plan.fitting_options`) whose estimate is at least ``shortfall`` bytes
    (what the failed allocation asked for) below the estimate of the run that failed; none without both figures."""
    if plan is None or plan.replan is None or not shortfall or shortfall >= plan.total:
        return []
    return [option.describe() for option in fitting_options(plan, plan.total - shortfall)]


def out_of_memory_message(error: BaseException, config: ESDConfig, options: RunOptions, adapter,
                          position: RunPosition) -> str:
    """The user's message for ``error``: the settings the memory planner estimates to need at least what the failed
    allocation asked for less, when it planned the run; otherwise the settings that use less memory
    (`memory_saving_options`)."""
    device = torch.device(adapter.device)
    where = (f"at iteration {position.step + 1} of {position.total}" if position.phase != "starting"
             else "before the first iteration")
    asked = requested_bytes(error)
    need = ""
    if device.type == "cuda":
        in_use = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        need = (f"; it needed at least {gib(in_use + (asked or 0))} ({gib(in_use)} in use"
                + (f" + {gib(asked)} more" if asked else "") + f") of the device's {gib(total)}")
    elif asked:
        need = f"; it asked for {gib(asked)} more than was free"
    fitting = planned_savings(position.plan, asked)
    if fitting:
        fix = (f"settings the memory planner estimates at least {gib(asked)} below this run's "
               f"{gib(position.plan.total)}: " + "; ".join(fitting))
    else:
        advice = memory_saving_options(config, options, adapter.dtype, device)
        fix = "settings that use less memory: " + "; ".join(advice)
    if not fitting and not advice:
        fix = "every memory-saving setting is already on: use a device with more memory or a smaller method"
    kept = (f"; its last resumable checkpoint is kept at {options.checkpoint}"
            if options.checkpoint is not None and options.checkpoint.exists() else "")
    return (f"out of memory on {device} while {position.phase} {where}{need}. Everything the run allocated was "
            f"released and nothing was saved{kept}. Try {fix}")


def free_cached_memory(device: torch.device | str) -> None:
    """Collect what the failed run left unreachable and hand the allocator's cached blocks back to the device."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
