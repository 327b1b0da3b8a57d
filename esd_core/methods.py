"""Which UNet parameters each ESD layer method trains.

Rules are on parameter names and hold for both namings: LDM (ComfyUI, single-file checkpoints) and diffusers. The
transformer blocks' ``attn1`` (self-attention) and ``attn2`` (cross-attention) names are the same in both; only the
output layer and the embeddings differ, and both spellings are listed below.

===============  ==========================================================================================
method           trains (ours)                             reference version
===============  ==========================================================================================
esd-x            every parameter of ``attn2`` (q, k, v,     CompVis ``xattn`` and 2025+ ``esd-x``: ``'attn2' in name``
                 out projection, biases)
esd-x-strict     ``attn2.to_k`` and ``attn2.to_v`` only     2025+ ``esd-x-strict``
esd-u            everything except ``attn2``, the output    CompVis ``noxattn`` (the paper's code); the 2025 diffusers
                 layer and the time/label embeddings        rule ``'attn2' not in name`` also trains the time embedding
esd-all          every parameter                            CompVis ``full`` / 2025+ ``esd-all``
selfattn         every parameter of ``attn1``               CompVis / 2026 ``selfattn``
===============  ==========================================================================================
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import Method, parse_method
from .errors import ConfigError

#: Output layer: LDM ``out.0`` (norm) / ``out.2`` (conv); diffusers ``conv_norm_out`` / ``conv_out``.
_OUTPUT_PREFIXES = ("out.", "conv_norm_out.", "conv_out.")
#: Time and class/size embeddings: LDM ``time_embed`` / ``label_emb`` (SDXL); diffusers ``time_embedding`` /
#: ``add_embedding`` (SDXL). The ResBlocks' own projections of the embedding (``emb_layers``/``time_emb_proj``) stay
#: trainable, as in the paper's code.
_EMBEDDING_PREFIXES = ("time_embed.", "label_emb.", "time_embedding.", "add_embedding.")


def _is_cross_attention(name: str) -> bool:
    return ".attn2." in f".{name}"


def _is_esd_u(name: str) -> bool:
    return not (_is_cross_attention(name) or name.startswith(_OUTPUT_PREFIXES) or name.startswith(_EMBEDDING_PREFIXES))


_RULES: dict[Method, Callable[[str], bool]] = {
    Method.ESD_X: _is_cross_attention,
    Method.ESD_X_STRICT: lambda n: ".attn2.to_k." in f".{n}" or ".attn2.to_v." in f".{n}",
    Method.ESD_U: _is_esd_u,
    Method.ESD_ALL: lambda n: True,
    Method.SELFATTN: lambda n: ".attn1." in f".{n}",
}


def is_trained(method: Method | str, name: str) -> bool:
    """True if ``method`` trains the UNet parameter called ``name`` (a name relative to the UNet module)."""
    return _RULES[parse_method(method)](name)


def select_parameter_names(method: Method | str, names: Iterable[str]) -> list[str]:
    """The names ``method`` trains, in the given order. Selecting nothing is a `ConfigError`."""
    method = parse_method(method)
    names = list(names)
    chosen = [n for n in names if _RULES[method](n)]
    if not chosen:
        valid = ", ".join(m.value for m in Method)
        raise ConfigError(
            f"layer method {method.value!r} selects no parameter of this model ({len(names)} parameters, "
            f"e.g. {names[:2]}); is it a Stable Diffusion UNet? Valid methods: {valid}")
    return chosen


def select_parameters(method: Method | str, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``module`` that ``method`` trains, by name."""
    params = dict(module.named_parameters())
    return {n: params[n] for n in select_parameter_names(method, params)}


def count_trained(method: Method | str, named_shapes: Iterable[tuple[str, torch.Size]]) -> int:
    """Number of scalar weights ``method`` trains, from (name, shape) pairs (works on the meta device)."""
    pairs = list(named_shapes)
    chosen = set(select_parameter_names(method, (n for n, _ in pairs)))
    return sum(int(torch.Size(s).numel()) for n, s in pairs if n in chosen)
