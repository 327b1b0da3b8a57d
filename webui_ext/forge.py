"""Forge glue: a `DiffusionModelAdapter` over the UNet Forge holds in its ComfyUI-like patcher
(``shared.sd_model.forge_objects_original.unet``, the one without LoRA patches), and running work where Forge runs its
generations: holding the queue lock, on Forge's main-thread runner.

Forge's ``KModel.apply_model`` takes k-diffusion inputs, as ComfyUI's does: a variance-preserving ``x_t`` at DDPM step t
is ``x = x_t * sqrt(1 + sigma_t^2)`` at ``sigma_t = sqrt((1 - a_t) / a_t)``, and epsilon is ``(x - denoised) / sigma``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from esd_core.adapter import BaseModelInfo, Conditioning, ModelFamily, ParameterNaming
from esd_core.errors import ESDError

T = TypeVar("T")
#: Forge diffusion engine class -> (family, native resolution); SD2 v-prediction models are 768 px.
SUPPORTED_ENGINES = {"StableDiffusion": (ModelFamily.SD1, 512), "StableDiffusion2": (ModelFamily.SD2, 512),
                     "StableDiffusionXL": (ModelFamily.SDXL, 1024)}


def model_family(sd_model) -> tuple[ModelFamily, int]:
    name = type(sd_model).__name__
    if name not in SUPPORTED_ENGINES or getattr(sd_model, "is_inpaint", False):
        raise ESDError(f"ESD supports Stable Diffusion 1.x, 2.x and SDXL text-to-image models; the loaded checkpoint "
                       f"is {name}{' (inpainting)' if getattr(sd_model, 'is_inpaint', False) else ''}. "
                       "Load an SD1.5, SD2.x or SDXL checkpoint")
    family, native = SUPPORTED_ENGINES[name]
    predictor = sd_model.forge_objects_original.unet.model.predictor
    if family == ModelFamily.SD2 and getattr(predictor, "prediction_type", "") == "v_prediction":
        native = 768
    return family, native


def base_info(sd_model) -> BaseModelInfo:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "title", None) or "unknown checkpoint"
    return BaseModelInfo(name=name, file_hash=getattr(info, "sha256", None) or "")


class ForgeAdapter:
    """`DiffusionModelAdapter` over Forge's UNet (LDM names) and its text processing."""

    naming = ParameterNaming.LDM
    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, sd_model, autocast_dtype: torch.dtype | None = None):
        self.sd_model = sd_model
        self.autocast_dtype = autocast_dtype
        self.family, self.native_resolution = model_family(sd_model)
        self.model = sd_model.forge_objects_original.unet.model  # KModel: diffusion_model + predictor
        self.unet = self.model.diffusion_model
        first = next(self.unet.parameters())
        self.device = first.device
        # the compute dtype: autocast's when asked for (the trainer enables fp16 loss scaling from it)
        self.dtype = autocast_dtype or self.model.computation_dtype
        self.sigmas = self.model.predictor.sigmas.detach().float().to(self.device)
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas ** 2)
        self.base = base_info(sd_model)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        cond = self.sd_model.get_learned_conditioning(list(prompts))  # made under inference mode: clone outside it
        if isinstance(cond, dict):  # SDXL: cross-attention tokens and the pooled/size vector (Forge's ``y``)
            return Conditioning(context=cond["crossattn"].clone().to(self.device),
                                extras={"y": cond["vector"].clone().to(self.device)})
        return Conditioning(context=cond.clone().to(self.device))

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = self.sigmas[timesteps]
        x = latents.float() * (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            denoised = self.model.apply_model(x, sigma, c_crossattn=cond.context, **cond.extras)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)


def make_adapter(autocast_dtype: torch.dtype | None = None) -> ForgeAdapter:
    from backend import memory_management
    from modules import shared

    sd_model = shared.sd_model
    model_family(sd_model)
    # Loading the patcher without LoRAs puts the checkpoint's own weights back where a LoRA was merged in, and the
    # whole UNet on the compute device.
    memory_management.load_model_gpu(sd_model.forge_objects_original.unet)
    return ForgeAdapter(sd_model, autocast_dtype)


def check_model() -> None:
    from modules import shared

    model_family(shared.sd_model)


@contextlib.contextmanager
def training_context(adapter: ForgeAdapter) -> Iterator[None]:
    """Make Forge's UNet trainable for the duration: its transformer blocks add residuals in place (``x += n``) onto
    the tensor a LayerNorm saved for backward, which autograd refuses, so in passes with gradients each LayerNorm
    gets a copy of its input. Sampling and teacher passes (no gradients) are untouched."""

    def copy_input(_module, args):
        return (args[0].clone(), *args[1:]) if torch.is_grad_enabled() else None

    handles = [m.register_forward_pre_hook(copy_input) for m in adapter.unet.modules()
               if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Outcome:
    value: object = None
    error: BaseException | None = None


def run_queued(work: Callable[[], T]) -> T:
    """Run ``work`` holding the queue lock, on Forge's main thread (where its generations move models)."""
    from modules import call_queue
    from modules_forge import main_thread

    def captured() -> _Outcome:  # the runner prints and swallows exceptions: carry them back instead
        try:
            return _Outcome(value=work())
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            return _Outcome(error=e)

    with call_queue.queue_lock:
        outcome = main_thread.run_and_wait_result(captured)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value
