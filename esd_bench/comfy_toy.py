"""Embed the toy pipeline, exactly, in a Stable Diffusion 1.5-shaped single-file checkpoint that ComfyUI loads.

ComfyUI only runs architectures it detects: an SD1.5 UNet needs 320 base channels, 8 heads and a 768-wide context
(channel multipliers, block counts and depths are read from the weights), the text encoder is always a full CLIP-L
(12 layers, width 768) and the VAE a KL autoencoder with 128 base channels (ComfyUI picks downscale 4, the SD x4
upscaler's VAE, when the third encoder level has no downsampler, as the toy's). Training a model that size here
would take hours, so the small trained toy is *embedded* in those shapes instead, with the same function:

* every feature channel of the toy becomes ``k`` copies (``k`` = big width / toy width: 10 in the UNet, 12 in the text
  encoder, 8 in the VAE), laid out so that every GroupNorm/LayerNorm group of the big model holds equal numbers of
  copies of the channels of exactly one toy group: its mean and variance are the toy group's (`replica_layout`);
* a layer reading copied channels divides its weights by the number of copies, so the sums are the toy's;
* attention: each big head holds one toy head (queries, keys, values) padded with zero dimensions, the query
  weights are scaled by sqrt(big head dim / toy head dim) for the softmax scale (`head_layout`);
* the UNet's 320-dimensional timestep sinusoid contains the toy's 32 frequencies at every 10th position
  (`sinusoid_layout`); the other inputs of that layer get zero weight;
* layers the toy lacks (10 of the 12 CLIP layers, one ResNet per VAE level) are identities: their output
  projections are zero, and the residual passes through;
* the VAE's latents are rescaled so that SD1.5's fixed latent scale (0.18215) gives the toy's scaled latents.

The result: ComfyUI's UNet predicts exactly the toy's noise, its CLIP-L gives the toy's text features (copied), its
VAE decodes the toy's images (checked in ``tests/test_comfy_toy.py`` against the diffusers models; the host tests
run it in ComfyUI and have the detector judge its samples). The file has ~347M parameters, 663 MiB in fp16
(mostly zeros or copies): build it on demand, never commit it. Images are 64x64 pixels = 16x16 latents; ComfyUI's
latent nodes count 8 pixels per latent, so an "Empty Latent Image" of 128x128 (and ESDTrain's resolution 128) gives
the toy's 16x16 latents.

CLI: ``python -m esd_bench.comfy_toy --out models/checkpoints/esd_toy_sd15.safetensors``
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import TOY_SD_DIR

# Bump when the written checkpoint changes for the same toy weights (caches of built files are keyed on it).
BUILD_VERSION = 2
SD15_LATENT_SCALE = 0.18215  # ComfyUI's SD15 latent_format.scale_factor: fixed, not read from the checkpoint
BIG_GROUPS = 32  # GroupNorm groups in every SD UNet and VAE norm
UNET_BIG_WIDTH = 320
UNET_BIG_HEADS = 8
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
VAE_BIG_WIDTH = 128
VAE_BIG_LAYERS = 2  # res blocks per VAE level (the decoder has one more)


# ------------------------------------------------------------------------------------------------------ layouts
# A layout maps every index of a big dimension to the toy index it copies, or -1 for a dimension kept at zero.


def replica_layout(small: int, big: int, small_groups: int, big_groups: int) -> torch.Tensor:
    """Copies of ``small`` channels in ``big``, group-aligned: big group g holds the channels of toy group
    ``g // (big_groups / small_groups)``, each equally often, consecutive copies of a channel side by side.

    With equal group counts this is the plain block layout ``big index // k``, which also keeps concatenations
    (the UNet's skip connections) aligned: the layout of a concatenation is the concatenation of the layouts.
    """
    if big % small or big_groups % small_groups or small % small_groups or big % big_groups:
        raise ValueError(f"cannot lay {small} channels in {small_groups} groups into {big} in {big_groups} groups")
    per_small_group, big_group_size = small // small_groups, big // big_groups
    if big_group_size % per_small_group:
        raise ValueError(f"a big group of {big_group_size} cannot hold copies of a toy group of {per_small_group}")
    b = torch.arange(big)
    big_group, within = b // big_group_size, b % big_group_size
    small_group = big_group // (big_groups // small_groups)
    return small_group * per_small_group + within // (big_group_size // per_small_group)


def head_layout(small_heads: int, small_head_dim: int, big_heads: int, big_head_dim: int) -> torch.Tensor:
    """Query/key/value dimensions: big head h holds toy head ``h // (big_heads / small_heads)`` in its first
    ``small_head_dim`` dimensions, zeros after."""
    if big_heads % small_heads or big_head_dim < small_head_dim:
        raise ValueError(f"cannot place {small_heads} heads of {small_head_dim} in {big_heads} of {big_head_dim}")
    b = torch.arange(big_heads * big_head_dim)
    head, within = b // big_head_dim, b % big_head_dim
    toy = (head // (big_heads // small_heads)) * small_head_dim + within
    return torch.where(within < small_head_dim, toy, torch.full_like(toy, -1))


def sinusoid_layout(small: int, big: int) -> torch.Tensor:
    """diffusers/LDM timestep features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = 10000^(-i/half)``: toy frequency i
    is big frequency ``i * big/small``; the others are unused (-1)."""
    half_small, half_big, ratio = small // 2, big // 2, big // small
    layout = torch.full((big,), -1)
    i = torch.arange(half_small)
    layout[i * ratio] = i
    layout[half_big + i * ratio] = half_small + i
    return layout


def expand_tensor(small: torch.Tensor, layouts: Sequence[torch.Tensor | None], summed: Sequence[bool]) -> torch.Tensor:
    """Big tensor whose entry ``[i, j, ...]`` is ``small[layouts[0][i], layouts[1][j], ...]`` (0 where a layout says
    -1); along every dimension marked ``summed`` (a layer's input), entries are divided by the number of copies of
    their toy index, so that a sum over copied inputs equals the toy's sum. ``None`` = that dimension unchanged."""
    out = small
    for dim, (layout, is_input) in enumerate(zip(layouts, summed)):
        if layout is None:
            continue
        valid = layout >= 0
        picked = out.index_select(dim, layout.clamp(min=0))
        mask_shape = [1] * out.dim()
        mask_shape[dim] = -1
        factor = valid.to(out.dtype)
        if is_input:
            copies = torch.bincount(layout[valid], minlength=out.shape[dim]).to(out.dtype)
            factor = factor / copies[layout.clamp(min=0)].clamp(min=1)
        out = picked * factor.view(mask_shape)
    return out


# ----------------------------------------------------------------------------------------------- expand models

LayoutRule = Callable[[str, int, int, int], "torch.Tensor | None"]


def _indexes_heads(name: str, dim: int, projections: str, output: str) -> bool:
    """Whether dimension ``dim`` of parameter ``name`` runs over attention heads: the output of a query/key/value
    projection (regex ``projections``) or the input of the attention's output projection (regex ``output``)."""
    return (dim == 0 and re.search(projections, name) is not None) or (dim == 1 and re.search(output, name) is not None)


def _expand_state(small: dict[str, torch.Tensor], big_shapes: dict[str, torch.Size], layout_for: LayoutRule,
                  query_scale: Callable[[str], float]) -> dict[str, torch.Tensor]:
    """Expand every toy tensor to its big shape; big tensors without a toy counterpart become identity layers
    (norm scales 1, everything else 0: a zero output projection makes a residual block pass its input through)."""
    out = {}
    for name, shape in big_shapes.items():
        if name not in small:
            out[name] = torch.ones(shape) if _is_norm(name) and name.endswith(".weight") else torch.zeros(shape)
            continue
        tensor = small[name].float()
        if tensor.dim() != len(shape):
            raise ValueError(f"{name}: toy tensor {tuple(tensor.shape)} vs big {tuple(shape)}")
        layouts = [None if s == b else layout_for(name, dim, s, b)
                   for dim, (s, b) in enumerate(zip(tensor.shape[:2], shape[:2]))]
        # a layer's output is dim 0, its input dim 1; embedding tables store (token, feature): both are outputs
        summed = [False, not _is_embedding(name)]
        expanded = expand_tensor(tensor, layouts, summed[:len(layouts)])
        if tuple(expanded.shape) != tuple(shape):
            raise ValueError(f"{name}: expanded to {tuple(expanded.shape)}, big model has {tuple(shape)}")
        out[name] = expanded * query_scale(name)
    return out


def _is_norm(name: str) -> bool:
    return bool(re.search(r"(^|\.)(norm\w*|group_norm|layer_norm\d*|final_layer_norm|conv_norm_out)\.", name))


def _is_embedding(name: str) -> bool:
    return name.endswith("embedding.weight") and "time_embedding" not in name


def unet_big_config(toy_config: dict) -> dict:
    """The SD1.5-detectable UNet config holding the toy: 320 base channels, 8 heads, context 768."""
    ratio = UNET_BIG_WIDTH // toy_config["block_out_channels"][0]
    keep = ("down_block_types", "up_block_types", "layers_per_block", "in_channels", "out_channels", "sample_size",
            "flip_sin_to_cos", "freq_shift", "mid_block_type", "use_linear_projection")
    cfg = {k: toy_config[k] for k in keep}
    cfg.update(block_out_channels=[c * ratio for c in toy_config["block_out_channels"]],
               cross_attention_dim=CLIP_L["hidden_size"], attention_head_dim=UNET_BIG_HEADS, norm_num_groups=BIG_GROUPS)
    return cfg


def unet_layout_rules(toy_unet, big_shapes: dict[str, torch.Size], text_layout: torch.Tensor
                      ) -> tuple[LayoutRule, Callable[[str], float]]:
    """(layout_for, query_scale) of the UNet embedding: which toy index each big index of a parameter's dimension
    copies, and the factor applied to a query projection for the softmax scale."""
    groups = toy_unet.config.norm_num_groups
    if groups != BIG_GROUPS:
        raise ValueError(f"the toy UNet has {groups} GroupNorm groups; only {BIG_GROUPS} (SD's) embed exactly")
    toy_heads, big_heads = toy_unet.config.attention_head_dim, UNET_BIG_HEADS
    time_features = toy_unet.config.block_out_channels[0]
    small_state = toy_unet.state_dict()

    def layout_for(name: str, dim: int, small: int, big: int):
        if _indexes_heads(name, dim, r"attn\d\.to_[qkv]\.weight$", r"attn\d\.to_out\.0\.weight$"):
            return head_layout(toy_heads, small // toy_heads, big_heads, big // big_heads)
        if re.search(r"attn2\.to_[kv]\.weight$", name) and dim == 1:
            return text_layout
        if name == "time_embedding.linear_1.weight" and dim == 1:
            return sinusoid_layout(time_features, UNET_BIG_WIDTH)
        return replica_layout(small, big, groups, BIG_GROUPS)

    def query_scale(name: str) -> float:
        if re.search(r"attn\d\.to_q\.weight$", name):
            return math.sqrt((big_shapes[name][0] // big_heads) / (small_state[name].shape[0] // toy_heads))
        return 1.0

    return layout_for, query_scale


def expand_unet(toy_unet, big_unet, text_layout: torch.Tensor) -> dict[str, torch.Tensor]:
    """State dict for ``big_unet`` (a diffusers UNet of `unet_big_config`) computing ``toy_unet`` exactly."""
    big_shapes = {k: v.shape for k, v in big_unet.state_dict().items()}
    layout_for, query_scale = unet_layout_rules(toy_unet, big_shapes, text_layout)
    return _expand_state(toy_unet.state_dict(), big_shapes, layout_for, query_scale)


def toy_space(toy_unet, big_tensors: dict[str, torch.Tensor], text_layout: torch.Tensor) -> dict[str, torch.Tensor]:
    """The toy parameters that big UNet tensors (diffusers names, e.g. weight changes of the embedded model) stand
    for: the inverse of `expand_unet` on every tensor whose copies agree (an expansion, or a change that keeps the
    copies equal, as training does: copies get equal gradients). Entry [i, j] is the sum over the copies of input j
    at the first copy of output i, divided by the query scale; a copy that is always zero is skipped."""
    small_state = toy_unet.state_dict()
    layout_for, query_scale = unet_layout_rules(toy_unet, {k: v.shape for k, v in big_tensors.items()},
                                                text_layout)
    out = {}
    for name, big in big_tensors.items():
        small_shape = small_state[name].shape
        t = big.float() / query_scale(name)
        for dim, (s, b) in enumerate(zip(small_shape[:2], big.shape[:2])):
            if s == b:
                continue
            layout = layout_for(name, dim, s, b)
            if dim == 1 and not _is_embedding(name):  # a layer's input: the copies' contributions add up
                t = torch.zeros(*t.shape[:1], s, *t.shape[2:]).index_add_(1, layout.clamp(min=0),
                                                                          t * (layout >= 0).view(1, -1, *[1] * (t.dim() - 2)))
            else:  # an output: the first copy of each toy index
                first = torch.tensor([int((layout == i).nonzero()[0]) for i in range(s)])
                t = t.index_select(dim, first)
        out[name] = t
    return out


def expand_text_encoder(toy_text, big_text) -> dict[str, torch.Tensor]:
    """State dict for a CLIP-L ``big_text`` computing ``toy_text``'s hidden states, every feature copied
    (`text_layout`): the toy's two layers are the first two, the other ten are identities."""
    toy_cfg = toy_text.config
    toy_heads, big_heads = toy_cfg.num_attention_heads, CLIP_L["num_attention_heads"]
    toy_head_dim, big_head_dim = toy_cfg.hidden_size // toy_heads, CLIP_L["hidden_size"] // big_heads

    def layout_for(name: str, dim: int, small: int, big: int):
        if _indexes_heads(name, dim, r"self_attn\.[qkv]_proj\.(weight|bias)$", r"out_proj\.weight$"):
            return head_layout(toy_heads, toy_head_dim, big_heads, big_head_dim)
        return replica_layout(small, big, 1, 1)  # LayerNorm streams: one group

    def query_scale(name: str) -> float:
        return math.sqrt(big_head_dim / toy_head_dim) if re.search(r"self_attn\.q_proj\.(weight|bias)$", name) else 1.0

    return _expand_state(toy_text.state_dict(), {k: v.shape for k, v in big_text.state_dict().items()
                                                 if not k.endswith("position_ids")}, layout_for, query_scale)


def text_layout(toy_hidden: int) -> torch.Tensor:
    """Where the toy's text features sit in CLIP-L's output (what the UNet's cross-attention reads)."""
    return replica_layout(toy_hidden, CLIP_L["hidden_size"], 1, 1)


def vae_big_config(toy_config: dict) -> dict:
    ratio = VAE_BIG_WIDTH // toy_config["block_out_channels"][0]
    cfg = {k: toy_config[k] for k in ("in_channels", "out_channels", "down_block_types", "up_block_types",
                                      "latent_channels", "sample_size", "act_fn")}
    cfg.update(block_out_channels=[c * ratio for c in toy_config["block_out_channels"]],
               layers_per_block=VAE_BIG_LAYERS, norm_num_groups=BIG_GROUPS, scaling_factor=SD15_LATENT_SCALE)
    return cfg


def expand_vae(toy_vae, big_vae) -> dict[str, torch.Tensor]:
    """State dict for ``big_vae`` whose (unscaled) latents are the toy's times
    ``toy scaling_factor / 0.18215``, so that ComfyUI's fixed SD1.5 latent scale gives the toy's scaled latents."""
    groups = toy_vae.config.norm_num_groups
    toy_state = toy_vae.state_dict()
    mid_width = toy_vae.config.block_out_channels[-1]
    big_mid_width = big_vae.config.block_out_channels[-1]

    def layout_for(name: str, dim: int, small: int, big: int):
        if _indexes_heads(name, dim, r"attentions\.0\.to_[qkv]\.(weight|bias)$", r"attentions\.0\.to_out\.0\.weight$"):
            return head_layout(1, mid_width, 1, big_mid_width)
        return replica_layout(small, big, groups, BIG_GROUPS)

    def query_scale(name: str) -> float:
        return math.sqrt(big_mid_width / mid_width) if re.search(r"attentions\.0\.to_q\.(weight|bias)$", name) else 1.0

    big = _expand_state(toy_state, {k: v.shape for k, v in big_vae.state_dict().items()}, layout_for, query_scale)
    gain = toy_vae.config.scaling_factor / SD15_LATENT_SCALE
    latent = toy_vae.config.latent_channels
    big["quant_conv.weight"][:latent] *= gain  # the mean half of (mean, logvar)
    big["quant_conv.bias"][:latent] *= gain
    big["quant_conv.bias"][latent:] += 2 * math.log(gain)  # std scales by the same gain
    big["post_quant_conv.weight"] /= gain
    return big


# ----------------------------------------------------------------------------------------- LDM (ComfyUI) names

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_name(name: str, up_levels: int) -> str:
    """diffusers AutoencoderKL parameter name -> the LDM name single-file checkpoints use."""
    name = name.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(\w+)\.(weight|bias)$", name):
        if m[2] == "downsamplers":
            return f"encoder.down.{m[1]}.downsample.conv.{m[5]}"
        return f"encoder.down.{m[1]}.block.{m[3]}.{_VAE_RESNET.get(m[4], m[4])}.{m[5]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(\w+)\.(weight|bias)$", name):
        level = up_levels - 1 - int(m[1])  # LDM numbers decoder levels from the highest resolution
        if m[2] == "upsamplers":
            return f"decoder.up.{level}.upsample.conv.{m[5]}"
        return f"decoder.up.{level}.block.{m[3]}.{_VAE_RESNET.get(m[4], m[4])}.{m[5]}"
    return name


def to_ldm_checkpoint(unet: dict, text: dict, vae: dict, up_levels: int) -> dict[str, torch.Tensor]:
    """One SD1.5 single-file state dict (``model.diffusion_model.``, ``cond_stage_model.transformer.``,
    ``first_stage_model.`` prefixes) from diffusers-named parts."""
    from esd_core.keymap import diffusers_to_ldm_names

    ckpt = {f"model.diffusion_model.{ldm}": unet[name] for name, ldm in diffusers_to_ldm_names(unet).items()}
    # SD1.5 checkpoints name CLIP-L's weights cond_stage_model.transformer.text_model.*; transformers 5's
    # CLIPTextModel state dict has no "text_model." level
    ckpt.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
                 for k, v in text.items()})
    hidden = CLIP_L["hidden_size"]
    # CLIP-L's pooled projection (unused by SD1.5 UNets; ComfyUI would leave a missing one uninitialised)
    ckpt["cond_stage_model.transformer.text_projection.weight"] = torch.eye(hidden)
    for name, tensor in vae.items():
        ldm = vae_ldm_name(name, up_levels)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm):
            tensor = tensor[..., None, None]  # LDM uses 1x1 convolutions there
        ckpt[f"first_stage_model.{ldm}"] = tensor
    return ckpt


# ------------------------------------------------------------------------------------------------------- build


def build_big_models(toy_unet, toy_text, toy_vae):
    """Random-initialised diffusers models of the big (ComfyUI-detectable) shapes for a toy pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_big_config(dict(toy_unet.config)))
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=toy_text.config.bos_token_id,
                                            eos_token_id=toy_text.config.eos_token_id,
                                            pad_token_id=toy_text.config.pad_token_id))
        vae = AutoencoderKL(**vae_big_config(dict(toy_vae.config)))
    return unet, text, vae


def expand_pipeline(toy_unet, toy_text, toy_vae) -> tuple[dict, dict, dict]:
    """diffusers-named state dicts (UNet, CLIP-L, VAE) of the big models computing the toy exactly."""
    big_unet, big_text, big_vae = build_big_models(toy_unet, toy_text, toy_vae)
    unet = expand_unet(toy_unet, big_unet, text_layout(toy_text.config.hidden_size))
    text = expand_text_encoder(toy_text, big_text)
    vae = expand_vae(toy_vae, big_vae)
    return unet, text, vae


def load_toy_parts(folder: Path = TOY_SD_DIR):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    return (UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).float().eval(),
            CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).float().eval(),
            AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).float().eval())


def build_checkpoint(out: Path, toy: Path = TOY_SD_DIR, dtype: torch.dtype = torch.float16) -> Path:
    """Write the ComfyUI SD1.5 checkpoint of the toy at ``out`` (atomically; never overwrites)."""
    from safetensors.torch import save_file

    from esd_core.files import write_new_file

    toy_unet, toy_text, toy_vae = load_toy_parts(toy)
    unet, text, vae = expand_pipeline(toy_unet, toy_text, toy_vae)
    ckpt = to_ldm_checkpoint(unet, text, vae, len(toy_vae.config.block_out_channels))
    ckpt = {k: v.to(dtype).contiguous() for k, v in ckpt.items()}
    metadata = {"esd_bench.toy": json.dumps({"source": "esd_bench/assets/toy_sd", "pixels": 64, "latent": 16,
                                             "comfy_latent_size_px": 128}),
                "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "esd_bench toy (SD1.5-shaped)"}
    write_new_file(Path(out), lambda tmp: save_file(ckpt, str(tmp), metadata=metadata))
    return Path(out)


def cached_checkpoint(cache_dir: Path | None = None) -> Path:
    """The toy's ComfyUI checkpoint in ``cache_dir`` (default: the host tests' cache, .comfyhost/cache/checkpoints),
    built there first if missing; named by the build version and the toy's weights, so it is rebuilt when they
    change."""
    import hashlib

    cache_dir = cache_dir or TOY_SD_DIR.parents[2] / ".comfyhost" / "cache" / "checkpoints"
    digest = hashlib.sha256(f"comfy_toy v{BUILD_VERSION}".encode())
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"):
        digest.update((TOY_SD_DIR / weights).read_bytes())
    cached = Path(cache_dir) / f"esd_toy_sd15-{digest.hexdigest()[:12]}.safetensors"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        build_checkpoint(cached)
    return cached


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write (must not exist)")
    parser.add_argument("--toy", type=Path, default=TOY_SD_DIR, help="toy pipeline folder (diffusers layout)")
    parser.add_argument("--fp32", action="store_true", help="store float32 (default float16: half the size)")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.out, args.toy, torch.float32 if args.fp32 else torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
