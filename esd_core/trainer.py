"""The ESD training loop (paper: arXiv 2303.07345, Algorithm 1), on any `DiffusionModelAdapter`.

Per iteration: pick a concept; partially sample x_t from noise with guided DDIM on the concept prompt; query the frozen
weights (swapped in by pointer) for e_0 and e_c in one batch; train the model's conditional prediction towards
``e_0 - eta (e_c - e_0)``. The model is returned exactly as received; the result carries the trained differences.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import Conditioning, DiffusionModelAdapter, ParameterNaming
from .config import ESDConfig, SampleWith
from .erased_weights import ErasedWeights, ErasedWeightsHeader
from .errors import ConfigError, ErasureCancelled, NonFiniteLossError
from .keymap import diffusers_to_ldm_names
from .methods import select_parameters
from .objective import esd_loss, esd_target
from .sampling import ddim_timesteps, sample_until
from .trainable import TrainableTensors, autograd_ready
from .weights import tensors_hash


@dataclass(frozen=True)
class Progress:
    """Reported after every iteration."""

    step: int        # iterations done, 1-based
    total: int
    loss: float
    elapsed: float   # seconds since training started


@dataclass
class ErasureResult:
    """What a run produced: the trained differences (LDM names, float32, CPU) and its loss history."""

    config: ESDConfig
    diffs: dict[str, torch.Tensor]
    losses: list[float]
    base_tensors_hash: str
    seconds: float
    trained_numel: int = field(default=0)

    @property
    def iterations_run(self) -> int:
        return len(self.losses)

    def to_erased_weights(self, adapter: DiffusionModelAdapter) -> ErasedWeights:
        """Package the result with its header (concepts, settings, provenance) for saving."""
        header = ErasedWeightsHeader(
            concepts=self.config.concepts,
            method=self.config.method.value,
            hyperparameters=self.config.to_dict(),
            iterations_run=self.iterations_run,
            base_model=adapter.base.name,
            base_hash=adapter.base.file_hash,
            base_tensors_hash=self.base_tensors_hash,
            model_family=adapter.family.value,
        )
        return ErasedWeights(header=header, diffs=self.diffs)


def ldm_names(adapter: DiffusionModelAdapter) -> dict[str, str]:
    """The adapter's parameter names mapped to LDM names (identity for LDM-named models)."""
    names = [n for n, _ in adapter.unet.named_parameters()]
    if adapter.naming == ParameterNaming.LDM:
        return {n: n for n in names}
    return diffusers_to_ldm_names(names)


def latent_shape(adapter: DiffusionModelAdapter, resolution: int) -> tuple[int, int, int, int]:
    """(1, C, H, W) latents for a square image of ``resolution`` pixels (0 = the model's native size)."""
    side = (resolution or adapter.native_resolution) // adapter.vae_scale_factor
    return (1, adapter.latent_channels, side, side)


def erase(
    adapter: DiffusionModelAdapter,
    config: ESDConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    restore: bool = True,
) -> ErasureResult:
    """Run ESD. ``should_cancel`` is checked between iterations and between sampling steps (raising
    `ErasureCancelled`); ``on_progress`` may itself raise to stop. On any exit the model's original weight tensors are
    put back (with ``restore=False`` a successful run leaves the trained weights, ``base + diff``, in the model).
    """
    with autograd_ready(adapter.unet) as swapped:
        if swapped and not restore:
            raise ConfigError("restore=False is not possible for a model loaded under torch.inference_mode")
        flags = {n: p.requires_grad for n, p in adapter.unet.named_parameters()}
        try:
            adapter.unet.requires_grad_(False)
            return _erase(adapter, config, on_progress, should_cancel, restore)
        finally:  # whatever happened, every parameter's requires_grad is as it was
            for n, p in adapter.unet.named_parameters():
                p.requires_grad_(flags[n])


def _erase(adapter, config, on_progress, should_cancel, restore) -> ErasureResult:
    unet = adapter.unet
    selected = select_parameters(config.method, unet)
    to_ldm = ldm_names(adapter)
    base_hash = tensors_hash({to_ldm[n]: p.data for n, p in selected.items()})

    rng = random.Random(config.seed)
    noise_gen = torch.Generator("cpu").manual_seed(config.seed)
    timesteps = ddim_timesteps(len(adapter.alphas_cumprod), config.ddim_steps)
    shape = latent_shape(adapter, config.resolution)
    with torch.no_grad():
        prompts = _encode_prompts(adapter, config)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise ErasureCancelled("erasure cancelled; nothing was saved and the model is unchanged")

    tensors = TrainableTensors(selected)
    succeeded = False
    try:
        optimizer = torch.optim.Adam(tensors.optimizer_parameters(), lr=config.learning_rate)
        # fp16 gradients underflow at ESD's small losses: scale the loss (dynamically, skipping overflowing steps).
        fp16 = adapter.dtype == torch.float16 or any(p.dtype == torch.float16 for p in selected.values())
        scaler = torch.amp.GradScaler(adapter.device.type, enabled=fp16)
        losses: list[float] = []
        start = time.perf_counter()
        for step in range(1, config.iterations + 1):
            check_cancel()
            concept, source = prompts.pairs[rng.randrange(len(prompts.pairs))]
            num_steps = rng.randrange(config.ddim_steps)
            noise = torch.randn(shape, generator=noise_gen).to(adapter.device)
            loss = _train_step(adapter, config, tensors, optimizer, scaler, prompts.uncond, concept, source, noise,
                               num_steps, timesteps, check_cancel)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss} at iteration {step}; nothing was saved and the model is unchanged. "
                    "Lower the learning rate, or train in float32 instead of fp16")
            losses.append(loss)
            if on_progress is not None:
                on_progress(Progress(step, config.iterations, loss, time.perf_counter() - start))
        diffs = tensors.diffs()
        succeeded = True
        return ErasureResult(config=config, diffs={to_ldm[n]: d for n, d in diffs.items()}, losses=losses,
                             base_tensors_hash=base_hash, seconds=time.perf_counter() - start,
                             trained_numel=tensors.numel)
    finally:
        if restore or not succeeded:
            tensors.restore()
        else:
            tensors.keep_trained()


@dataclass
class _Prompts:
    uncond: Conditioning
    pairs: list[tuple[Conditioning, Conditioning | None]]  # (concept, erase_from or None)


def _encode_prompts(adapter: DiffusionModelAdapter, config: ESDConfig) -> _Prompts:
    """Encode every prompt once: the text encoder is not needed inside the loop."""
    texts = sorted({"", *config.concepts, *config.erase_from})
    encoded = adapter.encode_prompts(texts)
    by_text = {t: encoded.row(i) for i, t in enumerate(texts)}
    return _Prompts(uncond=by_text[""],
                    pairs=[(by_text[c], by_text[f] if f is not None else None) for c, f in config.pairs()])


def _train_step(adapter, config, tensors, optimizer, scaler, uncond, concept, source, noise, num_steps, timesteps,
                check_cancel):
    """One ESD iteration; returns the loss."""
    predict = adapter.predict_noise
    sample_cond = source if source is not None else concept
    with torch.no_grad():
        if config.sample_with == SampleWith.FROZEN:
            with tensors.frozen():
                x_t, t = sample_until(predict, noise, uncond, sample_cond, adapter.alphas_cumprod, timesteps,
                                      num_steps, config.start_guidance, check_cancel)
        else:
            x_t, t = sample_until(predict, noise, uncond, sample_cond, adapter.alphas_cumprod, timesteps,
                                  num_steps, config.start_guidance, check_cancel)
        # Teacher: e_0, e_c (and e_from) from the frozen weights in one batch.
        teacher_conds = [uncond, concept] + ([source] if source is not None else [])
        n = len(teacher_conds)
        t_batch = torch.full((n,), t, dtype=torch.long, device=x_t.device)
        with tensors.frozen():
            eps = predict(x_t.repeat(n, 1, 1, 1), t_batch, Conditioning.cat(teacher_conds)).float()
        target = esd_target(eps[0:1], eps[1:2], config.negative_guidance, eps[2:3] if source is not None else None)
    check_cancel()
    prediction = predict(x_t, torch.full((1,), t, dtype=torch.long, device=x_t.device), sample_cond)
    loss = esd_loss(prediction, target)
    if not torch.isfinite(loss):
        return float(loss.detach())
    tensors.zero_grad()
    scaler.scale(loss).backward()
    tensors.grads_to_master()
    scaler.step(optimizer)  # unscales the float32 master gradients; skips the step if any overflowed
    scaler.update()
    tensors.master_to_model()
    return float(loss.detach())
