"""Low-rank weight differences (LoRA): the factors an erasure can be trained or exported as.

A LoRA replaces a dense difference ``delta W`` of a Linear or Conv2d weight by ``(alpha / rank) * up @ down``, in the
layout every LoRA loader (ComfyUI, Forge, A1111) reads: for a Linear of shape (out, in), ``down`` is (rank, in) and
``up`` (out, rank); for a Conv2d of shape (out, in, kh, kw), ``down`` is (rank, in, kh, kw), a convolution with the
layer's kernel, and ``up`` (out, rank, 1, 1), a 1x1 convolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAFactors:
    """``delta = (alpha / rank) * up @ down`` for one layer's weight."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the weight this LoRA changes: (out, in) or (out, in, kh, kw)."""
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def delta(self) -> torch.Tensor:
        """The dense weight difference, in float32."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.scale * product).reshape(self.weight_shape)
