"""The memory planner on ComfyUI's own UNet (nodes.comfy_model.memory_model), inside the real ComfyUI 0.3.75.

ComfyUI runs in a subprocess (plan_comfy_probe.py imports it in-process, as the server does), once with PyTorch
attention (ComfyUI's choice on CUDA) and once with its CPU default (sub-quadratic attention, which the planner runs
as basic attention). Each run loads the tiny SD1.5 and SDXL checkpoints with ComfyUI's own loader.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import ensure_checkpoint

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("attention", ["pytorch", "comfy-default"])
def test_planner_on_comfyuis_unet_matches_the_loaded_model(comfy_dir, attention):
    paths = [str(ensure_checkpoint(f, comfy_dir=comfy_dir)) for f in ("sd15", "sdxl")]
    flag = ["--pytorch-attention"] if attention == "pytorch" else []
    proc = subprocess.run(
        [sys.executable, str(HERE / "plan_comfy_probe.py"), str(comfy_dir), str(HERE.parents[1]), *flag, *paths],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2
    for r in results:
        name = Path(r["checkpoint"]).name
        # the meta copy is the loaded UNet, parameter by parameter
        assert r["meta_parameters"] == r["real_parameters"], name
        assert r["text_encoder_parameters"] == r["real_text_encoder_parameters"] > 100_000_000, name
        # checkpointing units: what ComfyUI's own training node finds
        assert {"ResBlock", "SpatialTransformer"} <= set(r["units"]), name
        assert not set(r["units"]) & {"TimestepEmbedSequential", "ModuleList", "Sequential"}, name
        # the planner's activations (meta device) are what the real forward keeps for backward, byte for byte
        assert r["planned_saved"] == r["real_saved"], name
