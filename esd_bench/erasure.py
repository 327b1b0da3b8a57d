"""ESD on the toy model: one erasure = one `esd_core` run on a fresh copy of the committed toy pipeline."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from esd_core.adapter import BaseModelInfo
from esd_core.config import ESDConfig
from esd_core.diffusers_adapter import DiffusersSDAdapter
from esd_core.trainer import ErasureResult, erase

from . import TOY_SD_DIR


@dataclass(frozen=True)
class ToyErasure:
    """Settings of one erasure on the toy model (scaled-down paper settings: the toy UNet is small and fast).

    Learning rate measured on the first training cycle's toy (200 iterations, n=8 per prompt): ESD-x on "a striped background"
    moved its rate 88% -> 75% at 1e-4 and 88% -> 12% at 5e-4 (other styles: 3 points); ESD-u on "a circle"
    100% -> 75% at 1e-4 and 100% -> 12% at 5e-4. The paper's 1e-5 is for SD's 860M-parameter UNet.
    """

    concept: str
    method: str = "esd-x"
    iterations: int = 200
    learning_rate: float = 5e-4
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 25
    sample_with: str = "trained"
    seed: int = 0

    def config(self) -> ESDConfig:
        return ESDConfig(concepts=(self.concept,), method=self.method, iterations=self.iterations,
                         learning_rate=self.learning_rate, negative_guidance=self.negative_guidance,
                         start_guidance=self.start_guidance, ddim_steps=self.ddim_steps,
                         sample_with=self.sample_with, seed=self.seed)

    def but(self, **changes) -> "ToyErasure":
        return replace(self, **changes)

    def label(self) -> str:
        return (f"{self.method}, {self.iterations} it, lr {self.learning_rate:g}, eta {self.negative_guidance:g}, "
                f"x_t by {self.sample_with}, seed {self.seed}")


def erased_pipeline(base_pipe, erasure: ToyErasure, on_progress=None):
    """(pipeline with the erased UNet, result). ``base_pipe`` is left untouched (its UNet is copied)."""
    from .evaluate import with_unet

    pipe = with_unet(base_pipe, copy.deepcopy(base_pipe.unet))
    adapter = DiffusersSDAdapter(pipe, BaseModelInfo(name=Path(base_pipe.config.get("_name_or_path") or TOY_SD_DIR).name))
    result: ErasureResult = erase(adapter, erasure.config(), on_progress=on_progress, restore=False)
    return pipe, result, adapter
