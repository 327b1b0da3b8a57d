"""Where each iteration's x_t comes from: the paper's fresh partial trajectory, or a pool of full trajectories.

Producing x_t is most of ESD's cost: a random number of guided DDIM steps (two UNet passes each) for one training
step. Two sources, chosen by ``ESDConfig.trajectory_pool``:

* `OnlineSource` (0, the paper): every iteration draws a concept, a number of steps k in [0, S) and fresh noise, and
  samples k guided steps; x_t is the latent at ``timesteps[k]``.
* `PoolSource` (P > 0): when the pool is empty, P trajectories (one concept drawn per trajectory) are sampled to the
  end in one batch, and every latent along them, S per trajectory, becomes one iteration's x_t, in random order. The
  timesteps are visited with the same uniform frequency as online, at 1/S of the sampling passes per iteration. With
  ``sample_with="frozen"`` the guided passes are the frozen model's own unconditional and conditional predictions at
  each latent: exactly the teacher's e_0 and e_c, recorded as the pool is sampled, so iterations need no teacher pass.
  With ``sample_with="trained"`` the pool is sampled by the model as it is when the pool runs out (refreshed every
  P * S iterations).

Both draw from the run's two random streams (python ``random`` for choices, a CPU torch generator for noise) in a
fixed order, so a seed fixes the run, and both can be saved and restored for resumable training.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter import Conditioning
from .config import ESDConfig, SampleWith
from .sampling import NoisePredictor, guided_ddim, sample_until


@dataclass
class Prompts:
    """Encoded prompts of a run: the unconditional prompt and, per (concept, erase_from) pair, both encodings."""

    uncond: Conditioning
    concepts: list[Conditioning]
    sources: list[Conditioning | None]  # the erase_from prompt of each pair, or None

    def sampling_cond(self, pair: int) -> Conditioning:
        """The prompt x_t is sampled from and the trained prediction sees: erase_from if given, else the concept."""
        source = self.sources[pair]
        return source if source is not None else self.concepts[pair]


@dataclass
class Example:
    """One iteration's training input."""

    x_t: torch.Tensor               # (1, C, H, W), float32
    t: int                          # the DDPM timestep x_t sits at
    pair: int                       # index into the run's (concept, erase_from) pairs
    teacher: torch.Tensor | None    # (2, C, H, W): the frozen e_0, e_c at (x_t, t), when recorded while sampling


@dataclass
class SamplingContext:
    """What a source needs to sample: the predictor, the schedule, and how to switch to the frozen weights."""

    predict: NoisePredictor
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    latent_shape: tuple[int, int, int, int]
    device: torch.device
    frozen: Callable[[], contextlib.AbstractContextManager]
    between_steps: Callable[[], None] | None = None

    def weights(self, sample_with: SampleWith) -> contextlib.AbstractContextManager:
        """The weights that sample x_t: the trained ones as they are now, or the frozen base."""
        return self.frozen() if sample_with == SampleWith.FROZEN else contextlib.nullcontext()


class OnlineSource:
    """The paper's procedure: a fresh partial trajectory for every iteration."""

    def __init__(self, config: ESDConfig, prompts: Prompts, rng: random.Random, noise: torch.Generator):
        self.config, self.prompts, self.rng, self.noise = config, prompts, rng, noise

    def next(self, ctx: SamplingContext) -> Example:
        pair = self.rng.randrange(len(self.prompts.concepts))
        num_steps = self.rng.randrange(self.config.ddim_steps)
        noise = torch.randn(ctx.latent_shape, generator=self.noise).to(ctx.device)
        with ctx.weights(self.config.sample_with):
            x_t, t = sample_until(ctx.predict, noise, self.prompts.uncond, self.prompts.sampling_cond(pair),
                                  ctx.alphas_cumprod, ctx.timesteps, num_steps, self.config.start_guidance,
                                  ctx.between_steps)
        return Example(x_t=x_t, t=t, pair=pair, teacher=None)

    @property
    def needs_sampling(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PoolSource:
    """Full trajectories sampled P at a time in one batch; every latent along them is one iteration's x_t."""

    def __init__(self, config: ESDConfig, prompts: Prompts, rng: random.Random, noise: torch.Generator):
        self.config, self.prompts, self.rng, self.noise = config, prompts, rng, noise
        self.latents: torch.Tensor | None = None   # (S, P, C, H, W)
        self.teacher: torch.Tensor | None = None   # (S, P, 2, C, H, W) when recorded
        self.pairs: list[int] = []                 # the pair each trajectory was sampled for
        self.order: list[tuple[int, int]] = []     # (step k, trajectory p) still to use, next last

    @property
    def needs_sampling(self) -> bool:
        """True when the next example starts a new pool (callers report the sampling phase)."""
        return not self.order

    def _records_teacher(self, pair: int) -> bool:
        # The frozen model's guided passes are the teacher's passes when x_t is sampled from the concept itself.
        return self.config.sample_with == SampleWith.FROZEN and self.prompts.sources[pair] is None

    def _refill(self, ctx: SamplingContext) -> None:
        size = self.config.trajectory_pool
        steps = len(ctx.timesteps)
        self.pairs = [self.rng.randrange(len(self.prompts.concepts)) for _ in range(size)]
        noise = torch.randn((size, *ctx.latent_shape[1:]), generator=self.noise).to(ctx.device)
        cond = Conditioning.cat([self.prompts.sampling_cond(p) for p in self.pairs])
        latents, teacher = [], []

        def record(k: int, x: torch.Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> None:
            latents.append(x.clone())
            teacher.append(torch.stack([eps_uncond, eps_cond], dim=1))

        with ctx.weights(self.config.sample_with):
            guided_ddim(ctx.predict, noise, self.prompts.uncond, cond, ctx.alphas_cumprod, ctx.timesteps, steps,
                        self.config.start_guidance, ctx.between_steps, on_step=record)
        self.latents = torch.stack(latents)
        self.teacher = torch.stack(teacher) if any(map(self._records_teacher, self.pairs)) else None
        self.order = [(k, p) for k in range(steps) for p in range(size)]
        self.rng.shuffle(self.order)

    def next(self, ctx: SamplingContext) -> Example:
        if not self.order:
            self._refill(ctx)
        elif self.latents.device != ctx.device:  # restored from a checkpoint (saved on the CPU)
            self.latents = self.latents.to(ctx.device)
            self.teacher = self.teacher.to(ctx.device) if self.teacher is not None else None
        k, p = self.order.pop()
        teacher = self.teacher[k, p] if self.teacher is not None and self._records_teacher(self.pairs[p]) else None
        return Example(x_t=self.latents[k, p:p + 1], t=int(ctx.timesteps[k]), pair=self.pairs[p], teacher=teacher)

    def state_dict(self) -> dict:
        """Tensors and plain data that restore the pool exactly (for resumable training)."""
        state: dict = {"pairs": list(self.pairs), "order": [list(o) for o in self.order]}
        if self.latents is not None:
            state["latents"] = self.latents  # not copied: the pool is never written to, only replaced
        if self.teacher is not None:
            state["teacher"] = self.teacher
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pairs = list(state["pairs"])
        self.order = [tuple(o) for o in state["order"]]
        self.latents = state.get("latents")
        self.teacher = state.get("teacher")


def make_source(config: ESDConfig, prompts: Prompts, rng: random.Random, noise: torch.Generator):
    """The x_t source ``config`` asks for."""
    kind = PoolSource if config.trajectory_pool > 0 else OnlineSource
    return kind(config, prompts, rng, noise)
