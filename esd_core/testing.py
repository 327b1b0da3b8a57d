"""Tiny random Stable Diffusion (SD1-style and SDXL) pipelines, built from configs: for tests and the offline demo
(no downloads).

The tokenizer is a real `CLIPTokenizer` over a byte-level vocabulary (every byte, as a word piece and as a word end),
so any text tokenizes; the models are random, so they know no concept: they prove plumbing, not erasure quality.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinyPipelineSpec:
    """Shape of a tiny pipeline. ``prediction_type`` "v_prediction" gives an SD2-style v model."""

    seed: int = 0
    sample_size: int = 8              # latent side; images are 8x larger
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    prediction_type: str = "epsilon"


def byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary: each of the 256 byte symbols, alone and as a word end, plus specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_pipeline(spec: TinyPipelineSpec = TinyPipelineSpec()):
    """A random-weight `StableDiffusionPipeline` with the given shape (in memory)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(spec.seed)
    n = len(spec.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size, in_channels=4, out_channels=4, layers_per_block=spec.layers_per_block,
        block_out_channels=spec.block_out_channels, norm_num_groups=8, cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, sample_size=spec.sample_size * 8)
    vocab = byte_level_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=spec.cross_attention_dim, intermediate_size=2 * spec.cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=spec.prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(folder: str | os.PathLike, spec: TinyPipelineSpec = TinyPipelineSpec()) -> Path:
    """Write a tiny random pipeline folder (loadable with `StableDiffusionPipeline.from_pretrained`)."""
    folder = Path(folder)
    build_tiny_pipeline(spec).save_pretrained(folder)
    return folder


def build_tiny_sdxl_pipeline(spec: TinyPipelineSpec = TinyPipelineSpec()):
    """A random-weight `StableDiffusionXLPipeline` in SDXL's layout, shrunk: a first level without attention, then
    cross-attention levels with ``transformer_layers_per_block`` 1 and 2 (SDXL: 2 and 10), two CLIP text encoders whose
    penultimate states are concatenated (context = 2 x ``cross_attention_dim / 2``), the second with a projection for
    the pooled embedding, and the text-time size conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(spec.seed)
    width = spec.cross_attention_dim // 2
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size, in_channels=4, out_channels=4, layers_per_block=spec.layers_per_block,
        block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=2 * width,
        attention_head_dim=(2, 4, 8), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width + 6 * time_dim,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, sample_size=spec.sample_size * 8)
    vocab = byte_level_vocab()
    text_config = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=width))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type=spec.prediction_type)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def save_tiny_sdxl_pipeline(folder: str | os.PathLike, spec: TinyPipelineSpec = TinyPipelineSpec()) -> Path:
    """Write a tiny random SDXL pipeline folder (loadable with `StableDiffusionXLPipeline.from_pretrained`)."""
    folder = Path(folder)
    build_tiny_sdxl_pipeline(spec).save_pretrained(folder)
    return folder


def count_forward_calls(units) -> dict[int, int]:
    """Wrap each module's ``forward`` in a counter, keyed by ``id(module)`` (gradient checkpointing then wraps the
    counter, so recomputations during backward are counted too). For tests of `esd_core.memory` on both UNets."""
    calls = {id(u): 0 for u in units}
    for unit in units:
        original = unit.forward

        def counted(*args, _original=original, _key=id(unit), **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        unit.forward = counted
    return calls
