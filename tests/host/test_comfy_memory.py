"""Gradient checkpointing inside ComfyUI's own UNet (whose forward calls the blocks' children through
forward_timestep_embed, never the blocks' own forward): the units really recompute and memory really falls."""
from checkpoints import ensure_checkpoint
from comfy_probe import run_probe
from comfy_server import DEFAULT_COMFY, ROOT


def test_checkpointing_recomputes_comfyuis_units_and_saves_less(comfy_dir):
    result = run_probe("checkpointing", ensure_checkpoint("sd15", comfy_dir=comfy_dir), DEFAULT_COMFY, ROOT)
    assert {"ResBlock", "SpatialTransformer"} <= set(result["units"])
    assert "TimestepEmbedSequential" not in result["units"]  # a container ComfyUI never calls
    assert result["plain"]["heavy_calls"] == [1]
    assert result["checkpointed"]["heavy_calls"] == [2]  # forward, then the recomputation in backward
    assert result["checkpointed"]["saved_bytes"] < 0.5 * result["plain"]["saved_bytes"], result
