"""The Stable Diffusion families' real UNets and text encoders, as configs: buildable on the meta device, never
downloaded.

The UNet configs are the ``unet/config.json`` of the released diffusers models (SD1.5:
``stable-diffusion-v1-5/stable-diffusion-v1-5``; SD2.1: ``stabilityai/stable-diffusion-2-1``, the 768 px v-model;
SDXL: ``stabilityai/stable-diffusion-xl-base-1.0``), keeping the keys that shape the network. The text encoders are
CLIP ViT-L/14 (SD1.x, and SDXL's first), OpenCLIP ViT-H/14 (SD2.x) and OpenCLIP ViT-bigG/14 with its projection
(SDXL's second), as ``transformers.CLIPTextConfig`` arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapter import ModelFamily

_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
)
_COMMON = dict(act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
               in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
               norm_num_groups=32)

SD15_UNET: dict[str, Any] = {**_COMMON, **_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768,
                             "sample_size": 64}
SD21_UNET: dict[str, Any] = {**_COMMON, **_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20],
                             "cross_attention_dim": 1024, "sample_size": 96, "use_linear_projection": True,
                             "upcast_attention": True}
SDXL_UNET: dict[str, Any] = {
    **_COMMON,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}

_CLIP_L = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                 projection_dim=768))
_OPENCLIP_H = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                     projection_dim=512))
_OPENCLIP_BIGG = ("CLIPTextModelWithProjection",
                  dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))


@dataclass(frozen=True)
class Architecture:
    """One family's UNet and text encoders."""

    family: ModelFamily
    label: str
    unet_config: dict[str, Any]
    text_encoders: tuple[tuple[str, dict[str, Any]], ...]  # (transformers class name, CLIPTextConfig arguments)
    native_resolution: int  # pixels

    def meta_unet(self) -> torch.nn.Module:
        """The diffusers ``UNet2DConditionModel`` on the meta device (float32 shapes, no memory)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel(**self.unet_config)

    def text_encoder_parameters(self) -> int:
        """Parameter count of all text encoders (built on the meta device)."""
        import transformers

        total = 0
        for class_name, config in self.text_encoders:
            with torch.device("meta"):
                model = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
            total += sum(p.numel() for p in model.parameters())
        return total


ARCHITECTURES: dict[ModelFamily, Architecture] = {
    ModelFamily.SD1: Architecture(ModelFamily.SD1, "SD1.5", SD15_UNET, (_CLIP_L,), 512),
    ModelFamily.SD2: Architecture(ModelFamily.SD2, "SD2.1", SD21_UNET, (_OPENCLIP_H,), 768),
    ModelFamily.SDXL: Architecture(ModelFamily.SDXL, "SDXL", SDXL_UNET, (_CLIP_L, _OPENCLIP_BIGG), 1024),
}
