"""The real Stable Diffusion 1.5 and SDXL UNet architectures, built on the meta device (shapes, no weights, no
download) from their published diffusers configs, for figures that depend only on shapes (file sizes, key checks)."""
from __future__ import annotations

import torch

#: ``unet/config.json`` of runwayml/stable-diffusion-v1-5 (the fields that decide shapes).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)

#: ``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0 (the fields that decide shapes).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)

ARCHITECTURES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def meta_unet(name: str):
    """The diffusers ``UNet2DConditionModel`` of ``name`` ("sd15" | "sdxl") with meta tensors (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**ARCHITECTURES[name])


def ldm_shapes(name: str) -> dict[str, torch.Size]:
    """LDM parameter name -> shape of the architecture's UNet (diffusers names converted by `esd_core.keymap`)."""
    from esd_core.keymap import diffusers_to_ldm_names

    params = dict(meta_unet(name).named_parameters())
    return {ldm: params[n].shape for n, ldm in diffusers_to_ldm_names(params).items()}
