"""The paper's original ESD procedure, as its 2023 code runs it: the yardstick of the speed/memory benchmark only.

The original is ``train-scripts/train-esd.py`` of rohitgandikota/erasing@a2189e9 on CompVis' ``ldm`` code. Per
iteration it re-encodes the prompts, partially samples x_t with the model being trained (CompVis' DDIM sampler, whose
classifier-free guidance runs the unconditional and conditional predictions as one batch), queries ``model_orig`` -- a
second full copy of the model -- for e_0 and e_c in two separate forward passes, runs the trained model's conditional
prediction with autograd, and steps Adam, all in float32. Beyond that, as it runs:

* every UNet parameter keeps ``requires_grad=True`` (only the method's are given to Adam), so backward computes the
  gradient of every UNet weight, and those gradients are never freed (``opt.zero_grad()`` only clears Adam's);
* SD v1's ``v1-inference.yaml`` (CompVis/stable-diffusion, the config the script loads) sets ``use_checkpoint: True``
  and ``ldm``'s transformer blocks default to ``checkpoint=True``: every ResBlock and transformer block recomputes its
  activations during backward;
* each iteration encodes four prompts with CLIP: ``emb_0``, ``emb_p``, ``emb_n`` and the sampler's unconditional one.

The issue that asked for this benchmark defines the baseline more narrowly: two full copies, the two guidance passes
and the two frozen predictions as separate forward passes, float32. Both readings are a `BaselineVariant`;
`ISSUE_DEFINITION` and `AS_THE_CODE_RUNS` are the two the benchmark reports.

Everything that decides the result follows ``esd_core``'s trainer, so that the same seed gives the same erased weights
up to float rounding: python ``random.Random(seed)`` draws the concept and the number of DDIM steps, a CPU
``torch.Generator(seed)`` the noise, in the trainer's order; x_t and its timestep come from `esd_core.sampling`'s DDIM
schedule; the target is `esd_core.objective.esd_target`. Where the original differs there, it is not reproduced: its
``till_T`` loop runs ``min(50, 51 - t_enc)`` DDIM steps for a draw ``t_enc`` in 0..49 (26.5 on average, ours 24.5) and
then queries a DDPM timestep drawn from ``[20 t_enc, 20 t_enc + 20)``, not the one x_t sits at; its ``model_orig`` is a
whole LatentDiffusion (also a second VAE and CLIP text encoder), here a deep copy of the UNet only.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from esd_core.config import ESDConfig, SampleWith
from esd_core.errors import ConfigError
from esd_core.memory import gradient_checkpointing
from esd_core.methods import select_parameters
from esd_core.objective import esd_loss, esd_target
from esd_core.sampling import (classifier_free_guidance, ddim_step, ddim_timesteps, previous_alpha_cumprod,
                               sample_until)
from esd_core.trainer import PHASE_SAMPLING, PHASE_TRAINING, ldm_names, latent_shape


@dataclass(frozen=True)
class BaselineVariant:
    """Which of the original code's habits a baseline run reproduces."""

    name: str
    batched_guidance: bool   # uncond + cond as one batch of 2 per DDIM step (CompVis' sampler), else two passes
    reencode_prompts: bool   # four CLIP encodings per iteration, else each prompt once before training
    grad_whole_unet: bool    # every UNet parameter requires grad (all weight gradients computed and kept)
    checkpointing: bool      # every ResBlock and transformer block recomputes its activations during backward


ISSUE_DEFINITION = BaselineVariant("issue", batched_guidance=False, reencode_prompts=False, grad_whole_unet=False,
                                   checkpointing=False)
AS_THE_CODE_RUNS = BaselineVariant("code", batched_guidance=True, reencode_prompts=True, grad_whole_unet=True,
                                   checkpointing=True)


@dataclass
class BaselineResult:
    """Trained minus base weights of the method's parameters (LDM names, float32, CPU), and the losses."""

    diffs: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float


def checkpointed_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers modules that correspond to the ``ldm`` blocks SD v1 checkpoints: ResBlocks and transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]


def erase_baseline(adapter, config: ESDConfig, variant: BaselineVariant = AS_THE_CODE_RUNS, *,
                   on_progress: Callable[[int, float], None] | None = None,
                   on_phase: Callable[[str], None] | None = None) -> BaselineResult:
    """Run the original procedure on a float32 diffusers adapter; ``on_progress(step, loss)`` after each iteration,
    ``on_phase`` when x_t sampling or training starts (the trainer's `PHASE_SAMPLING` / `PHASE_TRAINING`).

    The adapter's UNet is trained in place (as the original trains ``model``) and its weights and ``requires_grad``
    flags are put back at the end; the frozen model is a deep copy made first, so forward hooks on the UNet are copied
    with it.
    """
    if adapter.dtype != torch.float32:
        raise ConfigError(f"the baseline runs in float32, as the original code; got a {adapter.dtype} model")
    if config.erase_from:
        raise ConfigError("the 2023 code has no erase_from; run the baseline without it")
    unet = adapter.unet
    frozen = copy.copy(adapter)             # the same adapter over ...
    frozen.unet = copy.deepcopy(unet)       # ... a second full UNet: the original's model_orig
    sampler = frozen if config.sample_with == SampleWith.FROZEN else adapter
    selected = select_parameters(config.method, unet)
    originals = dict(frozen.unet.named_parameters())
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    try:
        unet.requires_grad_(variant.grad_whole_unet)
        for p in selected.values():
            p.requires_grad_(True)
        encode = adapter.encode_prompts
        enter = on_phase or (lambda phase: None)
        once = {} if variant.reencode_prompts else {t: encode([t]) for t in sorted({"", *config.concepts})}
        rng = random.Random(config.seed)
        noise_gen = torch.Generator("cpu").manual_seed(config.seed)
        timesteps = ddim_timesteps(len(adapter.alphas_cumprod), config.ddim_steps)
        alphas = adapter.alphas_cumprod.float()
        shape = latent_shape(adapter, config.resolution)
        optimizer = torch.optim.Adam(list(selected.values()), lr=config.learning_rate)
        losses: list[float] = []
        start = time.perf_counter()
        with gradient_checkpointing(checkpointed_blocks(unet), enabled=variant.checkpointing):
            for step in range(1, config.iterations + 1):
                concept = config.concepts[rng.randrange(len(config.concepts))]
                num_steps = rng.randrange(config.ddim_steps)
                noise = torch.randn(shape, generator=noise_gen).to(adapter.device)
                if variant.reencode_prompts:  # emb_0, emb_p, emb_n, and the sampler's unconditional prompt
                    emb_0, emb_p, emb_n, uc = encode([""]), encode([concept]), encode([concept]), encode([""])
                else:
                    emb_0 = uc = once[""]
                    emb_p = emb_n = once[concept]
                optimizer.zero_grad()
                enter(PHASE_SAMPLING)
                with torch.no_grad():
                    x_t, t = _sample_x_t(sampler.predict_noise, noise, uc, emb_p, alphas, timesteps, num_steps,
                                         config.start_guidance, variant.batched_guidance)
                    enter(PHASE_TRAINING)
                    t_batch = torch.full((1,), t, dtype=torch.long, device=x_t.device)
                    e_0 = frozen.predict_noise(x_t, t_batch, emb_0).float()
                    e_p = frozen.predict_noise(x_t, t_batch, emb_p).float()
                    target = esd_target(e_0, e_p, config.negative_guidance)
                loss = esd_loss(adapter.predict_noise(x_t, t_batch, emb_n), target)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if on_progress is not None:
                    on_progress(step, losses[-1])
        seconds = time.perf_counter() - start
        to_ldm = ldm_names(adapter)
        with torch.no_grad():
            diffs = {to_ldm[n]: (p.detach() - originals[n]).float().cpu() for n, p in selected.items()}
        return BaselineResult(diffs=diffs, losses=losses, seconds=seconds)
    finally:  # the model as received: base weights back, no gradients, the caller's requires_grad flags
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n in selected:
                    p.copy_(originals[n])
                p.grad = None
                p.requires_grad_(flags[n])


def _sample_x_t(predict, noise, uncond, cond, alphas, timesteps, num_steps, scale, batched):
    """x_t after ``num_steps`` guided DDIM steps; with ``batched`` exactly `esd_core.sampling.sample_until`, else
    the same steps with the unconditional and conditional predictions as two forward passes."""
    if batched:
        return sample_until(predict, noise, uncond, cond, alphas, timesteps, num_steps, scale)
    x = noise.float()
    for i in range(num_steps):
        t, t_next = int(timesteps[i]), int(timesteps[i + 1])
        t_batch = torch.full((1,), t, dtype=torch.long, device=x.device)
        eps = classifier_free_guidance(predict(x, t_batch, uncond).float(), predict(x, t_batch, cond).float(), scale)
        x = ddim_step(x, eps, alphas[t], previous_alpha_cumprod(alphas, t_next))
    return x, int(timesteps[num_steps])
