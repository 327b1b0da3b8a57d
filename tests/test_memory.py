"""Gradient checkpointing on the units the UNet really calls: they recompute, memory falls, results do not change.

The same checks on ComfyUI's own UNet class run in tests/host/test_comfy_inprocess.py.
"""
import torch
from tiny import make_adapter

from esd_core.adapter import Conditioning
from esd_core.config import ESDConfig, RunOptions
from esd_core.memory import checkpoint_units, gradient_checkpointing
from esd_core.testing import count_forward_calls
from esd_core.trainer import erase


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (what the backward pass keeps alive)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def student_pass(adapter):
    """One forward and backward of the trained prediction, as a training step runs it."""
    cond = adapter.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = adapter.predict_noise(x, torch.tensor([500]), Conditioning(cond.context))
    return out.square().mean()


def test_units_are_the_modules_diffusers_unet_calls():
    unet = make_adapter().unet
    units = checkpoint_units(unet)
    names = {type(u).__name__ for u in units}
    assert {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D",
            "CrossAttnUpBlock2D"} <= names
    assert not any(isinstance(u, (torch.nn.ModuleList, torch.nn.Sequential)) for u in units)
    assert all(u in list(unet.children()) or any(u in list(c.children()) for c in unet.children()) for u in units)


def test_checkpointed_units_recompute_during_backward_and_save_less():
    adapter = make_adapter()
    for p in adapter.unet.parameters():
        p.requires_grad_(True)
    units = [u for u in checkpoint_units(adapter.unet) if type(u).__name__.endswith(("Block2D", "Block2DCrossAttn"))]
    calls = count_forward_calls(units)
    plain_bytes = saved_bytes(lambda: student_pass(adapter).backward())
    assert set(calls.values()) == {1}
    for key in calls:
        calls[key] = 0
    with gradient_checkpointing(checkpoint_units(adapter.unet)):
        checkpointed_bytes = saved_bytes(lambda: student_pass(adapter).backward())
        with torch.no_grad():  # passes without gradients are not checkpointed: each unit runs once
            before = dict(calls)
            student_pass(adapter)
            assert all(calls[k] - before[k] == 1 for k in calls)
    assert all(n == 2 + 1 for n in calls.values())  # forward, recomputation in backward, then the no-grad pass
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_checkpointing_trains_the_same_erasure():
    config = ESDConfig(concepts=("a cat",), iterations=3, learning_rate=1e-3, ddim_steps=4, method="esd-u")
    plain = erase(make_adapter(), config)
    checkpointed = erase(make_adapter(), config, options=RunOptions(gradient_checkpointing=True))
    for name, diff in plain.diffs.items():
        torch.testing.assert_close(checkpointed.diffs[name], diff, rtol=1e-4, atol=1e-7)
