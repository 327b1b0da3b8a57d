"""UNet names: diffusers to LDM parameter names (SD1.x, SD2.x, SDXL), and LDM module paths to the file's module stems.

The erased-weights file names modules by their LDM path (what ComfyUI, A1111, Forge and single-file checkpoints use)
in the form every LoRA loader reads: ``lora_unet_<path with dots as underscores>``. A model trained under diffusers
names is converted to LDM names here first. The mapping is derived from the names alone: the layout of `UNet2DConditionModel`
(``down_blocks.i.resnets.j`` ...) maps onto the LDM ``input_blocks``/``middle_block``/``output_blocks`` sequence, in
which every down level holds ``layers_per_block`` (ResBlock, SpatialTransformer) pairs plus a downsampler, and every up
level ``layers_per_block + 1`` pairs, the last followed by the upsampler.
"""
from __future__ import annotations

import re
from typing import Iterable

from .errors import ErasedWeightsError

#: Prefix of the UNet's module stems in LoRA files (kohya's convention, read by ComfyUI, Forge and A1111).
STEM_PREFIX = "lora_unet_"

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_DOWNSAMPLER_CONV = "conv"  # diffusers Downsample2D.conv is LDM Downsample.op


def _resnet_module(part: str) -> str:
    if part not in _RESNET_PARTS:
        raise ErasedWeightsError(f"unknown ResNet layer {part!r} in a diffusers UNet")
    return _RESNET_PARTS[part]


class DiffusersToLDM:
    """Converts the parameter names of one diffusers UNet to LDM names."""

    def __init__(self, names: Iterable[str]):
        matches = [m for m in map(_BLOCK.match, names) if m]
        resnets = [int(m.group(4)) for m in matches if m.group(1, 2, 3) == ("down_blocks", "0", "resnets")]
        if not resnets:
            raise ErasedWeightsError("not a diffusers Stable Diffusion UNet: no down_blocks.0.resnets parameters")
        self.layers_per_block = max(resnets) + 1
        self.up_levels_with_attention = {int(m.group(2)) for m in matches
                                         if m.group(1) == "up_blocks" and m.group(3) == "attentions"}

    def __call__(self, name: str) -> str:
        module, _, leaf = name.rpartition(".")
        return f"{self.module(module)}.{leaf}"

    def module(self, module: str) -> str:
        """LDM path of a diffusers module path (e.g. ``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``)."""
        if module in _TOP_LEVEL:
            return _TOP_LEVEL[module]
        per_level = self.layers_per_block + 1  # LDM blocks per down level: the pairs plus the downsampler
        if m := _BLOCK.match(module):
            kind, level, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "down_blocks":
                if part == "downsamplers" and rest == _DOWNSAMPLER_CONV:
                    return f"input_blocks.{(level + 1) * per_level}.0.op"
                block = 1 + level * per_level + index
            else:
                if part == "upsamplers":
                    slot = 2 if level in self.up_levels_with_attention else 1
                    return f"output_blocks.{level * per_level + self.layers_per_block}.{slot}.{rest}"
                block = level * per_level + index
            prefix = "input_blocks" if kind == "down_blocks" else "output_blocks"
            if part == "resnets":
                return f"{prefix}.{block}.0.{_resnet_module(rest)}"
            if part == "attentions":
                return f"{prefix}.{block}.1.{rest}"
        elif m := _MID.match(module):
            part, index, rest = m.group(1), int(m.group(2)), m.group(3)
            if part == "attentions":
                return f"middle_block.{1 + 2 * index}.{rest}"
            return f"middle_block.{2 * index}.{_resnet_module(rest)}"
        raise ErasedWeightsError(f"cannot map diffusers UNet module {module!r} to an LDM name")


def diffusers_to_ldm_names(names: Iterable[str]) -> dict[str, str]:
    """Map every diffusers UNet parameter name to its LDM name."""
    names = list(names)
    convert = DiffusersToLDM(names)
    return {n: convert(n) for n in names}


def module_stem(module_path: str) -> str:
    """The file's name of an LDM UNet module: ``input_blocks.1.1.proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``.

    The mapping is one way on purpose: underscores are also part of LDM names (``transformer_blocks``), so a stem is
    resolved against a model's own module names (`stems_of`), never turned back into a path by guesswork.
    """
    return STEM_PREFIX + module_path.replace(".", "_")


def stems_of(ldm_param_names: Iterable[str]) -> dict[str, str | None]:
    """Stem -> LDM module path for every module owning a ``.weight`` or ``.bias`` among ``ldm_param_names``, as
    ComfyUI's ``model_lora_keys_unet`` and A1111's ``network_layer_mapping`` build it from the model itself. A stem two
    different modules share maps to None (ambiguous: nothing may be applied through it)."""
    stems: dict[str, str | None] = {}
    for name in ldm_param_names:
        module, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "bias") or not module:
            continue
        stem = module_stem(module)
        stems[stem] = module if stems.get(stem, module) == module else None
    return stems

