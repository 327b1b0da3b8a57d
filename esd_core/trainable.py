"""What training changes, on one model copy: the selected weights themselves, or LoRA adapters on them.

The frozen teacher is never a second model. Full-weight training keeps each selected parameter's original tensor
(the base weights, never written to) and gives the parameter a float32 copy to train; teacher passes swap the
originals back in by pointer, which costs nothing. LoRA training (`esd_core.lora.LoRAAdapters`) leaves every weight
untouched and switches its adapters off for teacher passes. Memory therefore grows with what is trained, not with the
model.

Trained tensors are float32 whatever the model computes in: an Adam step at lr 1e-5 is below bf16's resolution for
most weights, so updating bf16 weights directly would silently stop learning. A low-precision model computes under
autocast from these float32 tensors (the pattern of diffusers' ``cast_training_params``): one copy per trained tensor,
no master/working pair.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from .weights import merged_weight


class Trainables(Protocol):
    """The interface the training loop uses, whatever is trained."""

    numel: int

    def parameters(self) -> list[torch.Tensor]:
        """The float32 leaf tensors the optimizer updates."""
        ...

    def frozen(self) -> contextlib.AbstractContextManager:
        """Within the context the model computes as the frozen base model."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name, for a resumable checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ...

    def restore(self) -> None:
        """Leave the model exactly as it was received."""
        ...

    def keep_trained(self) -> None:
        """Leave the trained result in the model, frozen."""
        ...


class FullWeights:
    """Selected parameters of a module trained as float32 copies, their frozen originals kept by pointer."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.base: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            self.base[name] = p.data
            p.data = p.data.to(torch.float32, copy=True)
            p.requires_grad_(True)
        self.numel = sum(t.numel() for t in self.base.values())

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _check_same_keys(state, self.params)
        for name, p in self.params.items():
            p.data.copy_(state[name])

    @torch.no_grad()
    def diffs(self) -> dict[str, torch.Tensor]:
        """Trained minus base, in float32 on the CPU."""
        return {name: (p.detach() - self.base[name].float()).cpu() for name, p in self.params.items()}

    def restore(self) -> None:
        """Put the original tensor objects back and freeze them: the module is exactly as it was received."""
        for name, p in self.params.items():
            p.data = self.base[name]
            p.grad = None
            p.requires_grad_(False)

    @torch.no_grad()
    def keep_trained(self) -> None:
        """Leave ``base + diff`` in the base weights' dtype in the model (what applying the diffs at strength 1
        gives), frozen; the float32 copies and the originals are released."""
        for name, p in self.params.items():
            base = self.base[name]
            p.data = merged_weight(base, p.detach() - base.float(), 1.0)
            p.grad = None
            p.requires_grad_(False)
        self.base.clear()


def _check_same_keys(state: dict, expected: dict) -> None:
    if state.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"trained tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")


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
