"""Sizes of erased-weights files for the real SD1.5 and SDXL architectures: full differences (fp32, fp16) and LoRA
files (fp16) of ranks 4, 16 and 64, for ESD-x and ESD-u.

    python -m esd_bench.file_sizes

Computed, not estimated by hand: the method's parameters of each UNet (built on the meta device from its diffusers
config, `esd_bench.architectures`) become an `esd_core.erased_weights.ErasedWeights` of meta tensors, full or in the
layout `esd_core.lora_export` writes (Linear/Conv2d weights as LoRA factors, norms as dense diffs, biases of low-rank
layers dropped), and its tensors are laid out as safetensors does (tensor bytes plus the JSON header of their names,
dtypes, shapes and offsets; the ``esd.*`` metadata adds about 1 kB).
"""
from __future__ import annotations

import json

import torch

from esd_core.erased_weights import ErasedWeights, ErasedWeightsHeader
from esd_core.lora import LoRAFactors
from esd_core.methods import select_parameter_names

from .architectures import ldm_shapes

ROWS = (("SD1.5", "sd15", "esd-x"), ("SD1.5", "sd15", "esd-u"), ("SDXL", "sdxl", "esd-x"))
RANKS = (4, 16, 64)
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16"}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of a safetensors file holding ``tensors``: 8-byte length, JSON header (padded to 8), data."""
    header, offset = {}, 0
    for key, t in sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):  # safetensors' data order
        size = t.numel() * t.element_size()  # shapes and dtypes only: works on meta tensors
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + (text + 7) // 8 * 8 + offset


def erasure(family: str, method: str, dtype: torch.dtype, rank: int | None = None) -> ErasedWeights:
    """The erasure of ``method`` on the architecture as meta tensors: full, or a LoRA of ``rank``."""
    shapes = ldm_shapes(family)
    chosen = select_parameter_names(method, shapes)
    header = ErasedWeightsHeader(concepts=("x",), method=method, hyperparameters={}, iterations_run=0,
                                 base_model=family, base_hash="", base_tensors_hash="", model_family=family)
    diffs = {n: torch.empty(shapes[n], dtype=dtype, device="meta") for n in chosen}
    if rank is None:
        return ErasedWeights.from_diffs(header, diffs)
    factors = {}
    for name in chosen:
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) in (2, 4):
            down = torch.empty(rank, *shape[1:], dtype=dtype, device="meta")
            up = torch.empty(shape[0], rank, *([1, 1] if len(shape) == 4 else []), dtype=dtype, device="meta")
            factors[name[:-len(".weight")]] = LoRAFactors(down=down, up=up, alpha=float(rank))
    dense = {n: d for n, d in diffs.items() if n.rpartition(".")[0] not in factors or n.endswith(".bias")}
    return ErasedWeights.from_lora(header, factors, dense)


def file_bytes(erased: ErasedWeights) -> int:
    return safetensors_bytes(erased.tensors())


def table() -> str:
    head = ("| model, method | weights trained | full fp32 | full fp16 | "
            + " | ".join(f"LoRA rank {r} (fp16)" for r in RANKS) + " |")
    lines = [head, "|---|---:|" + "---:|" * (2 + len(RANKS))]
    for label, family, method in ROWS:
        full32 = erasure(family, method, torch.float32)
        cells = [file_bytes(full32), file_bytes(erasure(family, method, torch.float16))]
        cells += [file_bytes(erasure(family, method, torch.float16, rank)) for rank in RANKS]
        numel = sum(c.weight.numel() + (0 if c.bias is None else c.bias.numel()) for c in full32.modules.values())
        lines.append(f"| {label} {method} | {numel:,} | " + " | ".join(_mb(b) for b in cells) + " |")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
