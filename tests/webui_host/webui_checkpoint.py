"""The SD1.5 checkpoint the A1111 and Forge host tests load: tests/host/checkpoints.py's ``sd15_kl`` (a 25.8M UNet with
one resolution level, CLIP-L and SD's KL VAE, random weights, built once and cached), placed in a server's
models/Stable-diffusion folder.

Forge reads the UNet's shape from the weights. A1111 builds every SD1 model from configs/v1-inference.yaml, so the
file gets a sidecar ``<name>.yaml`` (A1111's own per-checkpoint config): the host's v1-inference.yaml with this UNet's
shape.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from checkpoints import checkpoint_path, ensure_checkpoint  # noqa: E402

FAMILY = "sd15_kl"
NAME = "tiny_sd15"
#: ldm UNetModel arguments of the sd15_kl UNet (checkpoints.FAMILIES): one level, one res block, attention at it.
UNET_SHAPE = {"channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [1], "transformer_depth": 1}
#: The same UNet's parameter names (LDM), for files that change its cross-attention.
ATTN2_MODULES = ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1")


def sidecar_config(webui: Path) -> str:
    """The host's v1-inference.yaml with the test UNet's shape (A1111 reads ``<checkpoint>.yaml`` beside a file)."""
    config = yaml.safe_load((webui / "configs" / "v1-inference.yaml").read_text())
    config["model"]["params"]["unet_config"]["params"].update(UNET_SHAPE)
    return yaml.safe_dump(config, sort_keys=False)


def place_checkpoint(checkpoints_dir: Path, webui: Path, with_sidecar: bool) -> Path:
    """Link the cached checkpoint into ``checkpoints_dir`` (building it on first use); returns the link."""
    cached = ensure_checkpoint(FAMILY)
    link = checkpoints_dir / f"{NAME}.safetensors"
    if not link.exists():
        link.symlink_to(cached)
    if with_sidecar:
        (checkpoints_dir / f"{NAME}.yaml").write_text(sidecar_config(webui))
    return link


def cached_checkpoint() -> Path:
    return checkpoint_path(FAMILY)
