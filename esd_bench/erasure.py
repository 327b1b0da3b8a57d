"""ESD on the toy model: one erasure = one `esd_core` run on a fresh copy of the committed toy pipeline."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from esd_core.adapter import BaseModelInfo
from esd_core.config import ESDConfig, Method, parse_method
from esd_core.diffusers_adapter import DiffusersSDAdapter
from esd_core.trainer import ErasureResult, erase

from . import TOY_SD_DIR


# Adam learning rate per method on the toy (200 iterations). The paper's 1e-5 is for SD's 860M-parameter UNet; the
# toy's UNet has 1.7M. ESD-u trains ~90% of the UNet's weights (everything but cross-attention), ESD-x a few percent,
# so the same step size disturbs the whole model far more under ESD-u. Measured (8 samples per prompt; drift = mean
# absolute change of the 14 other concepts' rates), ESD-u, target rate before -> after, drift in points:
#   toy after two of its three training cycles, "a circle": lr 5e-4 100 -> 0, 19.6; 2e-4 100 -> 0, 8.9; 1e-4 100 -> 0, 6.2
#   committed toy, "a triangle": 1e-4 (n=12, BENCHMARKS.md run) 100 -> 50; 1e-4 x 400 iterations 100 -> 50, 0.9;
#   2e-4 100 -> 25, 1.8; 3e-4 100 -> 25, 4.5.  "a star": 2e-4 100 -> 0, 5.4.  "a circle": 3e-4 100 -> 12, 16.1.
# ESD-x at 5e-4: BENCHMARKS.md. Not measured: esd-x-strict and selfattn take ESD-x's rate (few weights), esd-all ESD-u's.
LEARNING_RATES: dict[Method, float] = {Method.ESD_X: 5e-4, Method.ESD_X_STRICT: 5e-4, Method.SELFATTN: 5e-4,
                                       Method.ESD_U: 2e-4, Method.ESD_ALL: 2e-4}


@dataclass(frozen=True)
class ToyErasure:
    """Settings of one erasure on the toy model (scaled-down paper settings: the toy UNet is small and fast)."""

    concept: str
    method: str = "esd-x"
    iterations: int = 200
    learning_rate: float | None = None  # None: LEARNING_RATES of the method
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 25
    sample_with: str = "trained"
    trajectory_pool: int = 0
    lora_rank: int = 0
    optimizer: str = "adam"
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else LEARNING_RATES[parse_method(self.method)]

    def config(self) -> ESDConfig:
        return ESDConfig(concepts=(self.concept,), method=self.method, iterations=self.iterations,
                         learning_rate=self.lr, negative_guidance=self.negative_guidance,
                         start_guidance=self.start_guidance, ddim_steps=self.ddim_steps,
                         sample_with=self.sample_with, trajectory_pool=self.trajectory_pool,
                         lora_rank=self.lora_rank, optimizer=self.optimizer, seed=self.seed)

    def but(self, **changes) -> "ToyErasure":
        return replace(self, **changes)

    def label(self) -> str:
        pool = f", pools of {self.trajectory_pool}" if self.trajectory_pool else ""
        pool += f", LoRA rank {self.lora_rank}" if self.lora_rank else ""
        pool += f", {self.optimizer}" if self.optimizer != "adam" else ""
        return (f"{self.method}, {self.iterations} it, lr {self.lr:g}, eta {self.negative_guidance:g}, "
                f"x_t by {self.sample_with}{pool}, DDIM {self.ddim_steps}, seed {self.seed}")


def erased_pipeline(base_pipe, erasure: ToyErasure, on_progress=None, config: ESDConfig | None = None):
    """(pipeline with the erased UNet, result). ``base_pipe`` is left untouched (its UNet is copied). ``config``
    replaces ``erasure.config()`` (e.g. that config through `esd_core.config.fast`)."""
    from .evaluate import with_unet

    pipe = with_unet(base_pipe, copy.deepcopy(base_pipe.unet))
    adapter = DiffusersSDAdapter(pipe, BaseModelInfo(name=Path(base_pipe.config.get("_name_or_path") or TOY_SD_DIR).name))
    result: ErasureResult = erase(adapter, config or erasure.config(), on_progress=on_progress, restore=False)
    return pipe, result, adapter
