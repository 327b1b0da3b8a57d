"""Where x_t comes from: the paper's per-iteration partial trajectories and the fast mode's trajectory pools."""
import random
from collections import Counter

import torch
from tiny import make_adapter

from esd_core.adapter import Conditioning
from esd_core.config import ESDConfig
from esd_core.sampling import ddim_timesteps, sample_until
from esd_core.trainer import encode_prompts, erase, latent_shape, make_trainables
from esd_core.xt import OnlineSource, PoolSource, SamplingContext


def context(adapter, config, trainables):
    return SamplingContext(predict=adapter.predict_noise, alphas_cumprod=adapter.alphas_cumprod,
                           timesteps=ddim_timesteps(1000, config.ddim_steps), latent_shape=latent_shape(adapter, 0),
                           device=adapter.device, frozen=trainables.frozen)


def test_a_pool_gives_every_latent_of_its_trajectories_once_with_the_frozen_teacher_recorded():
    adapter = make_adapter()
    config = ESDConfig(concepts=("a cat", "a dog"), ddim_steps=5, trajectory_pool=3, sample_with="frozen", seed=1)
    prompts = encode_prompts(adapter, config)
    trainables = make_trainables(config, adapter.unet)
    ctx = context(adapter, config, trainables)
    source = PoolSource(config, prompts, random.Random(1), torch.Generator().manual_seed(1))
    examples = [source.next(ctx) for _ in range(15)]
    assert source.needs_sampling  # 3 trajectories x 5 latents used up: the next example samples a new pool
    # every DDIM timestep three times (once per trajectory): the online source's uniform timestep frequency
    assert Counter(e.t for e in examples) == {int(t): 3 for t in ctx.timesteps}
    # the latents are each trajectory's own, sampled alone from its noise and concept (the batch changes nothing)
    noise = torch.randn((3, *ctx.latent_shape[1:]), generator=torch.Generator().manual_seed(1))
    expected = {}
    with trainables.frozen():
        for p, pair in enumerate(source.pairs):
            for k in range(5):
                x_t, t = sample_until(adapter.predict_noise, noise[p:p + 1], prompts.uncond, prompts.concepts[pair],
                                      adapter.alphas_cumprod, ctx.timesteps, k, config.start_guidance)
                expected[(p, k)] = (x_t, t, pair)
    used = []
    for e in examples:
        match = [key for key, (x_t, t, pair) in expected.items()
                 if t == e.t and pair == e.pair and torch.allclose(x_t, e.x_t, rtol=1e-4, atol=1e-5)]
        assert len(match) == 1
        used.append(match[0])
    assert sorted(used) == sorted(expected)  # each latent exactly once
    # the recorded teacher is the frozen model's e_0 and e_c at (x_t, t)
    for e in examples[:3]:
        with torch.no_grad():
            conds = Conditioning.cat([prompts.uncond, prompts.concepts[e.pair]])
            fresh = adapter.predict_noise(e.x_t.repeat(2, 1, 1, 1), torch.full((2,), e.t), conds)
        torch.testing.assert_close(e.teacher, fresh, rtol=1e-4, atol=1e-5)
    trainables.restore()


def test_a_pool_sampled_by_the_trained_model_records_no_teacher_and_refreshes_from_the_model_as_it_is():
    adapter = make_adapter()
    config = ESDConfig(concepts=("a cat",), ddim_steps=4, trajectory_pool=2, sample_with="trained")
    prompts = encode_prompts(adapter, config)
    trainables = make_trainables(config, adapter.unet)
    ctx = context(adapter, config, trainables)
    gen = torch.Generator().manual_seed(0)
    source = PoolSource(config, prompts, random.Random(0), gen)
    first = [source.next(ctx) for _ in range(8)]
    assert all(e.teacher is None for e in first)
    with torch.no_grad():  # training moved the model
        for p in trainables.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn((2, *ctx.latent_shape[1:]), generator=torch.Generator().set_state(gen.get_state()))
    examples = [source.next(ctx) for _ in range(8)]
    later = next(e for e in examples if e.t != int(ctx.timesteps[0]))  # a latent after at least one step
    k = ctx.timesteps.tolist().index(later.t)

    def sampled(p, frozen):
        with trainables.frozen() if frozen else torch.no_grad():
            return sample_until(adapter.predict_noise, noise[p:p + 1], prompts.uncond, prompts.concepts[0],
                                adapter.alphas_cumprod, ctx.timesteps, k, config.start_guidance)[0]

    assert any(torch.allclose(later.x_t, sampled(p, frozen=False), atol=1e-5) for p in range(2))
    assert not any(torch.allclose(later.x_t, sampled(p, frozen=True), atol=1e-3) for p in range(2))
    trainables.restore()


def test_erase_from_pairs_sample_from_the_broader_prompt_and_get_a_three_way_teacher():
    """With erase_from, x_t is sampled from the broader prompt, the trained prediction sees that prompt, and the
    teacher adds e_from (recorded pools cannot provide e_c, so the teacher pass runs)."""
    adapter = make_adapter()
    config = ESDConfig(concepts=("a cat",), erase_from=("an animal",), ddim_steps=4, trajectory_pool=2,
                       sample_with="frozen")
    prompts = encode_prompts(adapter, config)
    assert torch.equal(prompts.sampling_cond(0).context, encode_prompts(
        adapter, ESDConfig(concepts=("an animal",))).concepts[0].context)
    trainables = make_trainables(config, adapter.unet)
    source = PoolSource(config, prompts, random.Random(0), torch.Generator().manual_seed(0))
    example = source.next(context(adapter, config, trainables))
    assert example.teacher is None
    trainables.restore()


def test_online_source_draws_in_the_trainers_historic_order():
    """concept, number of steps, then noise: the order the paper-faithful runs (and their seeds) depend on."""
    adapter = make_adapter()
    config = ESDConfig(concepts=("a cat", "a dog"), ddim_steps=6, seed=5)
    prompts = encode_prompts(adapter, config)
    trainables = make_trainables(config, adapter.unet)
    ctx = context(adapter, config, trainables)
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    example = OnlineSource(config, prompts, rng, gen).next(ctx)
    expect_rng = random.Random(5)
    pair, steps = expect_rng.randrange(2), expect_rng.randrange(6)
    noise = torch.randn(ctx.latent_shape, generator=torch.Generator().manual_seed(5))
    x_t, t = sample_until(adapter.predict_noise, noise, prompts.uncond, prompts.concepts[pair], adapter.alphas_cumprod,
                          ctx.timesteps, steps, config.start_guidance)
    assert (example.pair, example.t) == (pair, t)
    assert torch.equal(example.x_t, x_t)
    trainables.restore()


def test_fast_pool_training_erases_like_a_run_and_is_deterministic():
    runs = [erase(make_adapter(), ESDConfig(concepts=("a cat",), iterations=12, learning_rate=1e-3, ddim_steps=4,
                                            trajectory_pool=2, sample_with="frozen", seed=3)) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    first, last = sum(runs[0].losses[:4]) / 4, sum(runs[0].losses[-4:]) / 4
    assert last < first


def test_the_x_t_benchmark_marks_the_strategy_the_fast_mode_runs_at_each_ddim():
    """`esd_bench.xt_strategies` labels as "fast mode" exactly the strategy `esd_core.config.fast` picks: the frozen
    pool for esd-x, DDIM 10 for esd-u whether the default samples with 25 or the paper's 50 steps; a table at other
    than the benchmark's 25 steps is its own section."""
    from esd_bench.xt_strategies import ERASURES, STRATEGIES, section_name

    esd_x, esd_u = ERASURES
    for ddim in (25, 50):
        marked = {e.method: [s.key for s in STRATEGIES if s.is_fast_mode_for(e.but(ddim_steps=ddim))]
                  for e in (esd_x, esd_u)}
        assert marked == {"esd-x": ["pool1-frozen"], "esd-u": ["ddim10"]}, (ddim, marked)
    assert {s.key: s.apply(esd_u.but(ddim_steps=50)).ddim_steps for s in STRATEGIES[:4]} == {
        "paper": 50, "frozen": 50, "ddim10": 10, "ddim5": 5}
    assert section_name(25) == "esd_bench.xt_strategies" and section_name(50) == "esd_bench.xt_strategies.ddim50"
