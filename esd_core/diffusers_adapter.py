"""Adapters for Stable Diffusion 1.x/2.x and SDXL pipelines stored as local diffusers folders (the command line's
models): `DiffusersSDAdapter` and `DiffusersSDXLAdapter`; `adapter_from_folder` picks the one a folder needs.

Never downloads: a path that is not a complete local pipeline folder is a `ModelLoadError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from .adapter import BaseModelInfo, Conditioning, ModelFamily, ParameterNaming, PredictionType
from .errors import ModelLoadError
from .sampling import epsilon_from_prediction

REQUIRED_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def check_pipeline_folder(folder: str | os.PathLike, parts: Sequence[str] = REQUIRED_PARTS) -> Path:
    """The folder as a Path if it holds a diffusers Stable Diffusion pipeline, else a `ModelLoadError` saying why."""
    path = Path(folder)
    if not path.is_dir():
        hint = (" It looks like a model hub id: this tool never downloads; fetch the pipeline once with "
                "diffusers' save_pretrained and pass that folder." if "/" in str(folder) and not path.exists() else "")
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist or is not a folder.{hint}")
    missing = [p for p in ("model_index.json", *parts) if not (path / p).exists()]
    if missing:
        raise ModelLoadError(f"{path} is not a diffusers Stable Diffusion pipeline folder: missing {', '.join(missing)}")
    return path


def folder_hash(folder: Path) -> str:
    """sha256 over the UNet folder's files (names and contents), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in (folder / "unet").rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_pipeline(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local StableDiffusionPipeline (no safety checker), offline."""
    from diffusers import StableDiffusionPipeline

    path = check_pipeline_folder(folder)
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the pipeline in {path}: {e}") from e


def is_sdxl_folder(folder: str | os.PathLike) -> bool:
    """True if the folder's UNet takes SDXL's pooled-text and size conditioning (``addition_embed_type: text_time``)."""
    config = Path(folder) / "unet" / "config.json"
    try:
        return json.loads(config.read_text()).get("addition_embed_type") == "text_time"
    except (OSError, ValueError):
        return False  # check_pipeline_folder reports what is missing


def load_sdxl_pipeline(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local StableDiffusionXLPipeline (no watermarker), offline."""
    from diffusers import StableDiffusionXLPipeline

    path = check_pipeline_folder(folder, REQUIRED_PARTS + SDXL_PARTS)
    try:
        return StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                         add_watermarker=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the SDXL pipeline in {path}: {e}") from e


def model_family(unet_config) -> ModelFamily:
    """SDXL (pooled-text and size conditioning), SD1.x (768-d text context) or SD2.x (1024-d)."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return ModelFamily.SDXL
    dims = {768: ModelFamily.SD1, 1024: ModelFamily.SD2}
    dim = unet_config.cross_attention_dim
    # Small test and toy models use other widths; they behave as SD1-style models.
    return dims.get(dim, ModelFamily.SD1)


class DiffusersSDAdapter:
    """`DiffusionModelAdapter` over a diffusers UNet2DConditionModel and CLIP text encoder."""

    naming = ParameterNaming.DIFFUSERS

    def __init__(self, pipeline, base: BaseModelInfo, device: torch.device | str = "cpu"):
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.family = model_family(self.unet.config)
        if self.family == ModelFamily.SDXL and not isinstance(self, DiffusersSDXLAdapter):
            raise ModelLoadError("this is an SDXL pipeline: use DiffusersSDXLAdapter (adapter_from_folder picks it)")
        self.device = torch.device(device)
        self.dtype = self.unet.dtype
        self.prediction_type = PredictionType(pipeline.scheduler.config.get("prediction_type", "epsilon"))
        self.alphas_cumprod = _alphas_cumprod(pipeline.scheduler.config).to(self.device)
        self.vae_scale_factor = getattr(pipeline, "vae_scale_factor", 8)
        self.native_resolution = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.latent_channels = int(self.unet.config.in_channels)
        self.base = base
        self.unet.to(self.device)
        self.text_encoder.to(self.device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "DiffusersSDAdapter":
        path = check_pipeline_folder(folder)
        pipeline = load_pipeline(path, dtype)
        base = BaseModelInfo(name=path.resolve().name, file_hash=folder_hash(path))
        return cls(pipeline, base, device=device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return Conditioning(context=self.text_encoder(ids)[0])

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def prepare_for_training(self) -> None:
        """Prompts are encoded: the text encoders leave the device, so training has it to itself."""
        if self.device.type != "cpu":
            for encoder in self.text_encoders():
                encoder.to("cpu")
            torch.cuda.empty_cache()

    def memory_model(self):
        """The memory planner's view of this UNet (`esd_core.plan`)."""
        from .plan import diffusers_memory_model

        encoders = sum(p.numel() for e in self.text_encoders() for p in e.parameters())
        return diffusers_memory_model(self.unet, native_resolution=self.native_resolution,
                                      text_encoder_parameters=encoders)

    def added_cond_kwargs(self, cond: Conditioning) -> dict:
        """The UNet's extra inputs for a conditioning (none for SD1.x/SD2.x)."""
        return {}

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # A low-precision model computes under autocast, which also casts the float32 tensors being trained; its cast
        # cache is off, since it would hold a low-precision copy of every trained weight for the whole forward.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            out = self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=cond.context.to(self.dtype),
                            **self.added_cond_kwargs(cond)).sample
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return epsilon_from_prediction(out.float(), latents.float(), alpha, self.prediction_type)


class DiffusersSDXLAdapter(DiffusersSDAdapter):
    """`DiffusionModelAdapter` over a diffusers SDXL pipeline: two text encoders (penultimate hidden states,
    concatenated) and, per prompt, the pooled embedding of the second and SDXL's size conditioning ("time ids": original
    size, crop offset, target size), carried in `Conditioning.extras` for the UNet's ``added_cond_kwargs``.

    The empty prompt encodes as zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL base's
    default), as diffusers' own sampling does for the unconditional branch.
    """

    def __init__(self, pipeline, base: BaseModelInfo, device: torch.device | str = "cpu", resolution: int = 0):
        super().__init__(pipeline, base, device=device)
        self.text_encoder_2 = pipeline.text_encoder_2.to(self.device)
        self.resolution = resolution or self.native_resolution

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        context, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                            num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False)
        if self.pipeline.config.get("force_zeros_for_empty_prompt", True):
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            context = torch.where(empty[:, None, None], torch.zeros_like(context), context)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        side = self.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=pooled.dtype, device=self.device)
        return Conditioning(context=context, extras={"text_embeds": pooled,
                                                     "time_ids": time_ids.repeat(len(prompts), 1)})

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def added_cond_kwargs(self, cond: Conditioning) -> dict:
        return {"added_cond_kwargs": {k: v.to(self.dtype) for k, v in cond.extras.items()}}


def adapter_from_folder(folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        resolution: int = 0) -> DiffusersSDAdapter:
    """The adapter a local pipeline folder needs: SDXL (with its size conditioning at ``resolution``, 0 = native) or
    SD1.x/SD2.x."""
    if is_sdxl_folder(folder):
        path = check_pipeline_folder(folder, REQUIRED_PARTS + SDXL_PARTS)
        base = BaseModelInfo(name=path.resolve().name, file_hash=folder_hash(path))
        return DiffusersSDXLAdapter(load_sdxl_pipeline(path, dtype), base, device=device, resolution=resolution)
    return DiffusersSDAdapter.from_folder(folder, device=device, dtype=dtype)


#: safetensors header dtypes of floating-point weights
_STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtype(part_folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype a pipeline part's weights are stored in (its first floating-point tensor in its safetensors file, read
    from the header only), or None when the part has no safetensors weights."""
    from safetensors import safe_open

    for file in sorted(Path(part_folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                found = _STORED_DTYPES.get(f.get_slice(key).get_dtype())
                if found is not None:
                    return found
    return None


def _alphas_cumprod(scheduler_config) -> torch.Tensor:
    """The DDPM schedule of the pipeline's scheduler config (any scheduler class), as float32."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config).alphas_cumprod.float()


def quiet_hf_logging() -> None:
    """diffusers/transformers log loading chatter and progress bars; keep the terminal for our own output."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it looks for at import
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
