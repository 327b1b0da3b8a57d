"""Shared fixtures: tiny random Stable Diffusion pipelines built from configs (no downloads), one torch thread."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from esd_core.diffusers_adapter import DiffusersSDAdapter  # noqa: E402
from esd_core.testing import TinyPipelineSpec, save_tiny_pipeline  # noqa: E402
from tiny import make_adapter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random SD pipeline folder, written once per session (tests must not modify it)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny_sd", TinyPipelineSpec(seed=0))


@pytest.fixture
def tiny_adapter() -> DiffusersSDAdapter:
    return make_adapter()
