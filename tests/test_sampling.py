"""The partial DDIM sampler against diffusers' own DDIMScheduler (Stable Diffusion's configuration)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from esd_core.adapter import Conditioning, PredictionType
from esd_core.sampling import (classifier_free_guidance, ddim_step, ddim_timesteps, epsilon_from_prediction,
                               guided_ddim, previous_alpha_cumprod, sample_until)

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1)


def scheduler(steps: int) -> DDIMScheduler:
    s = DDIMScheduler(**SD_SCHEDULE)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [50, 20, 7])
def test_timesteps_match_ddim_scheduler(steps):
    assert torch.equal(ddim_timesteps(1000, steps), scheduler(steps).timesteps)


def fake_model(x, t, cond):
    """A deterministic stand-in for a UNet: depends on latents, timestep and conditioning."""
    return torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1).float() / 1000 + cond.context.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def test_every_step_matches_ddim_scheduler():
    s = scheduler(50)
    alphas = s.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ours = x.clone()
    ts = ddim_timesteps(1000, 50)
    for i, t in enumerate(ts):
        eps = torch.randn(1, 4, 8, 8, generator=g)
        x = s.step(eps, t, x).prev_sample
        t_prev = int(t) - 1000 // 50
        ours = ddim_step(ours, eps, alphas[t], previous_alpha_cumprod(alphas, t_prev))
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5, msg=f"step {i}")


@pytest.mark.parametrize("num_steps", [0, 1, 13, 49])
def test_partial_guided_sampling_matches_a_scheduler_loop(num_steps):
    s = scheduler(50)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    uncond = Conditioning(torch.zeros(1, 3, 5))
    cond = Conditioning(torch.full((1, 3, 5), 0.5))
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return fake_model(x, t, c)

    x_t, t = sample_until(model, noise, uncond, cond, s.alphas_cumprod, s.timesteps, num_steps, 3.0)
    x = noise.clone()
    for step_t in s.timesteps[:num_steps]:
        tt = step_t.view(1)
        eps = classifier_free_guidance(fake_model(x, tt, uncond), fake_model(x, tt, cond), 3.0)
        x = s.step(eps, step_t, x).prev_sample
    torch.testing.assert_close(x_t, x, rtol=1e-5, atol=1e-5)
    assert t == int(s.timesteps[num_steps])  # the training timestep is the one x_t sits at
    assert calls == [2] * num_steps  # CFG: unconditional + conditional as one batch per step


def test_sampling_range_is_checked():
    with pytest.raises(ValueError):
        sample_until(fake_model, torch.zeros(1, 4, 2, 2), Conditioning(torch.zeros(1, 1, 1)),
                     Conditioning(torch.zeros(1, 1, 1)), scheduler(5).alphas_cumprod, ddim_timesteps(1000, 5), 5, 3.0)


def test_v_prediction_converts_to_epsilon():
    s = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g)[:, None].unbind(0)
    t = torch.tensor([637])
    x_t = s.add_noise(x0, eps, t)
    v = s.get_velocity(x0, eps, t)
    alpha = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(epsilon_from_prediction(v, x_t, alpha, PredictionType.V_PREDICTION), eps,
                               rtol=1e-4, atol=1e-5)
    assert epsilon_from_prediction(eps, x_t, alpha, "epsilon") is eps


@pytest.mark.parametrize("steps", [10, 3])
def test_full_sampling_matches_a_scheduler_loop(steps):
    """guided_ddim over every timestep (the live preview's sampler) returns what a complete DDIMScheduler loop does."""
    s = scheduler(steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    uncond, cond = Conditioning(torch.zeros(1, 3, 5)), Conditioning(torch.full((1, 3, 5), 0.5))
    x = noise.clone()
    for step_t in s.timesteps:
        tt = step_t.view(1)
        eps = classifier_free_guidance(fake_model(x, tt, uncond), fake_model(x, tt, cond), 7.5)
        x = s.step(eps, step_t, x).prev_sample
    ours = guided_ddim(fake_model, noise, uncond, cond, s.alphas_cumprod, ddim_timesteps(1000, steps), steps, 7.5)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    partial, _ = sample_until(fake_model, noise, uncond, cond, s.alphas_cumprod, s.timesteps, steps - 1, 7.5)
    assert not torch.allclose(ours, partial)  # the final step is taken: a fully denoised latent, not x at t=1
