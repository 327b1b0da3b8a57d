"""The small interface between the ESD core and a concrete diffusion model.

The core never knows which library a model comes from. A front end (diffusers for the command line,
ComfyUI for the nodes) wraps its model in a `DiffusionModelAdapter`; the core only calls the members below.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


class ModelFamily(str, enum.Enum):
    """Model families whose UNet layout the core understands."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


class ParameterNaming(str, enum.Enum):
    """How the trainable module names its parameters.

    LDM: the original CompVis/Stability names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``), used by
    ComfyUI and by single-file checkpoints. DIFFUSERS: ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``.
    """

    LDM = "ldm"
    DIFFUSERS = "diffusers"


class PredictionType(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


@dataclass(frozen=True)
class BaseModelInfo:
    """Where the base model came from, recorded in every erased-weights file."""

    name: str
    file_hash: str = ""  # sha256 of the model file(s) when known ("" when the front end cannot tell)


@dataclass
class Conditioning:
    """Text conditioning for a batch, in whatever form the model consumes.

    ``context`` is the cross-attention token sequence (batch, tokens, dim). ``extras`` holds the batch-first extra
    inputs some families need (SDXL: the pooled text embedding and size conditioning as one ``y`` vector). The core
    only batches and slices conditionings; the adapter interprets them.
    """

    context: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def row(self, i: int) -> "Conditioning":
        """The i-th sample, as a batch of one."""
        return Conditioning(self.context[i:i + 1], {k: v[i:i + 1] for k, v in self.extras.items()})

    def expand(self, batch: int) -> "Conditioning":
        """This conditioning for ``batch`` samples: itself if it has that many rows, repeated if it has one."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot use a conditioning of {self.batch_size} rows for {batch} samples")
        return Conditioning(self.context.expand(batch, *self.context.shape[1:]),
                            {k: v.expand(batch, *v.shape[1:]) for k, v in self.extras.items()})

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis (e.g. unconditional + conditional for one CFG forward)."""
        keys = conds[0].extras.keys()
        if any(c.extras.keys() != keys for c in conds):
            raise ValueError("cannot batch conditionings with different extra inputs")
        return Conditioning(
            context=torch.cat([c.context for c in conds]),
            extras={k: torch.cat([c.extras[k] for c in conds]) for k in keys},
        )


@runtime_checkable
class DiffusionModelAdapter(Protocol):
    """What the ESD trainer needs from a model. Implementations: `esd_core.diffusers_adapter`, `nodes` (ComfyUI)."""

    #: The module whose parameters the layer methods select from and whose weights training changes.
    unet: torch.nn.Module
    naming: ParameterNaming
    family: ModelFamily
    #: DDPM cumulative alphas, shape (num_train_timesteps,), float32 on any device: the model's noise schedule.
    alphas_cumprod: torch.Tensor
    #: Device and dtype the model computes in (trained tensors keep float32 master copies regardless).
    device: torch.device
    dtype: torch.dtype
    #: Native image size in pixels (e.g. 512 for SD1.x), the latent channel count and the VAE's downscale factor.
    native_resolution: int
    latent_channels: int
    vae_scale_factor: int
    base: BaseModelInfo

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode text prompts (``""`` is the unconditional prompt) to a batch of conditioning."""
        ...

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predict epsilon for variance-preserving latents ``x_t`` at integer DDPM ``timesteps`` (shape (batch,)).

        Whatever the model's own parameterisation (epsilon or v), the adapter returns epsilon, in the latents' shape;
        `esd_core.sampling.epsilon_from_prediction` does the conversion for v-prediction models.
        """
        ...

    # Optional members, used when an adapter has them:
    #   prepare_for_training() -> None: called once the prompts are encoded, before training (e.g. release the text
    #       encoders, load the UNet fully onto the device).
    #   memory_model() -> esd_core.plan.MemoryModel: the planner's view of the UNet, for the pre-flight memory check.
