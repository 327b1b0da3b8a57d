"""Diffusers -> LDM names, checked against diffusers' own LDM -> diffusers converter (an independent implementation)."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from esd_core.errors import ErasedWeightsError
from esd_core.keymap import diffusers_to_ldm_names

SMALL = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8, attention_head_dim=8)
LAYOUTS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd1-three-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=16,
                             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=32,
                 transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_through_diffusers_converter(layout):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SMALL, **LAYOUTS[layout])
    sd = unet.state_dict()
    to_ldm = diffusers_to_ldm_names(sd)
    assert len(set(to_ldm.values())) == len(sd)  # one-to-one
    ldm = {"model.diffusion_model." + to_ldm[k]: v for k, v in sd.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_known_sd15_names():
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8)
    m = diffusers_to_ldm_names(n for n, _ in unet.named_parameters())
    assert m["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == \
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert m["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight"] == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    assert m["mid_block.attentions.0.proj_in.weight"] == "middle_block.1.proj_in.weight"
    assert m["down_blocks.1.downsamplers.0.conv.weight"] == "input_blocks.6.0.op.weight"
    assert m["up_blocks.0.upsamplers.0.conv.bias"] == "output_blocks.2.1.conv.bias"
    assert m["up_blocks.1.upsamplers.0.conv.bias"] == "output_blocks.5.2.conv.bias"
    assert m["time_embedding.linear_2.weight"] == "time_embed.2.weight"
    assert m["conv_out.weight"] == "out.2.weight"


def test_not_a_unet_is_refused():
    with pytest.raises(ErasedWeightsError, match="not a diffusers Stable Diffusion UNet"):
        diffusers_to_ldm_names(["encoder.layer.0.weight"])
