"""Every kind of file the pack writes, made for the test checkpoint's cross-attention layers, to place in a host's
Lora folder.

Written here in the exact key forms: the old v1 form (``diffusion_model.<path>.diff``, what the pack wrote first), the
v2 form (``lora_unet_<path with dots as underscores>.diff`` / ``.diff_b``, in fp16, bf16 or fp32) and the kohya LoRA
(``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``). `PACK_WRITERS` writes the v2 and LoRA kinds
with the pack's own writer (format version 2), which `WRITERS` uses; the fixture's own v2/LoRA writers stay as the
reference for the exact key forms.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esd_core import erased_weights
from esd_core.erased_weights import ErasedWeightsHeader
from esd_core.lora import LoRAFactors

#: file kind -> whether A1111 v1.10.1 loads it (the v1 form is the bug issue 10 fixes; Forge and ComfyUI load it)
FILE_KINDS = {"v2_fp16": True, "v2_bf16": True, "v2_fp32": True, "lora": True, "v1": False}
_DTYPES = {"v2_fp16": torch.float16, "v2_bf16": torch.bfloat16, "v2_fp32": torch.float32}
LORA_RANK = 4


def attn2_weights(checkpoint: Path, modules) -> dict[str, torch.Tensor]:
    """LDM name -> float32 base tensor of every weight and bias of the given modules' ``attn2``."""
    prefix = "model.diffusion_model."
    wanted = tuple(f"{prefix}{m}.transformer_blocks.0.attn2." for m in modules) if modules else ()
    with safe_open(str(checkpoint), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(wanted)}


def random_diffs(base: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A change as large as each tensor's own spread: enough to move a 3-step image visibly."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * float(t.std()) for n, t in base.items()}


def lora_key(param_name: str) -> tuple[str, str]:
    """``input_blocks.1.1.x.attn2.to_k.weight`` -> (``lora_unet_input_blocks_1_1_x_attn2_to_k``, ``weight``)."""
    module, _, leaf = param_name.rpartition(".")
    return "lora_unet_" + module.replace(".", "_"), leaf


def _header(format_version: int) -> ErasedWeightsHeader:
    return ErasedWeightsHeader(concepts=("a test concept",), method="esd-x", hyperparameters={}, iterations_run=1,
                               base_model="tiny_sd15", base_hash="", base_tensors_hash="", model_family="sd1",
                               format_version=format_version)


def _diff_key(module: str, leaf: str) -> str:
    return f"{module}.{'diff' if leaf == 'weight' else 'diff_b'}"


def write_v1(path: Path, diffs: dict[str, torch.Tensor]) -> None:
    tensors = {_diff_key("diffusion_model." + n.rpartition(".")[0], n.rpartition(".")[2]): d.contiguous()
               for n, d in diffs.items()}
    save_file(tensors, str(path), metadata=_header(1).to_metadata())


def write_v2(path: Path, diffs: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    tensors = {_diff_key(*lora_key(n)): d.to(dtype).contiguous() for n, d in diffs.items()}
    save_file(tensors, str(path), metadata=_header(2).to_metadata())


def lora_factors(diffs: dict[str, torch.Tensor], seed: int = 1) -> dict[str, LoRAFactors]:
    """Module path -> random rank-`LORA_RANK` factors for every weight in ``diffs`` whose product has the diff's
    spread (biases have no LoRA)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, diff in diffs.items():
        if diff.ndim != 2:
            continue
        down = torch.randn(LORA_RANK, diff.shape[1], generator=g)
        up = torch.randn(diff.shape[0], LORA_RANK, generator=g) * float(diff.std()) / LORA_RANK ** 0.5
        out[name.rpartition(".")[0]] = LoRAFactors(down=down, up=up, alpha=float(LORA_RANK))
    return out


def write_lora(path: Path, diffs: dict[str, torch.Tensor]) -> None:
    tensors = {}
    for module_path, f in lora_factors(diffs).items():
        module, _ = lora_key(f"{module_path}.weight")
        tensors[f"{module}.lora_down.weight"] = f.down.half().contiguous()
        tensors[f"{module}.lora_up.weight"] = f.up.half().contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(f.alpha, dtype=torch.float16)
    save_file(tensors, str(path), metadata=_header(2).to_metadata())


FIXTURE_WRITERS = {
    "v1": write_v1,
    "v2_fp16": lambda p, d: write_v2(p, d, _DTYPES["v2_fp16"]),
    "v2_bf16": lambda p, d: write_v2(p, d, _DTYPES["v2_bf16"]),
    "v2_fp32": lambda p, d: write_v2(p, d, _DTYPES["v2_fp32"]),
    "lora": write_lora,
}
#: The pack's own writer (format version 2: ``ErasedWeights.from_diffs`` / ``from_lora``, ``save_dtype``).
PACK_WRITERS = {
    **{kind: (lambda p, d, dt=kind[3:]: erased_weights.save_erased_weights(
        p, erased_weights.ErasedWeights.from_diffs(_header(2), d), dt)) for kind in ("v2_fp16", "v2_bf16", "v2_fp32")},
    "lora": lambda p, d: erased_weights.save_erased_weights(
        p, erased_weights.ErasedWeights.from_lora(_header(2), lora_factors(d)), "fp16"),
}
#: file kind -> writer(path, diffs): the pack's own writer for every kind it writes, the fixture's for the old v1 form.
WRITERS = {**FIXTURE_WRITERS, **PACK_WRITERS}


def write_all(folder: Path, diffs: dict[str, torch.Tensor], prefix: str = "esd_") -> dict[str, str]:
    """Write one file of every kind into ``folder``; returns kind -> the name ``<lora:NAME:1>`` takes."""
    names = {}
    for kind in FILE_KINDS:
        names[kind] = f"{prefix}{kind}"
        WRITERS[kind](folder / f"{names[kind]}.safetensors", diffs)
    return names
