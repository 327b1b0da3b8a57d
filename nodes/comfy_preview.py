"""ComfyUI glue, preview side: ESD Erase Concept's live preview (its ``preview_every`` input).

The concept prompt is sampled at a fixed seed with a few guided DDIM steps (`esd_core.sampling.guided_ddim`) at a
small size through the adapter being trained, so each preview shows the weights as they are at that moment; the
latent is decoded with the VAE when one is wired, else with ComfyUI's latent previewer (what KSampler shows: TAESD
when the server runs with ``--preview-method taesd``, otherwise its Latent2RGB approximation, which needs no VAE).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from PIL import Image

import comfy.model_management
import latent_preview

from ..esd_core.sampling import ddim_timesteps, guided_ddim
from ..esd_core.trainer import latent_shape

log = logging.getLogger("esd")
PREVIEW_STEPS = 10
PREVIEW_GUIDANCE = 7.5
PREVIEW_MIN_SIDE = 256  # pixels: smaller, SD models draw little that can be recognised


def preview_side(resolution: int) -> int:
    """Half the training resolution, but at least `PREVIEW_MIN_SIDE` (and never more than the training size), in
    whole latent pixels: SD1.5 512 -> 256, SDXL 1024 -> 512, a 64 px test model -> 64."""
    return min(resolution, max(resolution // 2, PREVIEW_MIN_SIDE)) // 8 * 8


class LivePreview:
    """() -> PIL image of the concept as the adapter's current weights draw it. Same noise every time; its own
    generator, so training draws exactly the random numbers it would without previews."""

    def __init__(self, adapter, concept: str, seed: int, vae=None):
        """Encodes the prompts now: create it before the UNet is loaded for training (which evicts the text
        encoder)."""
        self.adapter, self.vae = adapter, vae
        encoded = adapter.encode_prompts(["", concept])
        self.uncond, self.cond = encoded.row(0), encoded.row(1)
        self.shape = latent_shape(adapter, preview_side(adapter.resolution))
        self.noise = torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(seed))
        self.timesteps = ddim_timesteps(len(adapter.alphas_cumprod), PREVIEW_STEPS)
        self.decode: Callable[[torch.Tensor], Image.Image] | None = None

    @torch.no_grad()
    def __call__(self) -> Image.Image:
        if self.decode is None:  # chosen once the training model is loaded: whether the VAE fits depends on it
            self.decode = _decoder(self.adapter, self.vae, self.shape)
        x0 = guided_ddim(self.adapter.predict_noise, self.noise.to(self.adapter.device), self.uncond, self.cond,
                         self.adapter.alphas_cumprod, self.timesteps, PREVIEW_STEPS, PREVIEW_GUIDANCE)
        return self.decode(x0)


def _decoder(adapter, vae, shape) -> Callable[[torch.Tensor], Image.Image]:
    """The VAE's decode when it is wired and fits beside the model being trained, else ComfyUI's latent previewer."""
    if vae is not None:
        if _vae_fits(vae, shape):
            return lambda x0: _to_image(vae.decode(adapter.model.process_latent_out(x0))[0])
        log.warning("ESD preview: the VAE does not fit in free GPU memory beside the model being trained; "
                    "previews use ComfyUI's latent previewer instead")
    latent_format = adapter.model.latent_format
    previewer = latent_preview.get_previewer(adapter.device, latent_format) or latent_preview.Latent2RGBPreviewer(
        latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias,
        latent_format.latent_rgb_factors_reshape)
    return lambda x0: previewer.decode_latent_to_preview(x0.float()).convert("RGB")


def _vae_fits(vae, shape) -> bool:
    """Whether decoding cannot make ComfyUI unload the model being trained. Loading the VAE frees memory, unloading
    other models, unless what is free covers the VAE's unloaded weights (x1.1) and the larger of the minimum inference
    memory and the decode's estimate (the rule of ``comfy.model_management.load_models_gpu``)."""
    mm = comfy.model_management
    if mm.is_device_cpu(vae.device):
        return True
    weights = vae.patcher.model_size() - vae.patcher.loaded_size()
    work = max(mm.minimum_inference_memory(), vae.memory_used_decode(shape, vae.vae_dtype) + mm.extra_reserved_memory())
    return mm.get_free_memory(vae.device) > weights * 1.1 + work


def _to_image(pixels: torch.Tensor) -> Image.Image:
    """(H, W, 3) floats in [0, 1] -> PIL."""
    return Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().cpu().numpy())
