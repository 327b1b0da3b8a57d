"""The toy pipeline embedded in SD1.5 shapes (esd_bench.comfy_toy) computes exactly what the toy computes.

Checked on a randomly initialised toy (norm and bias parameters randomised too, so that no default value hides a
layout mistake) against the big diffusers models loaded with the expanded weights; the host tests check that
ComfyUI detects and runs the written checkpoint.
"""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from esd_bench import comfy_toy as ct
from esd_bench import train_toy as tt


def test_replica_layout_keeps_every_group_to_one_toy_group_with_equal_copies():
    layout = ct.replica_layout(16, 128, 8, 32)  # the VAE's first level: 8 toy groups of 2 into 32 groups of 4
    groups = layout.view(32, 4)
    for g, members in enumerate(groups):
        assert set(members.tolist()) == {2 * (g // 4), 2 * (g // 4) + 1}
        assert torch.bincount(members).max() == 2
    assert torch.equal(ct.replica_layout(32, 320, 32, 32), torch.arange(320) // 10)  # equal group counts: blocks
    with pytest.raises(ValueError):
        ct.replica_layout(48, 320, 16, 32)  # 320 is not a whole number of copies of 48
    with pytest.raises(ValueError):
        ct.replica_layout(4, 8, 1, 4)  # a big group of 2 channels cannot hold a toy group of 4


def test_head_and_sinusoid_layouts():
    heads = ct.head_layout(2, 32, 8, 80).view(8, 80)
    assert torch.equal(heads[0, :32], torch.arange(32)) and (heads[0, 32:] == -1).all()
    assert torch.equal(heads[7, :32], torch.arange(32, 64))
    sin = ct.sinusoid_layout(32, 320)
    assert sin[0] == 0 and sin[10] == 1 and sin[160] == 16 and sin[170] == 17 and (sin >= 0).sum() == 32


@pytest.fixture(scope="module")
def random_toy():
    torch.manual_seed(0)
    tokenizer = tt.load_tokenizer()
    text_cfg = tt.TextEncoderConfig()
    unet = tt.build_unet(tt.UNetConfig(), text_cfg.hidden_size, 4, 16).eval()
    text = tt.build_text_encoder(text_cfg, tokenizer).eval()
    vae = tt.build_vae(tt.VAEConfig()).eval()
    vae.register_to_config(scaling_factor=0.45)
    with torch.no_grad():
        for model in (unet, text, vae):
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.3)
    return tokenizer, unet, text, vae


@pytest.fixture(scope="module")
def big_models(random_toy):
    _, unet, text, vae = random_toy
    big_unet_state, big_text_state, big_vae_state = ct.expand_pipeline(unet, text, vae)
    big_unet = UNet2DConditionModel(**ct.unet_big_config(dict(unet.config))).eval()
    big_unet.load_state_dict(big_unet_state)
    big_text = CLIPTextModel(CLIPTextConfig(**ct.CLIP_L, bos_token_id=text.config.bos_token_id,
                                            eos_token_id=text.config.eos_token_id,
                                            pad_token_id=text.config.pad_token_id)).eval()
    missing, unexpected = big_text.load_state_dict(big_text_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    big_vae = AutoencoderKL(**ct.vae_big_config(dict(vae.config))).eval()
    big_vae.load_state_dict(big_vae_state)
    return big_unet, big_text, big_vae


@torch.no_grad()
def test_embedded_models_compute_the_toy(random_toy, big_models):
    tokenizer, unet, text, vae = random_toy
    big_unet, big_text, big_vae = big_models
    # the SD1.5 shapes ComfyUI detects
    assert big_unet.config.block_out_channels[0] == 320 and big_unet.config.cross_attention_dim == 768
    assert big_text.config.num_hidden_layers == 12 and big_text.config.hidden_size == 768

    ids = tokenizer(["a red circle on a striped background", "a star"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    toy_context = text(ids)[0]
    big_context = big_text(ids)[0]
    layout = ct.text_layout(text.config.hidden_size)
    torch.testing.assert_close(big_context, toy_context[..., layout], atol=1e-4, rtol=1e-4)

    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    toy_eps = unet(latents, t, encoder_hidden_states=toy_context).sample
    big_eps = big_unet(latents, t, encoder_hidden_states=big_context).sample
    assert toy_eps.abs().max() > 0.1
    torch.testing.assert_close(big_eps, toy_eps, atol=1e-4, rtol=1e-4)
    other = unet(latents, t, encoder_hidden_states=text(ids.flip(0))[0]).sample
    assert (other - toy_eps).abs().max() > 1e-2  # the prompt matters, so the context check above is meaningful

    gain = vae.config.scaling_factor / ct.SD15_LATENT_SCALE
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(big_vae.encode(images).latent_dist.mean, vae.encode(images).latent_dist.mean * gain,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(big_vae.decode(latents * gain).sample, vae.decode(latents).sample,
                               atol=1e-4, rtol=1e-4)


def test_ldm_names_match_a_single_file_sd_checkpoint(random_toy):
    """VAE names are the LDM ones ComfyUI and A1111 load (spot checks of each kind of layer)."""
    _, unet, text, vae = random_toy
    names = {ct.vae_ldm_name(n, 3) for n in ct.build_big_models(unet, text, vae)[2].state_dict()}
    for expected in ("encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                     "encoder.down.1.downsample.conv.weight", "encoder.mid.attn_1.q.weight", "encoder.norm_out.bias",
                     "decoder.up.2.block.2.conv1.weight", "decoder.up.2.upsample.conv.weight",
                     "decoder.up.0.block.0.nin_shortcut.weight", "decoder.mid.block_2.norm1.weight",
                     "quant_conv.weight", "post_quant_conv.bias"):
        assert expected in names, expected
    assert "encoder.down.2.downsample.conv.weight" not in names  # what makes ComfyUI pick the f=4 VAE


def test_a_toy_with_other_group_counts_is_refused(random_toy):
    _, unet, text, vae = random_toy
    config = dict(unet.config)
    config["norm_num_groups"] = 16
    other = UNet2DConditionModel(**config)
    with pytest.raises(ValueError, match="GroupNorm groups"):
        ct.expand_pipeline(other, text, vae)
