"""Helpers shared by tests: fresh tiny random pipelines wrapped in the diffusers adapter."""
from __future__ import annotations

import torch

from esd_core.adapter import BaseModelInfo
from esd_core.diffusers_adapter import DiffusersSDAdapter
from esd_core.testing import TinyPipelineSpec, build_tiny_pipeline


def make_adapter(spec: TinyPipelineSpec = TinyPipelineSpec(), dtype: torch.dtype = torch.float32) -> DiffusersSDAdapter:
    """A fresh in-memory tiny pipeline wrapped in the diffusers adapter."""
    pipeline = build_tiny_pipeline(spec)
    if dtype != torch.float32:
        pipeline.unet.to(dtype)
        pipeline.text_encoder.to(dtype)
    return DiffusersSDAdapter(pipeline, BaseModelInfo(name=f"tiny-seed{spec.seed}"))
