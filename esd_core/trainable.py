"""The trained tensors: one model copy, with only the selected subset kept twice.

The frozen teacher is not a second model. For each selected parameter we keep the original tensor object (the base
weights, never written to) and give the parameter a trainable copy; teacher passes swap the originals back in by
pointer, which costs nothing. Memory therefore grows with the trained subset, not the model.

When the model computes in bf16/fp16, the optimizer works on float32 master copies: an Adam step at lr 1e-5 is below
bf16's resolution for most weights, so updating bf16 weights directly would silently stop learning.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .weights import merged_weight


class TrainableTensors:
    """Selected parameters of a module, their frozen originals, and float32 master copies."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.base: dict[str, torch.Tensor] = {}
        self.master: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            self.base[name] = p.data
            if p.dtype == torch.float32:
                p.data = p.data.clone()
                self.master[name] = p  # the parameter itself is the float32 master
            else:
                self.master[name] = p.data.float().clone().requires_grad_(True)
                p.data = p.data.clone()
            p.requires_grad_(True)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.base.values())

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return list(self.master.values())

    def zero_grad(self) -> None:
        for name, p in self.params.items():
            p.grad = None
            self.master[name].grad = None

    def grads_to_master(self) -> None:
        """After backward on a low-precision model: move gradients onto the float32 masters."""
        for name, p in self.params.items():
            m = self.master[name]
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """After an optimizer step: write the float32 masters into the model's (possibly low-precision) weights."""
        for name, p in self.params.items():
            m = self.master[name]
            if m is not p:
                p.data.copy_(m)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Swap the original weights in (by pointer) for teacher passes, and the trained ones back afterwards."""
        live = {name: p.data for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.data = self.base[name]
            yield
        finally:
            for name, p in self.params.items():
                p.data = live[name]

    @torch.no_grad()
    def diffs(self) -> dict[str, torch.Tensor]:
        """Trained minus base, in float32 on the CPU, from the float32 masters.

        The model's trained weights are snapped to exactly ``merged_weight(base, diff, 1)``, so that applying the
        diffs at strength 1 anywhere reproduces them bit for bit (the snap moves a weight by at most one rounding).
        """
        out = {}
        for name, p in self.params.items():
            diff = self.master[name].detach().float() - self.base[name].float()
            p.data.copy_(merged_weight(self.base[name], diff, 1.0))
            out[name] = diff.cpu()
        return out

    def keep_trained(self) -> None:
        """End training leaving the trained weights in the model (frozen again); the originals are released."""
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(False)
        self.master.clear()
        self.base.clear()

    def restore(self) -> None:
        """Put the original tensor objects back and freeze them: the module is exactly as it was received."""
        for name, p in self.params.items():
            p.data = self.base[name]
            p.grad = None
            p.requires_grad_(False)
        self.master.clear()


def _shared_normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over the same memory as ``t``: no copy."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def autograd_ready(module: torch.nn.Module) -> Iterator[int]:
    """Let autograd run through a module whose weights were created under ``torch.inference_mode`` (as ComfyUI loads
    models). Autograd may not save inference tensors for backward, so each such parameter is replaced, for the
    duration, by a parameter viewing the same memory (zero copy); the original parameter objects are put back on exit.
    Yields how many parameters were swapped.
    """
    originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for m in module.modules():
            for key, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    originals.append((m, key, p))
                    m._parameters[key] = torch.nn.Parameter(_shared_normal_tensor(p.data), requires_grad=False)
        yield len(originals)
    finally:
        for m, key, p in originals:
            m._parameters[key] = p
