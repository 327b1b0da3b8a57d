"""Small pure functions on weight tensors shared by training, saving and applying."""
from __future__ import annotations

import hashlib

import torch


def merged_weight(base: torch.Tensor, diff: torch.Tensor, strength: float) -> torch.Tensor:
    """``base + strength * diff``, computed in float32 as ComfyUI's weight patches do, cast back to base's dtype."""
    return (base.float() + strength * diff.to(base.device, torch.float32)).to(base.dtype)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 values, in name order: identifies the base weights an erasure changed.

    Float32 makes the hash independent of the storage dtype a loader chose (fp16 values are exact in float32).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
