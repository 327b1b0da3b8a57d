"""The benchmark's baseline (the paper's 2023 procedure): the trainer's result from the same seed, and each habit of
the original code it claims to reproduce."""
import pytest
import torch
from tiny import make_adapter

from esd_bench.baseline import AS_THE_CODE_RUNS, ISSUE_DEFINITION, checkpointed_blocks, erase_baseline
from esd_core.config import ESDConfig
from esd_core.errors import ConfigError
from esd_core.trainer import erase

LR = 1e-3


def config(method: str, seed: int = 3) -> ESDConfig:
    return ESDConfig(concepts=("a cat", "a dog"), method=method, iterations=6, learning_rate=LR, ddim_steps=6,
                     seed=seed)


def relative_distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in b)
    return (num / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_same_seed_gives_the_trainers_erased_weights_up_to_rounding(method):
    trainer = erase(make_adapter(), config(method))
    for variant in (ISSUE_DEFINITION, AS_THE_CODE_RUNS):
        baseline = erase_baseline(make_adapter(), config(method), variant)
        # Separate and batched passes round differently; Adam turns that into ~1e-4 relative differences.
        assert relative_distance(baseline.diffs, trainer.diffs) < 2e-3, variant.name
        assert max(float((baseline.diffs[k] - trainer.diffs[k]).abs().max()) for k in trainer.diffs) < 0.5 * LR
        torch.testing.assert_close(torch.tensor(baseline.losses), torch.tensor(trainer.losses), rtol=1e-4, atol=0)
    # The comparison can fail: another seed (other concepts, x_t and noise) lands far away.
    other = erase_baseline(make_adapter(), config(method, seed=4), ISSUE_DEFINITION)
    assert relative_distance(other.diffs, trainer.diffs) > 0.1


def test_the_model_is_returned_as_received():
    adapter = make_adapter()
    unet = adapter.unet
    unet.conv_in.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    result = erase_baseline(adapter, config("esd-x"), AS_THE_CODE_RUNS)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert all(p.grad is None for p in unet.parameters())
    assert all(".attn2." in k for k in result.diffs) and any(d.abs().max() > 0 for d in result.diffs.values())


def test_each_variant_reproduces_the_habits_it_names():
    """Passes per iteration (UNet and text encoder, by which model ran them and their batch), gradients of the
    untrained weights, and recomputation in backward."""
    cfg = ESDConfig(concepts=("a cat",), method="esd-x", iterations=2, ddim_steps=4, seed=0)
    for variant in (ISSUE_DEFINITION, AS_THE_CODE_RUNS):
        adapter = make_adapter()
        calls = []
        # Hooks are copied with the module: the baseline's deep copy (its frozen model) reports too.
        adapter.unet.register_forward_hook(lambda m, args, out: calls.append((m, args[0].shape[0], torch.is_grad_enabled())))
        adapter.text_encoder.register_forward_hook(lambda m, args, out: calls.append(("text", args[0].shape[0], False)))
        from diffusers.models.resnet import ResnetBlock2D

        block = next(b for b in checkpointed_blocks(adapter.unet) if isinstance(b, ResnetBlock2D))
        block_calls = []  # a layer inside a checkpointed block runs again when backward recomputes the block
        block.conv1.register_forward_hook(lambda *_: block_calls.append(torch.is_grad_enabled()))
        untrained_grads = []

        def check(step, loss):
            untrained_grads.append(adapter.unet.conv_in.weight.grad is not None)

        erase_baseline(adapter, cfg, variant, on_progress=check)
        trained = [c for c in calls if c[0] is adapter.unet and not c[2]]
        frozen = [c for c in calls if c[0] not in (adapter.unet, "text")]
        student = [c for c in calls if c[2]]
        texts = [c for c in calls if c[0] == "text"]
        assert len(student) == 2 and all(c[1] == 1 for c in student)
        assert len(frozen) == 4 and all(c[1] == 1 and not c[2] for c in frozen)  # e_0 and e_c, two passes each time
        sampled_rows = sum(c[1] for c in trained)
        assert sampled_rows % 2 == 0 and sampled_rows > 0
        if variant is ISSUE_DEFINITION:
            assert all(c[1] == 1 for c in trained) and len(texts) == 2   # two guidance passes; prompts encoded once
            assert untrained_grads == [False, False]
            assert block_calls.count(True) == 2                           # one forward per student pass
        else:
            assert all(c[1] == 2 for c in trained) and len(texts) == 8   # batched guidance; 4 prompts per iteration
            assert untrained_grads == [True, True]                        # the whole UNet's gradients
            assert block_calls.count(True) == 4                           # + one recomputation in each backward


def test_the_baseline_refuses_what_the_2023_code_cannot_do():
    with pytest.raises(ConfigError, match="float32"):
        erase_baseline(make_adapter(dtype=torch.bfloat16), config("esd-x"))
    with pytest.raises(ConfigError, match="erase_from"):
        erase_baseline(make_adapter(), ESDConfig(concepts=("a cat",), erase_from=("an animal",), iterations=1))
