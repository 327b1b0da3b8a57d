"""Export an erasure as a LoRA: a truncated SVD of every layer's weight difference.

A Linear difference (out, in) and a Conv2d difference (out, in, kh, kw), flattened to (out, in * kh * kw) as every
LoRA loader multiplies it, is factored as ``U S V^T``; the ``r`` largest singular values give the best rank-r
approximation (Eckart-Young). ``down = sqrt(S_r) V_r^T`` (reshaped back to (r, in, kh, kw): a convolution with the
layer's kernel), ``up = U_r sqrt(S_r)`` ((out, r) or (out, r, 1, 1)), ``alpha = r``, so the scale ``alpha / r`` is 1.
Splitting ``S`` evenly keeps both factors in the same range, which matters for fp16 storage.

What cannot be low rank stays dense: 1-D weights (GroupNorm/LayerNorm) with their biases. Biases of low-rank layers
are dropped (A1111 ignores a bias beside LoRA keys, see `esd_core.erased_weights`) and listed in the header.

Energy is the squared Frobenius norm: per layer, ``--energy E`` keeps the fewest singular values whose squares sum to
at least E of the layer's total; the header's ``kept_energy`` is the fraction of the whole erasure's energy the file
keeps (dropped biases count as lost).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .erased_weights import ErasedWeights, ModuleChange
from .errors import ErasedWeightsError
from .lora import LoRAFactors


@dataclass(frozen=True)
class ExportSpec:
    """How many singular values each layer keeps: a fixed ``rank``, or enough for a fraction ``energy`` of it."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ErasedWeightsError("give either a rank or an energy for the LoRA export, not both or neither")
        if self.rank is not None and self.rank < 1:
            raise ErasedWeightsError(f"LoRA rank must be at least 1 (got {self.rank})")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ErasedWeightsError(f"energy must be in (0, 1], the fraction of each layer's change to keep "
                                     f"(got {self.energy})")

    def to_dict(self) -> dict:
        return {"rank": self.rank} if self.rank is not None else {"energy": self.energy}


def max_rank(weight_shape: torch.Size) -> int:
    """The largest rank a LoRA of a weight of this shape can have: min(out, in * kh * kw)."""
    return min(int(weight_shape[0]), int(torch.Size(weight_shape[1:]).numel()))


def check_rank(rank: int, weight_shape: torch.Size, name: str) -> None:
    """Refuse a rank larger than the layer's weight allows, naming the layer and its limit."""
    limit = max_rank(weight_shape)
    if rank > limit:
        raise ErasedWeightsError(f"rank {rank} is larger than {name} allows: its weight is {tuple(weight_shape)}, "
                                 f"so at most rank {limit}; choose a smaller rank")


def truncated_svd(delta: torch.Tensor, spec: ExportSpec, name: str = "layer") -> tuple[LoRAFactors, float]:
    """(LoRA factors of ``delta``, the energy they keep in absolute terms), per `ExportSpec`."""
    limit = max_rank(delta.shape)
    if spec.rank is not None:
        check_rank(spec.rank, delta.shape, name)
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.square()
    if spec.rank is not None:
        rank = spec.rank
    elif spec.energy >= 1.0:  # all of it: the layer exactly, up to float round-off
        rank = limit
    else:
        total = float(energy.sum())
        cumulative = energy.cumsum(0) / total if total > 0 else torch.ones_like(energy)
        # the fewest values reaching the fraction (a tolerance for the round-off of the cumulative sum)
        rank = min(int((cumulative < spec.energy - 1e-7).sum()) + 1, limit)
    root = s[:rank].sqrt()
    down = (root[:, None] * vh[:rank]).reshape(rank, *delta.shape[1:])
    up = u[:, :rank] * root[None, :]
    if delta.ndim == 4:
        up = up.reshape(*up.shape, 1, 1)
    return LoRAFactors(down=down.contiguous(), up=up.contiguous(), alpha=float(rank)), float(energy[:rank].sum())


def export_lora(erased: ErasedWeights, rank: int | None = None, energy: float | None = None,
                source: str = "") -> ErasedWeights:
    """The erasure as a LoRA (`ErasedWeights` of kind lora), by truncated SVD per layer; ``source`` names the file it
    came from in the header. Raises before computing anything if ``rank`` is larger than a layer allows."""
    spec = ExportSpec(rank=rank, energy=energy)
    low_rank = {stem: c for stem, c in erased.modules.items() if c.weight_shape() is not None
                and len(c.weight_shape()) in (2, 4)}
    if not low_rank:
        raise ErasedWeightsError("this erasure changes no Linear or Conv2d weight; there is nothing to export as LoRA")
    if spec.rank is not None:  # every layer first: an error must come before minutes of SVDs
        for stem, c in low_rank.items():
            check_rank(spec.rank, c.weight_shape(), stem)
    total = kept = 0.0
    modules: dict[str, ModuleChange] = {}
    dropped = list(erased.header.dropped)
    for stem, change in erased.modules.items():
        bias_energy = 0.0 if change.bias is None else float(change.bias.float().square().sum())
        if stem in low_rank:
            delta = change.weight_delta()
            factors, kept_here = truncated_svd(delta, spec, stem)
            modules[stem] = ModuleChange(lora=factors)
            total += float(delta.square().sum()) + bias_energy
            kept += kept_here
            if change.bias is not None:
                dropped.append(f"{stem}.diff_b")
        else:  # norms (1-D weights) and bias-only changes stay dense
            modules[stem] = change
            here = bias_energy + (0.0 if change.weight is None else float(change.weight.float().square().sum()))
            total += here
            kept += here
    ranks = [c.lora.rank for c in modules.values() if c.lora is not None]
    header = dataclasses.replace(
        erased.header, kind="lora", rank=max(ranks), alpha=float(ranks[0]) if len(set(ranks)) == 1 else None,
        kept_energy=kept / total if total > 0 else 1.0, dropped=tuple(dropped),
        export={**spec.to_dict(), "source": source, "source_kind": erased.header.kind})
    return ErasedWeights(header=header, modules=modules)
