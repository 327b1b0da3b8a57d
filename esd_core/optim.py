"""The optimizers a run can use, built for its device."""
from __future__ import annotations

import torch

from .config import OptimizerName
from .errors import ConfigError


def make_optimizer(name: OptimizerName, params: list[torch.Tensor], lr: float, device: torch.device):
    """An optimizer over float32 ``params`` on ``device``.

    * ``adam``: the paper's Adam; the fused kernel on CUDA (one launch for all tensors), torch's default elsewhere.
    * ``adamw8bit``: bitsandbytes' AdamW with 8-bit block-quantised moments (2 bytes per weight instead of 8) and no
      weight decay, so that it is Adam's update at a quarter of the state memory.
    * ``adafactor``: torch's Adafactor: a factored second moment (a row and a column vector per matrix) and no first
      moment, so almost no state; its steps are relative to each tensor's scale, so it needs its own learning rate.
    """
    name = OptimizerName(name)
    if name == OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=lr, fused=True if device.type == "cuda" else None)
    if name == OptimizerName.ADAFACTOR:
        # torch's foreach Adafactor makes a temporary the size of all trained tensors at every step; per tensor, at
        # most two of the largest (measured by the planner: 7.5 GiB for SDXL esd-u)
        return torch.optim.Adafactor(params, lr=lr, foreach=False)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optimizer 'adamw8bit' needs the bitsandbytes package: pip install bitsandbytes "
                          "(or choose adam / adafactor)") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold (its memory beyond the parameters and gradients); storages shared
    between tensors (bitsandbytes' quantisation maps) count once."""
    storages = {}
    for state in optimizer.state.values():
        for v in _tensors(state):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


def _tensors(tree):
    """Every tensor in a (nested) optimizer state."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
