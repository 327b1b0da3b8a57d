"""The erased-weights file: one ``.safetensors`` format for every front end.

Tensors: only what training changed, as differences from the base weights, under ComfyUI's LDM key names with the
suffixes its stock LoRA loader applies: ``diffusion_model.<module>.diff`` (weight) and ``.diff_b`` (bias). So the
file also loads with ComfyUI's ``LoraLoaderModelOnly``, whose strength scales the erasure. Diffs are float32, so
applying at strength 1 gives exactly ``base + diff`` (the trained weights) and strength 0 the base model.

Header (safetensors metadata, all strings): see `ErasedWeightsHeader`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .adapter import ParameterNaming
from .errors import ErasedWeightsError
from .files import write_new_file
from .keymap import diffusers_to_ldm_names
from .weights import merged_weight, tensors_hash

FORMAT_ID = "esd-erased-weights"
FORMAT_VERSION = 1
KEY_PREFIX = "diffusion_model."
_KEY = re.compile(r"^diffusion_model\.(.+)\.(diff|diff_b)$")
_META = "esd."  # metadata key prefix


def file_key(param_name: str) -> str:
    """File key of an LDM UNet parameter: ``x.weight`` -> ``diffusion_model.x.diff``, ``x.bias`` -> ``...diff_b``."""
    module, _, leaf = param_name.rpartition(".")
    if leaf == "weight":
        return f"{KEY_PREFIX}{module}.diff"
    if leaf == "bias":
        return f"{KEY_PREFIX}{module}.diff_b"
    raise ErasedWeightsError(f"parameter {param_name!r} is neither a weight nor a bias; LoRA loaders cannot express it")


def param_name(key: str) -> str:
    """Inverse of `file_key`."""
    m = _KEY.match(key)
    if not m:
        raise ErasedWeightsError(f"unexpected tensor {key!r}: erased-weights keys are diffusion_model.<module>.diff/.diff_b")
    return f"{m.group(1)}.{'weight' if m.group(2) == 'diff' else 'bias'}"


@dataclass(frozen=True)
class ErasedWeightsHeader:
    """What an erased-weights file says about itself."""

    concepts: tuple[str, ...]
    method: str
    hyperparameters: dict
    iterations_run: int
    base_model: str
    base_hash: str           # sha256 of the base model file when the front end knew it, else ""
    base_tensors_hash: str   # `tensors_hash` of the base values of the changed tensors (LDM names)
    model_family: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    esd_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": "pt",
            f"{_META}format": FORMAT_ID,
            f"{_META}format_version": str(self.format_version),
            f"{_META}concepts": json.dumps(list(self.concepts)),
            f"{_META}method": self.method,
            f"{_META}hyperparameters": json.dumps(self.hyperparameters, sort_keys=True),
            f"{_META}iterations_run": str(self.iterations_run),
            f"{_META}base_model": self.base_model,
            f"{_META}base_hash": self.base_hash,
            f"{_META}base_tensors_hash": self.base_tensors_hash,
            f"{_META}model_family": self.model_family,
            f"{_META}created": self.created,
            f"{_META}esd_version": self.esd_version,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None, source: str = "file") -> "ErasedWeightsHeader":
        meta = dict(meta or {})
        if meta.get(f"{_META}format") != FORMAT_ID:
            raise ErasedWeightsError(
                f"{source} is not an ESD erased-weights file (no '{_META}format: {FORMAT_ID}' in its header); "
                "pick a file written by ESD Erase Concept or `python -m esd_core erase`")
        try:
            version = int(meta[f"{_META}format_version"])
            if version > FORMAT_VERSION:
                raise ErasedWeightsError(
                    f"{source} uses erased-weights format version {version}, newer than this pack reads "
                    f"({FORMAT_VERSION}); update the ESD nodes")
            return cls(
                concepts=tuple(json.loads(meta[f"{_META}concepts"])),
                method=meta[f"{_META}method"],
                hyperparameters=json.loads(meta[f"{_META}hyperparameters"]),
                iterations_run=int(meta[f"{_META}iterations_run"]),
                base_model=meta[f"{_META}base_model"],
                base_hash=meta[f"{_META}base_hash"],
                base_tensors_hash=meta[f"{_META}base_tensors_hash"],
                model_family=meta[f"{_META}model_family"],
                created=meta[f"{_META}created"],
                esd_version=meta[f"{_META}esd_version"],
                format_version=version,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ErasedWeightsError(f"{source} has a damaged ESD header ({type(e).__name__}: {e}); "
                                     "re-run the erasure to write a new file") from None


@dataclass
class ErasedWeights:
    """An erasure: header plus float32 diffs keyed by LDM parameter name (relative to the UNet)."""

    header: ErasedWeightsHeader
    diffs: dict[str, torch.Tensor]

    def shapes(self) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in self.diffs.items()}


def save_erased_weights(path: str | os.PathLike, erased: ErasedWeights) -> Path:
    """Write ``erased`` to a new file, atomically; an existing file is never replaced."""
    tensors = {file_key(n): t.detach().to("cpu", torch.float32).contiguous() for n, t in erased.diffs.items()}
    if not tensors:
        raise ErasedWeightsError("nothing to save: the erasure changed no tensor")
    return write_new_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=erased.header.to_metadata()))


def read_header(path: str | os.PathLike) -> ErasedWeightsHeader:
    """Read and validate only the header (cheap: no tensor is loaded)."""
    with _open(path) as f:
        return ErasedWeightsHeader.from_metadata(f.metadata(), source=str(path))


def load_erased_weights(path: str | os.PathLike) -> ErasedWeights:
    """Load and validate a file: header, key names, tensor dtypes and finiteness."""
    diffs: dict[str, torch.Tensor] = {}
    with _open(path) as f:
        header = ErasedWeightsHeader.from_metadata(f.metadata(), source=str(path))
        try:
            for key in f.keys():
                t = f.get_tensor(key)
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise ErasedWeightsError(f"{path}: tensor {key!r} is not finite floating point; the file is damaged")
                diffs[param_name(key)] = t
        except SafetensorError as e:
            raise ErasedWeightsError(f"{path} is damaged ({e}); re-run the erasure to write a new file") from None
    if not diffs:
        raise ErasedWeightsError(f"{path} holds no tensors; the file is damaged")
    return ErasedWeights(header=header, diffs=diffs)


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise ErasedWeightsError(f"erased-weights file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ErasedWeightsError(f"{path} is damaged or not a safetensors file ({e}); "
                                 "re-run the erasure to write a new file") from None


def check_fits(erased: ErasedWeights, target_shapes: Mapping[str, torch.Size], target_family: str | None = None) -> None:
    """Refuse a file whose tensors the target model lacks or has in another shape (another architecture)."""
    made_for = f"made for a {erased.header.model_family} model ({erased.header.base_model})"
    target = f" (target: {target_family})" if target_family else ""
    missing = [n for n in erased.diffs if n not in target_shapes]
    if missing:
        raise ErasedWeightsError(f"this erased-weights file was {made_for}: the target model{target} has no "
                                 f"{missing[0]!r} ({len(missing)} of {len(erased.diffs)} tensors missing)")
    wrong = [(n, tuple(t.shape), tuple(target_shapes[n])) for n, t in erased.diffs.items()
             if tuple(t.shape) != tuple(target_shapes[n])]
    if wrong:
        n, got, want = wrong[0]
        raise ErasedWeightsError(f"this erased-weights file was {made_for}: {n!r} is {got} in the file but {want} in "
                                 f"the target model{target} ({len(wrong)} tensors differ)")


def base_mismatch_warning(erased: ErasedWeights, target_base: Mapping[str, torch.Tensor]) -> str | None:
    """A warning if the target's weights under the erased tensors differ from the recorded base, else None.

    Applying an erasure to a fine-tune of its base can be intended, so this warns rather than refuses.
    """
    if tensors_hash({n: target_base[n] for n in erased.diffs}) == erased.header.base_tensors_hash:
        return None
    return (f"the target model's weights differ from the base this erasure was trained on "
            f"({erased.header.base_model}); applying it anyway, results may vary")


def module_ldm_names(module: torch.nn.Module, naming: ParameterNaming) -> dict[str, str]:
    """LDM name -> the module's own parameter name."""
    names = [n for n, _ in module.named_parameters()]
    if naming == ParameterNaming.LDM:
        return {n: n for n in names}
    return {ldm: n for n, ldm in diffusers_to_ldm_names(names).items()}


@torch.no_grad()
def apply_to_module(module: torch.nn.Module, erased: ErasedWeights, strength: float = 1.0,
                    naming: ParameterNaming = ParameterNaming.LDM, family: str | None = None) -> str | None:
    """Apply an erasure in place: ``w = base + strength * diff`` for every erased tensor.

    Refuses (before changing anything) a file that does not fit the module; returns a warning string when the module's
    base weights differ from the ones the erasure was trained on, else None.
    """
    local = module_ldm_names(module, naming)
    params = dict(module.named_parameters())
    by_ldm = {ldm: params[n] for ldm, n in local.items()}
    check_fits(erased, {ldm: p.shape for ldm, p in by_ldm.items()}, family)
    warning = base_mismatch_warning(erased, {ldm: by_ldm[ldm].data for ldm in erased.diffs})
    for ldm, diff in erased.diffs.items():
        p = by_ldm[ldm]
        p.data = merged_weight(p.data, diff, strength)
    return warning
