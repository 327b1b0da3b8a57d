"""The training loop on tiny random pipelines: learning, the frozen teacher, restoring, determinism, failures."""
import pytest
import torch
from tiny import make_adapter

from esd_core.config import ESDConfig
from esd_core.errors import ConfigError, ErasureCancelled, NonFiniteLossError
from esd_core.methods import select_parameters
from esd_core.testing import TinyPipelineSpec
from esd_core.trainer import erase

FAST = dict(ddim_steps=4, seed=0)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_falls_over_a_short_run(tiny_adapter):
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=40, learning_rate=1e-3, **FAST))
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.5 * first, (first, last)
    assert result.iterations_run == 40


def test_model_is_returned_exactly_as_received(tiny_adapter):
    before = snapshot(tiny_adapter.unet)
    originals = {n: p.data_ptr() for n, p in tiny_adapter.unet.named_parameters()}
    grad_flags = {n: p.requires_grad for n, p in tiny_adapter.unet.named_parameters()}
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=5, learning_rate=1e-3, method="esd-u", **FAST))
    assert_same(before, snapshot(tiny_adapter.unet))
    # the very same storage is back (nothing was copied over the base weights)
    assert all(p.data_ptr() == originals[n] for n, p in tiny_adapter.unet.named_parameters())
    assert {n: p.requires_grad for n, p in tiny_adapter.unet.named_parameters()} == grad_flags
    assert any(d.abs().max() > 0 for d in result.diffs.values())


def test_only_the_methods_parameters_change(tiny_adapter):
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-3, method="esd-x-strict",
                                           **FAST))
    assert result.diffs and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in result.diffs)
    assert result.trained_numel == sum(t.numel() for t in result.diffs.values())


class RecordingAdapter:
    """Wraps an adapter and records every prediction call (inputs, output, whether gradients were on)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_noise(self, latents, timesteps, cond):
        out = self.inner.predict_noise(latents, timesteps, cond)
        self.calls.append((latents.detach().clone(), timesteps.clone(), cond, out.detach().clone(),
                           torch.is_grad_enabled()))
        return out


def test_teacher_outputs_are_the_frozen_models_at_every_iteration(tiny_adapter):
    rec = RecordingAdapter(tiny_adapter)
    erase(rec, ESDConfig(concepts=("a cat",), iterations=6, learning_rate=1e-2, **FAST))
    student = [i for i, c in enumerate(rec.calls) if c[4]]
    assert len(student) == 6
    teacher = [rec.calls[i - 1] for i in student]  # the teacher batch runs right before each student pass
    assert all(c[0].shape[0] == 2 for c in teacher)  # e_0 and e_c as one batch
    with torch.no_grad():  # the model is back to its base weights: recompute what the teacher must have said
        for latents, timesteps, cond, out, _ in teacher:
            assert torch.equal(tiny_adapter.predict_noise(latents, timesteps, cond), out)
    # while the student really moved away from the base model (lr 1e-2): its last prediction differs
    latents, timesteps, cond, out, _ = rec.calls[student[-1]]
    with torch.no_grad():
        assert not torch.allclose(tiny_adapter.predict_noise(latents, timesteps, cond), out)


def test_sampling_with_frozen_weights_gives_frozen_samples(tiny_adapter):
    rec = RecordingAdapter(tiny_adapter)
    erase(rec, ESDConfig(concepts=("a cat",), iterations=6, learning_rate=1e-2, sample_with="frozen", ddim_steps=4,
                         seed=3))
    with torch.no_grad():
        for latents, timesteps, cond, out, grad in rec.calls:
            if not grad:  # sampling and teacher calls all come from the base weights
                assert torch.equal(tiny_adapter.predict_noise(latents, timesteps, cond), out)


def test_same_seed_same_result_and_other_seed_differs():
    runs = [erase(make_adapter(), ESDConfig(concepts=("a cat", "a dog"), iterations=4, learning_rate=1e-3,
                                            ddim_steps=4, seed=s)) for s in (7, 7, 8)]
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(runs[0].diffs[k], runs[1].diffs[k]) for k in runs[0].diffs)
    assert runs[0].losses != runs[2].losses


def test_erase_from_samples_and_trains_on_the_broader_prompt():
    """With erase_from, x_t is sampled from the broader prompt and the trained prediction sees it; the concept itself
    enters only the frozen teacher's prediction (e_0, e_c, e_from)."""
    adapter = make_adapter()
    encode = adapter.encode_prompts
    cat, animal, empty = (encode([p]).context for p in ("a cat", "an animal", ""))
    calls = []
    predict = adapter.predict_noise

    def recording(latents, timesteps, cond):
        calls.append((torch.is_grad_enabled(), cond.context.detach().clone()))
        return predict(latents, timesteps, cond)

    adapter.predict_noise = recording
    iterations = 3
    erase(adapter, ESDConfig(concepts=("a cat",), erase_from=("an animal",), iterations=iterations,
                             learning_rate=1e-3, **FAST))

    def rows(context, of):
        return [i for i in range(len(context)) if torch.equal(context[i], of[0])]

    trained = [ctx for grad, ctx in calls if grad]
    assert len(trained) == iterations and all(len(c) == 1 and rows(c, animal) == [0] for c in trained)
    frozen = [ctx for grad, ctx in calls if not grad]
    teacher = [c for c in frozen if rows(c, cat)]
    assert len(teacher) == iterations  # one teacher pass per iteration: uncond, concept, broader prompt
    assert all(rows(c, empty) == [0] and rows(c, cat) == [1] and rows(c, animal) == [2] for c in teacher)
    sampling = [c for c in frozen if not rows(c, cat)]
    assert sampling and all(rows(c, animal) and len(rows(c, animal)) + len(rows(c, empty)) == len(c)
                            for c in sampling)  # guided DDIM of the broader prompt


def test_several_concepts_and_erase_from_run():
    result = erase(make_adapter(), ESDConfig(concepts=("a cat", "a dog"), erase_from=("an animal",), iterations=4,
                                             learning_rate=1e-3, **FAST))
    alone = erase(make_adapter(), ESDConfig(concepts=("a cat", "a dog"), iterations=4, learning_rate=1e-3, **FAST))
    assert len(result.losses) == 4 and result.losses != alone.losses  # erase_from changes what is trained


def test_v_prediction_model_trains():
    adapter = make_adapter(TinyPipelineSpec(prediction_type="v_prediction"))
    assert adapter.prediction_type.value == "v_prediction"
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=10, learning_rate=1e-3, **FAST))
    # the same weights read as an epsilon model train differently: the v parameterisation really is used
    as_eps = erase(make_adapter(), ESDConfig(concepts=("a cat",), iterations=10, learning_rate=1e-3, **FAST))
    assert len(result.losses) == 10 and result.losses != as_eps.losses


def test_bf16_model_keeps_learning_through_float32_masters():
    adapter = make_adapter(dtype=torch.bfloat16)
    before = snapshot(adapter.unet)
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-5, **FAST))
    diffs = torch.cat([d.flatten() for d in result.diffs.values()])
    # Adam moves every weight by ~lr per step: far below bf16 resolution, yet recorded by the float32 masters
    assert (diffs != 0).float().mean() > 0.9
    assert diffs.abs().max() < 1e-4
    assert_same(before, snapshot(adapter.unet))


def test_cancel_stops_and_restores(tiny_adapter):
    before = snapshot(tiny_adapter.unet)
    checks = []

    def should_cancel():
        checks.append(1)
        return len(checks) > 5

    with pytest.raises(ErasureCancelled):
        erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=100, learning_rate=1e-3, **FAST),
              should_cancel=should_cancel)
    assert len(checks) == 6  # checked between iterations and between sampling steps: it stopped at once
    assert_same(before, snapshot(tiny_adapter.unet))


def test_non_finite_loss_stops_with_a_clear_error(tiny_adapter):
    before = snapshot(tiny_adapter.unet)
    rec = RecordingAdapter(tiny_adapter)

    def poisoned(latents, timesteps, cond):
        out = tiny_adapter.predict_noise(latents, timesteps, cond)
        return out * float("nan") if torch.is_grad_enabled() and len(rec.calls) > 20 else out

    rec.predict_noise = lambda *a: (rec.calls.append(a), poisoned(*a))[1]
    with pytest.raises(NonFiniteLossError, match="Lower the learning rate"):
        erase(rec, ESDConfig(concepts=("a cat",), iterations=50, learning_rate=1e-3, **FAST))
    assert_same(before, snapshot(tiny_adapter.unet))


def test_restore_false_leaves_exactly_base_plus_diff(tiny_adapter):
    base = snapshot(tiny_adapter.unet)
    grad_flags = {n: p.requires_grad for n, p in tiny_adapter.unet.named_parameters()}
    result = erase(tiny_adapter, ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-3, **FAST),
                   restore=False)
    from esd_core.trainer import ldm_names
    to_ldm = ldm_names(tiny_adapter)
    for n, p in tiny_adapter.unet.named_parameters():
        diff = result.diffs.get(to_ldm[n])
        expected = base[n] if diff is None else (base[n].float() + diff).to(p.dtype)
        assert torch.equal(p.data, expected), n
        assert p.requires_grad == grad_flags[n]


@pytest.mark.parametrize("bad,match", [(dict(concepts=()), "no concept"), (dict(iterations=0), "at least 1"),
                                       (dict(method="bogus"), "esd-x-strict"), (dict(ddim_steps=1), "ddim_steps"),
                                       (dict(resolution=100), "multiple of 8"),
                                       (dict(erase_from=("a", "b", "c")), "erase_from"),
                                       (dict(sample_with="teacher"), "sample_with")])
def test_bad_settings_are_refused_before_training(bad, match):
    with pytest.raises(ConfigError, match=match):
        ESDConfig(**{"concepts": ("a cat", "a dog"), **bad})


def test_select_parameters_returns_live_parameters(tiny_adapter):
    params = select_parameters("esd-x", tiny_adapter.unet)
    assert all(p is dict(tiny_adapter.unet.named_parameters())[n] for n, p in params.items())


def test_model_loaded_under_inference_mode_trains_without_copies():
    """ComfyUI creates its models under torch.inference_mode; autograd must still work, with no weight copies."""
    with torch.inference_mode():
        adapter = make_adapter()
    params = dict(adapter.unet.named_parameters())
    assert all(p.is_inference() for p in params.values())
    before = snapshot(adapter.unet)
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=4, learning_rate=1e-3, **FAST))
    assert any(d.abs().max() > 0 for d in result.diffs.values())
    after = dict(adapter.unet.named_parameters())
    assert all(after[n] is params[n] for n in params)  # the original parameter objects are back
    assert_same(before, snapshot(adapter.unet))


def test_fp16_model_trains_with_loss_scaling():
    """fp16 gradients of ESD's small losses underflow without loss scaling; the masters must still move."""
    adapter = make_adapter(dtype=torch.float16)
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-4, **FAST))
    diffs = torch.cat([d.flatten() for d in result.diffs.values()])
    assert torch.isfinite(diffs).all() and (diffs != 0).float().mean() > 0.5
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_gradient_checkpointing_gives_the_same_training():
    """Checkpointing trades memory for recomputation; it must not change the result."""
    from esd_core.memory import gradient_checkpointing

    config = ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-3, **FAST)

    def run(checkpointing: bool):
        adapter = make_adapter()
        calls = []
        adapter.unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append(1))
        blocks = [*adapter.unet.down_blocks, adapter.unet.mid_block, *adapter.unet.up_blocks]
        with gradient_checkpointing(blocks, enabled=checkpointing):
            result = erase(adapter, config)
        assert not any("forward" in vars(b) for b in blocks)  # the blocks' own forward is back
        return result, len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    assert checkpointed_calls == plain_calls + 3  # one recomputation per backward: it really checkpointed
    assert plain.losses == checkpointed.losses
    for k in plain.diffs:
        torch.testing.assert_close(plain.diffs[k], checkpointed.diffs[k], rtol=0, atol=1e-7)


def test_a_method_selecting_nothing_leaves_the_model_as_it_was():
    from types import SimpleNamespace

    not_a_unet = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    not_a_unet[1].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in not_a_unet.named_parameters()}
    with pytest.raises(ConfigError, match="selects no parameter"):
        erase(SimpleNamespace(unet=not_a_unet), ESDConfig(concepts=("a cat",), method="esd-x", iterations=1, **FAST))
    assert {n: p.requires_grad for n, p in not_a_unet.named_parameters()} == flags


def test_optimizers_train_and_report_their_state_memory():
    """Adam keeps two float32 moments per weight; 8-bit AdamW a quarter of that on large tensors (bitsandbytes keeps
    float32 moments below 4096 elements); Adafactor only a factored second moment."""
    results = {}
    for optimizer in ("adam", "adamw8bit", "adafactor"):
        lr = 1e-2 if optimizer == "adafactor" else 1e-3  # adafactor steps relative to each tensor's scale
        results[optimizer] = erase(make_adapter(), ESDConfig(concepts=("a cat",), iterations=4, learning_rate=lr,
                                                             optimizer=optimizer, method="esd-u", **FAST))
    n = results["adam"].trained_numel
    for r in results.values():
        assert any(d.abs().max() > 0 for d in r.diffs.values())
        assert r.memory.trained == 4 * n and r.memory.gradients == 4 * n  # one float32 copy and gradient each
    adam = results["adam"].memory.optimizer
    assert 8 * n <= adam < 8 * n + 4096
    assert results["adamw8bit"].memory.optimizer < 0.6 * adam
    # torch factors the last two dims: for 3x3 convolutions that keeps (kh + kw) / (kh * kw) of a full moment
    assert results["adafactor"].memory.optimizer < 0.4 * adam
