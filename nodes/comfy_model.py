"""ComfyUI glue, model side: a `DiffusionModelAdapter` over a ModelPatcher and its CLIP, loading checkpoints with
their provenance, and preparing a model for training. Every ComfyUI model import of the pack lives here."""
from __future__ import annotations

import hashlib
import math
import os
from typing import Sequence

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import folder_paths

from ..esd_core.adapter import BaseModelInfo, Conditioning, ModelFamily, ParameterNaming
from ..esd_core.errors import ESDError

#: ComfyUI model config class -> (family, native resolution in pixels)
SUPPORTED_MODELS = {"SD15": (ModelFamily.SD1, 512), "SD20": (ModelFamily.SD2, 768), "SDXL": (ModelFamily.SDXL, 1024)}
#: where LoadFrozenUNet records a model's provenance (on the BaseModel, shared by clones: it describes the weights).
BASE_INFO_ATTR = "esd_base_info"


def supported_model(patcher) -> tuple[ModelFamily, int]:
    """Family and native resolution of a MODEL, or an `ESDError` naming the supported families."""
    name = type(patcher.model.model_config).__name__
    if name not in SUPPORTED_MODELS or not isinstance(patcher.model.model_sampling,
                                                       comfy.model_sampling.ModelSamplingDiscrete):
        raise ESDError(f"ESD supports Stable Diffusion 1.x, 2.x and SDXL UNets; this MODEL is {name}. "
                       "Load an SD1.5, SD2.x or SDXL checkpoint")
    family, native = SUPPORTED_MODELS[name]
    if family == ModelFamily.SD2 and patcher.model.model_type != comfy.model_base.ModelType.V_PREDICTION:
        native = 512  # SD2 base (epsilon) is a 512 px model; the v-prediction model is 768 px
    return family, native


class ComfyModelAdapter:
    """`DiffusionModelAdapter` over a ComfyUI ModelPatcher (LDM names) and the CLIP wired into the node.

    Noise predictions go through the model's own ``apply_model``, so ``model_sampling`` does the input scaling and
    the epsilon/v parameterisation: a variance-preserving ``x_t`` at DDPM step t is ComfyUI's ``x = x_t / sqrt(a_t)``
    at ``sigma_t = sqrt((1 - a_t) / a_t)``, and epsilon is ``(x - denoised) / sigma``.
    """

    naming = ParameterNaming.LDM

    def __init__(self, patcher, clip, resolution: int = 0, autocast_dtype: torch.dtype | None = None):
        self.patcher = patcher
        self.clip = clip
        self.model = patcher.model
        self.unet = self.model.diffusion_model
        self.family, self.native_resolution = supported_model(patcher)
        self.resolution = resolution or self.native_resolution
        self.device = comfy.model_management.get_torch_device()
        # The compute dtype (the trainer enables fp16 loss scaling from it): the one asked for, else the model's own.
        # Anything but float32 runs under autocast, which also casts the float32 tensors being trained.
        self.dtype = autocast_dtype or self.model.manual_cast_dtype or self.model.get_dtype()
        self.autocast_dtype = self.dtype if self.dtype != torch.float32 else None
        # get_model_object honours a ModelSamplingDiscrete node's patch (e.g. v-prediction or zsnr overrides)
        self.sigmas = patcher.get_model_object("model_sampling").sigmas.float().to(self.device)
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas ** 2)
        self.latent_channels = int(self.model.latent_format.latent_channels)
        self.vae_scale_factor = 8
        self.base = base_info(patcher)
        self._prepared = False

    def prepare_for_training(self) -> None:
        """Once: the node may load the model itself earlier (for the preview before training)."""
        if not self._prepared:
            prepare_for_training(self.patcher)
            self._prepared = True

    def memory_model(self):
        return memory_model(self.patcher, self.clip)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        contexts, pooled = [], []
        for text in prompts:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            contexts.append(cond.clone())  # clone: tensors made under ComfyUI's inference mode cannot join autograd
            pooled.append(None if pool is None else pool.clone())
        context = _same_length(contexts).to(self.device)
        extras = {}
        if self.family == ModelFamily.SDXL:
            side = self.resolution
            y = [self.model.encode_adm(pooled_output=p, width=side, height=side, crop_w=0, crop_h=0,
                                       target_width=side, target_height=side) for p in pooled]
            extras["y"] = torch.cat(y).to(self.device)
        return Conditioning(context=context, extras=extras)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = self.sigmas[timesteps]
        scale = (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        x = latents.float() * scale
        # no cast cache: it would hold a low-precision copy of every trained weight for the whole forward
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            denoised = self.model.apply_model(x, sigma, c_crossattn=cond.context, **cond.extras)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)


def _same_length(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack token sequences; prompts past 77 tokens get longer ones, so repeat each to a common length as ComfyUI's
    own conditioning batching does."""
    lengths = [c.shape[1] for c in contexts]
    common = math.lcm(*lengths)
    return torch.cat([c.repeat(1, common // c.shape[1], 1) for c in contexts])


_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, computed once per (path, size, mtime) and remembered for the server's lifetime."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def load_checkpoint(ckpt_name: str):
    """(MODEL, CLIP, VAE) of a checkpoint, with the file's name and hash recorded on the model."""
    path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    setattr(model.model, BASE_INFO_ATTR, BaseModelInfo(name=ckpt_name, file_hash=file_sha256(path)))
    return model, clip, vae


def base_info(patcher) -> BaseModelInfo:
    return getattr(patcher.model, BASE_INFO_ATTR, None) or BaseModelInfo(
        name="unknown (loaded without ESD Load Frozen UNet)")


def unpatched_weights(patcher, names) -> dict[str, torch.Tensor]:
    """The checkpoint's own values of UNet parameters (LDM names), even while ComfyUI has patches applied."""
    params = dict(patcher.model.diffusion_model.named_parameters())
    out = {}
    for n in names:
        backup = patcher.backup.get(f"diffusion_model.{n}")
        out[n] = backup.weight if backup is not None else params[n].data
    return out


def prepare_for_training(patcher) -> None:
    """Load the model fully onto the compute device (evicting every other model, the text encoder included: prompts
    are encoded before this), as ComfyUI's own training node does."""
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)


#: What ComfyUI's Cancel raises inside a node.
Interrupted = comfy.model_management.InterruptProcessingException


def raise_if_interrupted() -> bool:
    """Cancel check for the trainer: ComfyUI's Cancel raises its own interrupt exception (never returns True)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def checkpoint_files() -> list[str]:
    """Checkpoints as ComfyUI's loaders list them."""
    return folder_paths.get_filename_list("checkpoints")


def memory_model(patcher, clip=None):
    """The memory planner's view of a MODEL (`esd_core.plan.MemoryModel`): ComfyUI's own UNet class rebuilt from the
    model's config on the meta device (structurally identical, no memory), called as ``apply_model`` calls it.

    ComfyUI's split and sub-quadratic attention (its CPU choice) ask the device for free memory, which the meta device
    cannot answer; the plan runs them as ComfyUI's basic attention, which keeps the same softmax for backward (the
    sampling forward, chunked in reality, is then over-estimated). PyTorch attention (ComfyUI's CUDA choice) is
    planned as it runs.
    """
    import comfy.ldm.modules.attention as attention
    import comfy.ops

    from ..esd_core.memory import checkpoint_units
    from ..esd_core.plan import MemoryModel

    _, native = supported_model(patcher)
    config = patcher.model.model_config.unet_config
    unet = type(patcher.model.diffusion_model)(**config, device="meta", operations=comfy.ops.disable_weight_init)
    context_dim, adm_channels = config["context_dim"], config.get("adm_in_channels")
    # the override receives the undecorated attention function (comfy's wrap_attn)
    needs_free_memory = {attention.attention_split.__wrapped__, attention.attention_sub_quad.__wrapped__}

    def runs_on_meta(chosen, *args, **kwargs):
        return (attention.attention_basic.__wrapped__ if chosen in needs_free_memory else chosen)(*args, **kwargs)

    def forward(module, batch: int, side: int) -> torch.Tensor:
        meta = dict(device="meta")
        y = torch.empty(batch, adm_channels, **meta) if adm_channels else None
        return module(torch.empty(batch, module.in_channels, side, side, **meta), torch.full((batch,), 500.0, **meta),
                      context=torch.empty(batch, 77, context_dim, **meta), y=y,
                      transformer_options={"optimized_attention_override": runs_on_meta})

    text = 0 if clip is None else sum(p.numel() for p in clip.cond_stage_model.parameters())
    return MemoryModel(unet, forward, checkpoint_units, native, latent_channels=unet.in_channels,
                       text_encoder_parameters=text,
                       label=type(patcher.model.model_config).__name__)
