"""Producing x_t: partial DDIM sampling with classifier-free guidance, as small pure functions.

The schedule follows Stable Diffusion's DDIM configuration (``steps_offset=1``, "leading" spacing,
``set_alpha_to_one=False``), so x_t sits exactly on DDPM timesteps the model was trained on.
"""
from __future__ import annotations

from typing import Callable

import torch

from .adapter import Conditioning, PredictionType

#: (latents, timesteps, conditioning) -> epsilon
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def ddim_timesteps(num_train_timesteps: int, ddim_steps: int, steps_offset: int = 1) -> torch.Tensor:
    """DDPM timesteps visited by a ``ddim_steps`` DDIM schedule, from noisiest to cleanest (SD: 981, 961, ..., 1)."""
    ratio = num_train_timesteps // ddim_steps
    return (torch.arange(ddim_steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset)


def previous_alpha_cumprod(alphas_cumprod: torch.Tensor, prev_timestep: int) -> torch.Tensor:
    """alpha_bar of the timestep a DDIM step lands on; past the start it is ``alphas_cumprod[0]`` (SD's setting)."""
    return alphas_cumprod[prev_timestep] if prev_timestep >= 0 else alphas_cumprod[0]


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from cumulative alpha ``alpha_t`` to ``alpha_prev``.

    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps``.
    """
    x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``e_u + scale * (e_c - e_u)``."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def epsilon_from_prediction(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, prediction_type: PredictionType | str
) -> torch.Tensor:
    """Convert a model output to epsilon. For v-prediction ``eps = sqrt(a_t) v + sqrt(1 - a_t) x_t``.

    ``alpha_t`` broadcasts against the batch (shape (batch, 1, 1, 1) or a scalar).
    """
    if PredictionType(prediction_type) == PredictionType.EPSILON:
        return prediction
    return alpha_t.sqrt() * prediction + (1 - alpha_t).sqrt() * x_t


def guided_pair(
    predict: NoisePredictor, x: torch.Tensor, t: int, uncond: Conditioning, cond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_uncond, eps_cond) at one timestep, run as one batch; conditionings of one row serve every latent."""
    batch = x.shape[0]
    timesteps = torch.full((2 * batch,), t, dtype=torch.long, device=x.device)
    eps = predict(torch.cat([x, x]), timesteps, Conditioning.cat([uncond.expand(batch), cond.expand(batch)]))
    eps_uncond, eps_cond = eps.float().chunk(2)
    return eps_uncond, eps_cond


#: Called at every guided pass of a trajectory with (k, x at timesteps[k], eps_uncond, eps_cond), all float32.
StepObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def guided_ddim(
    predict: NoisePredictor,
    noise: torch.Tensor,
    uncond: Conditioning,
    cond: Conditioning,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    between_steps: Callable[[], None] | None = None,
    on_step: StepObserver | None = None,
) -> torch.Tensor:
    """Run ``num_steps`` guided DDIM steps from pure noise along ``timesteps``; return the latent reached.

    After ``k < len(timesteps)`` steps it is the latent at ``timesteps[k]``; after all of them, the clean sample.
    ``uncond`` and ``cond`` hold one row per latent of the batch (or one row for all).
    """
    if not 0 <= num_steps <= len(timesteps):
        raise ValueError(f"num_steps must be in [0, {len(timesteps)}], got {num_steps}")
    alphas = alphas_cumprod.to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for k in range(num_steps):
        if between_steps is not None:
            between_steps()
        t = int(timesteps[k])
        t_next = int(timesteps[k + 1]) if k + 1 < len(timesteps) else -1
        eps_uncond, eps_cond = guided_pair(predict, x, t, uncond, cond)
        if on_step is not None:
            on_step(k, x, eps_uncond, eps_cond)
        eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
        x = ddim_step(x, eps, alphas[t], previous_alpha_cumprod(alphas, t_next))
    return x


def sample_until(
    predict: NoisePredictor,
    noise: torch.Tensor,
    uncond: Conditioning,
    cond: Conditioning,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    between_steps: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Partial sampling for one ESD iteration: ``num_steps`` guided DDIM steps from noise; return (x_t, t).

    With ``num_steps = k`` the result is the latent at ``timesteps[k]`` (``k = 0`` returns the noise itself at the
    noisiest timestep), which is the DDPM timestep the trained model is then queried at.
    """
    if not 0 <= num_steps < len(timesteps):
        raise ValueError(f"num_steps must be in [0, {len(timesteps) - 1}], got {num_steps}")
    x = guided_ddim(predict, noise, uncond, cond, alphas_cumprod, timesteps, num_steps, guidance_scale, between_steps)
    return x, int(timesteps[num_steps])
