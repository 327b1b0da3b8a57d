"""Low-rank weight differences (LoRA): the factors an erasure can be trained or exported as.

A LoRA replaces a dense difference ``delta W`` of a Linear or Conv2d weight by ``(alpha / rank) * up @ down``, in the
layout every LoRA loader (ComfyUI, Forge, A1111) reads: for a Linear of shape (out, in), ``down`` is (rank, in) and
``up`` (out, rank); for a Conv2d of shape (out, in, kh, kw), ``down`` is (rank, in, kh, kw), a convolution with the
layer's kernel, and ``up`` (out, rank, 1, 1), a 1x1 convolution.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


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


class LoRAAdapters:
    """Trainable rank-R adapters on Linear/Conv2d modules, added to their outputs by forward hooks.

    ``y = layer(x) + (alpha / R) * up(down(x))``: ``down`` is a Linear to R features (or a Conv2d with the layer's
    kernel, stride and padding to R channels), ``up`` a Linear (a 1x1 Conv2d) back; ``up`` starts at zero, so training
    starts from the base model. The hooks leave the modules and their weights untouched (ComfyUI's weight patches and
    casts keep working), are switched off for teacher passes (`frozen`), and are removed by `restore`.

    A small implementation rather than ``peft``: peft replaces each module by a wrapper (its parameters then live under
    ``<module>.base_layer``), which would change the module tree ComfyUI's ModelPatcher addresses by name while it
    trains, and would have to be undone exactly afterwards; hooks need neither.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], rank: int, alpha: float | None = None, seed: int = 0):
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
        self.modules = modules
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        self.enabled = True
        self.down: dict[str, torch.nn.Parameter] = {}
        self.up: dict[str, torch.nn.Parameter] = {}
        generator = torch.Generator("cpu").manual_seed(seed)
        for path, module in modules.items():
            limit = rank_limit(module)
            if rank > limit:
                raise ValueError(f"LoRA rank {rank} is larger than layer {path} allows ({limit})")
            down, up = _factor_shapes(module, rank)
            fan_in = math.prod(down[1:])
            # kaiming-uniform(a=sqrt(5)) as torch.nn.Linear initialises its weights: bound 1/sqrt(fan_in)
            init = (torch.rand(down, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            device = module.weight.device
            self.down[path] = torch.nn.Parameter(init.to(device))
            self.up[path] = torch.nn.Parameter(torch.zeros(up, device=device))
        self.numel = sum(p.numel() for p in self.parameters())
        self._handles = [m.register_forward_hook(self._hook(path)) for path, m in modules.items()]

    def _hook(self, path: str):
        def add_adapter(module, inputs, output):
            if not self.enabled:
                return output
            return output + self.scale * _adapter_output(module, inputs[0], self.down[path], self.up[path])
        return add_adapter

    def parameters(self) -> list[torch.Tensor]:
        return [*self.down.values(), *self.up.values()]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"{p}.lora_down": t.detach() for p, t in self.down.items()},
                **{f"{p}.lora_up": t.detach() for p, t in self.up.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if state.keys() != own.keys():
            raise ValueError("LoRA adapters do not match: " + ", ".join(sorted(state.keys() ^ own.keys())[:3]))
        for key, t in own.items():
            t.copy_(state[key])

    def factors(self) -> dict[str, LoRAFactors]:
        """The trained adapters, float32 on the CPU, by module path."""
        return {p: LoRAFactors(down=self.down[p].detach().float().cpu(), up=self.up[p].detach().float().cpu(),
                               alpha=self.alpha) for p in self.modules}

    def restore(self) -> None:
        """Remove the hooks: the modules compute exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def keep_trained(self) -> None:
        """Merge the adapters into the weights (``w + delta`` in the weight's dtype) and remove the hooks."""
        factors = self.factors()
        for path, module in self.modules.items():
            delta = factors[path].delta().to(module.weight.device)
            module.weight.data = (module.weight.float() + delta).to(module.weight.dtype)
        self.restore()


def is_adaptable(module: torch.nn.Module) -> bool:
    """Layers a LoRA can adapt: Linear and (ungrouped) Conv2d, including subclasses such as ComfyUI's ops, and
    linear layers that are not subclasses (Forge's ops Linear is a plain Module with ``in_features``,
    ``out_features`` and a 2-D ``weight``, computing ``F.linear``)."""
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.ndim == 2
            and tuple(weight.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


def rank_limit(module: torch.nn.Module) -> int:
    """The largest useful rank for a layer: min(out, in * kh * kw)."""
    w = module.weight
    return min(w.shape[0], math.prod(w.shape[1:]))


def _factor_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = module.weight
    if isinstance(module, torch.nn.Conv2d):
        return (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)
    return (rank, w.shape[1]), (w.shape[0], rank)


def _adapter_output(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up(down(x))`` in the layer's geometry. Float32 factors meet low-precision inputs only under autocast (which
    casts them), the way the adapters run models that do not compute in float32."""
    if isinstance(module, torch.nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"LoRA on a Conv2d with padding_mode={module.padding_mode!r} is not supported")
        return F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
    return F.linear(F.linear(x, down), up)
