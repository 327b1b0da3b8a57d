"""AUTOMATIC1111 glue: a `DiffusionModelAdapter` over the loaded model (Stability's ``LatentDiffusion`` for SD1.x/SD2.x,
``sgm``'s ``DiffusionEngine`` for SDXL, both with A1111's ``apply_model`` / ``get_learned_conditioning``), and running
work in A1111's job queue (``call_queue.queue_lock``, the lock txt2img holds).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Sequence, TypeVar

import torch

from esd_core.adapter import BaseModelInfo, Conditioning, ModelFamily, ParameterNaming, PredictionType
from esd_core.errors import ESDError
from esd_core.sampling import epsilon_from_prediction

T = TypeVar("T")


def model_family(sd_model) -> tuple[ModelFamily, int, PredictionType]:
    """Family, native resolution and parameterisation of A1111's loaded model; other models are an `ESDError`."""
    prediction = PredictionType.V_PREDICTION if getattr(sd_model, "parameterization", "eps") == "v" \
        else PredictionType.EPSILON
    # text-to-image UNets take the 4 latent channels alone (inpainting and depth models take more)
    in_channels = getattr(getattr(getattr(sd_model, "model", None), "diffusion_model", None), "in_channels", None)
    if in_channels == 4:
        if getattr(sd_model, "is_sdxl", False):
            return ModelFamily.SDXL, 1024, prediction
        if getattr(sd_model, "is_sd2", False):
            return ModelFamily.SD2, 768 if prediction == PredictionType.V_PREDICTION else 512, prediction
        if getattr(sd_model, "is_sd1", False):
            return ModelFamily.SD1, 512, prediction
    raise ESDError(f"ESD supports Stable Diffusion 1.x, 2.x and SDXL text-to-image models; the loaded checkpoint "
                   f"({checkpoint_name(sd_model)}) is none of these. Load an SD1.5, SD2.x or SDXL checkpoint")


def checkpoint_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return getattr(info, "name_for_extra", None) or getattr(info, "title", None) or "unknown checkpoint"


def base_info(sd_model) -> BaseModelInfo:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return BaseModelInfo(name=checkpoint_name(sd_model), file_hash=getattr(info, "sha256", None) or "")


class A1111Adapter:
    """`DiffusionModelAdapter` over A1111's ``shared.sd_model``: the UNet is ``model.diffusion_model`` (LDM names),
    predictions go through the model's own ``apply_model`` at integer DDPM timesteps."""

    naming = ParameterNaming.LDM
    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, sd_model, autocast_dtype: torch.dtype | None = None):
        self.sd_model = sd_model
        self.autocast_dtype = autocast_dtype
        self.family, self.native_resolution, self.prediction_type = model_family(sd_model)
        self.unet = sd_model.model.diffusion_model
        first = next(self.unet.parameters())
        # the compute dtype: autocast's when asked for (the trainer enables fp16 loss scaling from it)
        self.device, self.dtype = first.device, autocast_dtype or first.dtype
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().float().to(self.device)
        self.base = base_info(sd_model)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        # one call for the whole batch: A1111 pads every prompt to the same number of 75-token chunks
        cond = self.sd_model.get_learned_conditioning(list(prompts))
        if isinstance(cond, dict):  # SDXL: cross-attention tokens and the pooled/size vector
            return Conditioning(context=cond["crossattn"].clone().to(self.device),
                                extras={"vector": cond["vector"].clone().to(self.device)})
        return Conditioning(context=cond.clone().to(self.device))

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = {"crossattn": cond.context, **cond.extras} if cond.extras else cond.context
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.sd_model.apply_model(latents.to(next(self.unet.parameters()).dtype), timesteps, c)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return epsilon_from_prediction(out.float(), latents.float(), alpha, self.prediction_type)


@torch.no_grad()  # A1111 restores by copy_ into parameters, which autograd forbids on ones that require grad
def unpatch_networks(sd_model) -> None:
    """Put back the checkpoint's own weights where A1111's Lora extension left a LoRA merged in (it restores them
    lazily at the next generation), so training starts from the base and the Lora hooks stay idle meanwhile."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_restore_weights_from_backup"):
        return
    networks.loaded_networks.clear()
    for module in sd_model.modules():
        if getattr(module, "network_current_names", ()):
            networks.network_restore_weights_from_backup(module)
            module.network_current_names = ()


def make_adapter(autocast_dtype: torch.dtype | None = None) -> A1111Adapter:
    from modules import shared

    sd_model = shared.sd_model
    if getattr(sd_model, "lowvram", False):
        raise ESDError("ESD training needs the whole model on the device; restart the web UI without "
                       "--lowvram/--medvram to erase concepts")
    unpatch_networks(sd_model)
    return A1111Adapter(sd_model, autocast_dtype)


def check_model() -> None:
    """Refuse now, before queueing, a loaded model ESD cannot train."""
    from modules import shared

    model_family(shared.sd_model)


def training_context(adapter: A1111Adapter) -> contextlib.AbstractContextManager:
    """Nothing to prepare: Stability's UNets train as they are."""
    return contextlib.nullcontext()


def run_queued(work: Callable[[], T]) -> T:
    """Run ``work`` holding A1111's queue lock: after the generation in progress, before the next."""
    from modules import call_queue

    with call_queue.queue_lock:
        return work()
