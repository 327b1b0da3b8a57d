"""The erased-weights file: one ``.safetensors`` format that ComfyUI, Forge and A1111 all load as a LoRA.

Format version 2. Every tensor is keyed by its module's stem, ``lora_unet_<LDM module path, dots as underscores>``
(`esd_core.keymap.module_stem`), with the suffixes every LoRA loader applies:

- a full (dense) difference: ``<stem>.diff`` for the weight and ``<stem>.diff_b`` for the bias;
- a low-rank difference (kohya LoRA): ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``, ``<stem>.alpha``, the
  weight changing by ``(alpha / rank) * up @ down`` (`esd_core.lora.LoRAFactors`).

A file is of one kind (header ``esd.kind``): ``full`` (only diffs) or ``lora`` (LoRA factors for Linear/Conv2d
weights; norm layers, which cannot be low rank, as diffs). A1111 ignores a ``diff_b`` on a module that has LoRA keys,
while ComfyUI and Forge apply it, so a LoRA file never carries the bias of a low-rank layer: it is dropped when the
file is made and listed in ``esd.dropped``, and every UI applies the same thing. Version-1 files
(``diffusion_model.<module>.diff``, ComfyUI/Forge only) still load: their keys are converted to stems on load.

In memory an erasure is a `ModuleChange` per stem. Stems are resolved to a target model's parameters only when
applying (`resolve`), from the target's own LDM module names, as ComfyUI and A1111 do: a stem that names no module
of the target, or that two of its modules share, is refused with the key.

Header (safetensors metadata, all strings): see `ErasedWeightsHeader`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .adapter import ParameterNaming
from .errors import ErasedWeightsError
from .files import write_new_file
from .keymap import STEM_PREFIX, diffusers_to_ldm_names, module_stem, stems_of
from .lora import LoRAFactors
from .weights import Fingerprint, merged_weight, same_weights, tensors_hash, weights_fingerprint

FORMAT_ID = "esd-erased-weights"
FORMAT_VERSION = 2
KIND_FULL, KIND_LORA = "full", "lora"
#: ``--save-dtype`` / ``save_dtype`` names -> torch dtype of the saved differences and LoRA factors.
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SAVE_DTYPE = "fp16"
_V1_KEY = re.compile(r"^diffusion_model\.(.+)\.(diff|diff_b)$")
_V2_KEY = re.compile(rf"^({STEM_PREFIX}\w+)\.(diff|diff_b|lora_down\.weight|lora_up\.weight|alpha)$")
_META = "esd."  # metadata key prefix


@dataclass(frozen=True)
class ModuleChange:
    """What an erasure changes in one UNet module: a dense weight difference or a LoRA, and a bias difference.

    ``bias`` beside ``lora`` is never written (A1111 would ignore it); `ErasedWeights.from_lora` drops it.
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lora: LoRAFactors | None = None

    def __post_init__(self):
        if self.weight is not None and self.lora is not None:
            raise ErasedWeightsError("a module change is a dense weight difference or a LoRA, not both")
        if self.weight is None and self.bias is None and self.lora is None:
            raise ErasedWeightsError("a module change must change something")

    def weight_delta(self) -> torch.Tensor | None:
        """The weight difference as a dense float32 tensor (None if the weight is unchanged)."""
        if self.lora is not None:
            return self.lora.delta()
        return None if self.weight is None else self.weight.float()

    def weight_shape(self) -> torch.Size | None:
        if self.lora is not None:
            return self.lora.weight_shape
        return None if self.weight is None else self.weight.shape

    def numel(self) -> int:
        """Numbers stored for this module (LoRA: both factors)."""
        parts = [self.weight, self.bias] + ([self.lora.down, self.lora.up] if self.lora is not None else [])
        return sum(t.numel() for t in parts if t is not None)

    def cast(self, dtype: torch.dtype) -> "ModuleChange":
        """The same change with every tensor in ``dtype`` (LoRA alpha stays a Python float)."""
        def c(t):
            return None if t is None else t.detach().to("cpu", dtype).contiguous()
        lora = None if self.lora is None else LoRAFactors(c(self.lora.down), c(self.lora.up), self.lora.alpha)
        return ModuleChange(weight=c(self.weight), bias=c(self.bias), lora=lora)


@dataclass(frozen=True)
class ErasedWeightsHeader:
    """What an erased-weights file says about itself."""

    concepts: tuple[str, ...]
    method: str
    hyperparameters: dict
    iterations_run: int
    base_model: str
    base_hash: str           # sha256 of the base model file when the front end knew it, else ""
    base_tensors_hash: str   # `tensors_hash` of the base values of the changed tensors (LDM names), dropped included
    model_family: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    esd_version: str = __version__
    format_version: int = FORMAT_VERSION
    kind: str = KIND_FULL            # "full" | "lora"
    save_dtype: str = "fp32"         # dtype the tensors are stored in (set by `save_erased_weights`)
    rank: int = 0                    # LoRA: the largest rank of any layer (0: full)
    alpha: float | None = None       # LoRA: the alpha all layers share (None: per layer, see each ``.alpha``)
    kept_energy: float | None = None  # exported LoRA: fraction of the source's squared Frobenius norm kept
    export: dict = field(default_factory=dict)   # exported LoRA: {"rank": R} or {"energy": E}, and the source
    dropped: tuple[str, ...] = ()    # file keys of source tensors this file does not carry (biases of LoRA layers)
    #: `weights_fingerprint` of the same base values (LDM names): tells the base apart from other weights across
    #: rounding (a model loaded in another dtype, a LoRA patched in fp16); empty in files written before it existed
    base_fingerprint: Fingerprint = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": "pt",
            f"{_META}format": FORMAT_ID,
            f"{_META}format_version": str(self.format_version),
            f"{_META}kind": self.kind,
            f"{_META}save_dtype": self.save_dtype,
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
            f"{_META}dropped": json.dumps(list(self.dropped)),
            f"{_META}base_fingerprint": json.dumps(self.base_fingerprint, sort_keys=True),
        }
        if self.kind == KIND_LORA:
            meta[f"{_META}rank"] = str(self.rank)
            meta[f"{_META}alpha"] = "" if self.alpha is None else repr(float(self.alpha))
            meta[f"{_META}kept_energy"] = "" if self.kept_energy is None else repr(float(self.kept_energy))
            meta[f"{_META}export"] = json.dumps(self.export, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None, source: str = "file") -> "ErasedWeightsHeader":
        meta = dict(meta or {})
        if meta.get(f"{_META}format") != FORMAT_ID:
            raise ErasedWeightsError(
                f"{source} is not an ESD erased-weights file (no '{_META}format: {FORMAT_ID}' in its header); "
                "pick a file written by ESD Erase Concept, ESD Export LoRA or `python -m esd_core`")
        try:
            version = int(meta[f"{_META}format_version"])
            if version > FORMAT_VERSION:
                raise ErasedWeightsError(
                    f"{source} uses erased-weights format version {version}, newer than this pack reads "
                    f"({FORMAT_VERSION}); update the ESD nodes")
            kind = meta.get(f"{_META}kind", KIND_FULL)  # version 1 files are always full
            if kind not in (KIND_FULL, KIND_LORA):
                raise ValueError(f"unknown kind {kind!r}")
            save_dtype = meta.get(f"{_META}save_dtype", "fp32")
            if save_dtype not in SAVE_DTYPES:
                raise ValueError(f"unknown save dtype {save_dtype!r}")
            optional = {k: meta.get(f"{_META}{k}", "") for k in ("alpha", "kept_energy")}
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
                kind=kind,
                save_dtype=save_dtype,
                rank=int(meta.get(f"{_META}rank", "0")),
                alpha=float(optional["alpha"]) if optional["alpha"] else None,
                kept_energy=float(optional["kept_energy"]) if optional["kept_energy"] else None,
                export=json.loads(meta.get(f"{_META}export", "{}")),
                dropped=tuple(json.loads(meta.get(f"{_META}dropped", "[]"))),
                base_fingerprint=json.loads(meta.get(f"{_META}base_fingerprint", "{}")),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ErasedWeightsError(f"{source} has a damaged ESD header ({type(e).__name__}: {e}); "
                                     "re-run the erasure to write a new file") from None


@dataclass
class ErasedWeights:
    """An erasure: header plus one `ModuleChange` per module stem (``lora_unet_...``)."""

    header: ErasedWeightsHeader
    modules: dict[str, ModuleChange]

    @classmethod
    def from_diffs(cls, header: ErasedWeightsHeader, diffs: Mapping[str, torch.Tensor]) -> "ErasedWeights":
        """A full erasure from dense differences keyed by LDM parameter name (``<module>.weight`` / ``.bias``)."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, diff in diffs.items():
            module, _, leaf = name.rpartition(".")
            if leaf not in ("weight", "bias") or not module:
                raise ErasedWeightsError(
                    f"parameter {name!r} is neither a weight nor a bias; LoRA loaders cannot express it")
            parts.setdefault(module_stem(module), {})[leaf] = diff
        modules = {stem: ModuleChange(weight=p.get("weight"), bias=p.get("bias")) for stem, p in parts.items()}
        return cls(header=dataclasses.replace(header, kind=KIND_FULL), modules=modules)

    @classmethod
    def from_lora(cls, header: ErasedWeightsHeader, factors: Mapping[str, LoRAFactors],
                  diffs: Mapping[str, torch.Tensor] = {}) -> "ErasedWeights":
        """A LoRA erasure: ``factors`` keyed by LDM module path (Linear/Conv2d weights), ``diffs`` (LDM parameter names)
        for what cannot be low rank (norm layers). A bias diff of a LoRA module is dropped and listed in the header's
        ``dropped``, since A1111 would ignore it (see the module docstring)."""
        full = cls.from_diffs(header, diffs).modules if diffs else {}
        modules: dict[str, ModuleChange] = {}
        dropped = list(header.dropped)
        for module, lora in factors.items():
            stem = module_stem(module)
            if stem in full and full[stem].weight is not None:
                raise ErasedWeightsError(f"module {module!r} has both a LoRA and a dense weight difference")
            if stem in full and full[stem].bias is not None:
                dropped.append(f"{stem}.diff_b")
            modules[stem] = ModuleChange(lora=lora)
        modules.update({s: c for s, c in full.items() if s not in modules})
        ranks = [c.lora.rank for c in modules.values() if c.lora is not None]
        if not ranks:
            raise ErasedWeightsError("a LoRA erasure needs at least one low-rank layer")
        alphas = {c.lora.alpha for c in modules.values() if c.lora is not None}
        header = dataclasses.replace(header, kind=KIND_LORA, rank=max(ranks),
                                     alpha=alphas.pop() if len(alphas) == 1 else None, dropped=tuple(dropped))
        return cls(header=header, modules=modules)

    @property
    def kind(self) -> str:
        return self.header.kind

    def numel(self) -> int:
        return sum(c.numel() for c in self.modules.values())

    def cast(self, dtype: torch.dtype) -> "ErasedWeights":
        """The same erasure with its tensors rounded to ``dtype`` (what a file saved in that dtype holds)."""
        name = next(k for k, v in SAVE_DTYPES.items() if v == dtype)
        return ErasedWeights(header=dataclasses.replace(self.header, save_dtype=name),
                             modules={s: c.cast(dtype) for s, c in self.modules.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as the file stores them (format version 2 keys), for writing or for a LoRA loader."""
        out: dict[str, torch.Tensor] = {}
        for stem, change in self.modules.items():
            if change.lora is not None:
                out[f"{stem}.lora_down.weight"] = change.lora.down
                out[f"{stem}.lora_up.weight"] = change.lora.up
                out[f"{stem}.alpha"] = torch.tensor(float(change.lora.alpha))
            if change.weight is not None:
                out[f"{stem}.diff"] = change.weight
            if change.bias is not None and change.lora is None:
                out[f"{stem}.diff_b"] = change.bias
        return out


def file_key(ldm_param_name: str) -> str:
    """The file key of an LDM UNet parameter: ``x.y.weight`` -> ``lora_unet_x_y.diff``, ``x.y.bias`` -> ``...diff_b``."""
    module, _, leaf = ldm_param_name.rpartition(".")
    if leaf not in ("weight", "bias") or not module:
        raise ErasedWeightsError(f"parameter {ldm_param_name!r} is neither a weight nor a bias; "
                                 "LoRA loaders cannot express it")
    return f"{module_stem(module)}.{'diff' if leaf == 'weight' else 'diff_b'}"


def parse_save_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise ErasedWeightsError(f"save dtype {name!r} is not one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[name]


def save_erased_weights(path: str | os.PathLike, erased: ErasedWeights, save_dtype: str = DEFAULT_SAVE_DTYPE) -> Path:
    """Write ``erased`` to a new file (format version 2, tensors in ``save_dtype``: fp16, bf16 or fp32), atomically;
    an existing file is never replaced. fp32 keeps the trained differences exactly."""
    if not erased.modules:
        raise ErasedWeightsError("nothing to save: the erasure changed no tensor")
    bias_only = [s for s, c in erased.modules.items() if c.weight is None and c.lora is None]
    if bias_only:  # A1111 accepts a diff_b only beside a diff (network_full)
        raise ErasedWeightsError(f"module {bias_only[0]!r} changes only its bias; A1111 cannot load a bias "
                                 "difference without its weight's, so such an erasure cannot be saved")
    stored = erased.cast(parse_save_dtype(save_dtype))
    tensors = stored.tensors()
    overflow = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if overflow:
        raise ErasedWeightsError(f"{overflow[0]!r} does not fit in {save_dtype} (values too large); "
                                 "save with save_dtype bf16 or fp32")
    header = dataclasses.replace(stored.header, format_version=FORMAT_VERSION)
    return write_new_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header.to_metadata()))


def read_header(path: str | os.PathLike) -> ErasedWeightsHeader:
    """Read and validate only the header (cheap: no tensor is loaded)."""
    with _open(path) as f:
        return ErasedWeightsHeader.from_metadata(f.metadata(), source=str(path))


def load_erased_weights(path: str | os.PathLike) -> ErasedWeights:
    """Load and validate a file of any kind and version: header, key names, tensor dtypes, shapes and finiteness."""
    with _open(path) as f:
        header = ErasedWeightsHeader.from_metadata(f.metadata(), source=str(path))
        try:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise ErasedWeightsError(f"{path} is damaged ({e}); re-run the erasure to write a new file") from None
    if not tensors:
        raise ErasedWeightsError(f"{path} holds no tensors; the file is damaged")
    for key, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ErasedWeightsError(f"{path}: tensor {key!r} is not finite floating point; the file is damaged")
    modules = _modules_from_tensors(tensors, header, str(path))
    erased = ErasedWeights(header=header, modules=modules)
    has_lora = any(c.lora is not None for c in modules.values())
    if has_lora != (header.kind == KIND_LORA):
        raise ErasedWeightsError(f"{path}: its header says kind {header.kind!r} but its tensors are "
                                 f"{'a LoRA' if has_lora else 'full differences'}; the file is damaged")
    return erased


def _modules_from_tensors(tensors: Mapping[str, torch.Tensor], header: ErasedWeightsHeader,
                          source: str) -> dict[str, ModuleChange]:
    """Group a file's tensors by module stem (v1 keys converted forward to stems) and check each module's parts."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    forms = set()
    for key, t in tensors.items():
        if m := _V2_KEY.match(key):
            forms.add(2)
            stem, part = m.group(1), m.group(2)
        elif m := _V1_KEY.match(key):
            forms.add(1)
            stem, part = module_stem(m.group(1)), m.group(2)
        else:
            raise ErasedWeightsError(
                f"{source}: unexpected tensor {key!r}; erased-weights keys are lora_unet_<module>.diff/.diff_b/"
                ".lora_down.weight/.lora_up.weight/.alpha (or, in version 1 files, diffusion_model.<module>.diff)")
        if part in parts.setdefault(stem, {}):
            raise ErasedWeightsError(f"{source}: {key!r} repeats a tensor of module {stem!r} under another key form")
        parts[stem][part] = t
    if forms != {header.format_version}:
        raise ErasedWeightsError(
            f"{source} mixes key forms: its header says format version {header.format_version} but it holds "
            + " and ".join(f"version {v} keys" for v in sorted(forms)) + "; the file is damaged or was edited")
    return {stem: _module_change(stem, p, source) for stem, p in parts.items()}


def _module_change(stem: str, p: dict[str, torch.Tensor], source: str) -> ModuleChange:
    lora_parts = {"lora_down.weight", "lora_up.weight", "alpha"} & p.keys()
    if not lora_parts:
        return ModuleChange(weight=p.get("diff"), bias=p.get("diff_b"))
    if "diff" in p or "diff_b" in p:
        raise ErasedWeightsError(f"{source}: module {stem!r} mixes a full difference and a LoRA; loaders disagree "
                                 "on what such a module means, so the file is refused")
    if not {"lora_down.weight", "lora_up.weight"} <= p.keys():
        raise ErasedWeightsError(f"{source}: module {stem!r} has {sorted(lora_parts)} but not both lora_down and "
                                 "lora_up; the file is damaged")
    down, up = p["lora_down.weight"], p["lora_up.weight"]
    if (down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]
            or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1))):
        raise ErasedWeightsError(f"{source}: module {stem!r} has LoRA factors of shapes {tuple(down.shape)} (down) "
                                 f"and {tuple(up.shape)} (up) that do not multiply; the file is damaged")
    alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])  # no alpha: scale 1, as every loader reads it
    return ModuleChange(lora=LoRAFactors(down=down, up=up, alpha=alpha))


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise ErasedWeightsError(f"erased-weights file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ErasedWeightsError(f"{path} is damaged or not a safetensors file ({e}); "
                                 "re-run the erasure to write a new file") from None


def resolve(erased: ErasedWeights, target_shapes: Mapping[str, torch.Size],
            target_family: str | None = None) -> dict[str, str]:
    """Stem -> LDM module path of the target model, for every module of the erasure, checked against the target's
    parameter shapes (keyed by LDM parameter name). Refuses a file whose modules the target lacks or has in another
    shape (another architecture), or whose stem two of the target's modules share."""
    made_for = f"made for a {erased.header.model_family} model ({erased.header.base_model})"
    target = f" (target: {target_family})" if target_family else ""
    stems = stems_of(target_shapes)
    missing = [s for s in erased.modules if s not in stems]
    if missing:
        raise ErasedWeightsError(f"this erased-weights file was {made_for}: the target model{target} has no module "
                                 f"{missing[0]!r} ({len(missing)} of {len(erased.modules)} modules missing)")
    ambiguous = [s for s in erased.modules if stems[s] is None]
    if ambiguous:
        raise ErasedWeightsError(f"key {ambiguous[0]!r} names more than one module of the target model{target} "
                                 "(their names differ only in dots and underscores); it cannot be applied")
    resolved = {s: stems[s] for s in erased.modules}
    for stem, change in erased.modules.items():
        module = resolved[stem]
        for leaf, shape in (("weight", change.weight_shape()), ("bias", None if change.bias is None else
                                                                change.bias.shape)):
            if shape is None:
                continue
            want = target_shapes.get(f"{module}.{leaf}")
            if want is None or tuple(want) != tuple(shape):
                have = "has none" if want is None else f"is {tuple(want)}"
                raise ErasedWeightsError(f"this erased-weights file was {made_for}: {stem!r} changes a {leaf} of "
                                         f"shape {tuple(shape)}, but {module}.{leaf} in the target model{target} "
                                         f"{have}")
    return resolved


def dense_diffs(erased: ErasedWeights, resolved: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The erasure as float32 dense differences keyed by the target's LDM parameter names (LoRAs multiplied out)."""
    out: dict[str, torch.Tensor] = {}
    for stem, change in erased.modules.items():
        module = resolved[stem]
        delta = change.weight_delta()
        if delta is not None:
            out[f"{module}.weight"] = delta
        if change.bias is not None and change.lora is None:
            out[f"{module}.bias"] = change.bias.float()
    return out


def base_parameter_names(erased: ErasedWeights, resolved: Mapping[str, str],
                         target_names: Iterable[str]) -> list[str]:
    """LDM names of the target's parameters the header's ``base_tensors_hash`` covers: those the erasure changes and
    those it dropped (`ErasedWeightsHeader.dropped`) when the target has them."""
    names = set(_dense_diff_names(erased, resolved))
    stems = stems_of(target_names)
    for key in erased.header.dropped:
        stem, _, part = key.rpartition(".")
        if stems.get(stem):
            names.add(f"{stems[stem]}.{'bias' if part == 'diff_b' else 'weight'}")
    return sorted(names)


def _dense_diff_names(erased: ErasedWeights, resolved: Mapping[str, str]) -> list[str]:
    """LDM parameter names `dense_diffs` would return, without computing any tensor."""
    names = []
    for stem, change in erased.modules.items():
        if change.weight is not None or change.lora is not None:
            names.append(f"{resolved[stem]}.weight")
        if change.bias is not None and change.lora is None:
            names.append(f"{resolved[stem]}.bias")
    return names


def matches_base(erased: ErasedWeights, base_values) -> bool:
    """Whether a target's weights (``base_values``: the `base_parameter_names`, a mapping or (name, tensor) pairs) are
    the base the erasure was trained on, up to rounding (`esd_core.weights.same_weights` on the header's
    fingerprint). Files without a fingerprint (written before it existed) are compared by their exact hash."""
    if erased.header.base_fingerprint:
        return same_weights(erased.header.base_fingerprint, weights_fingerprint(base_values))
    return tensors_hash(dict(base_values)) == erased.header.base_tensors_hash


def base_mismatch_warning(erased: ErasedWeights, base_values) -> str | None:
    """A warning if the target's weights (``base_values``: the `base_parameter_names`) differ from the recorded base,
    else None. Applying an erasure to a fine-tune of its base can be intended, so this warns rather than refuses."""
    if matches_base(erased, base_values):
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
    """Apply an erasure of any kind in place: ``w = base + strength * diff`` for every changed tensor.

    Refuses (before changing anything) a file that does not fit the module; returns a warning string when the module's
    base weights differ from the ones the erasure was trained on, else None.
    """
    local = module_ldm_names(module, naming)
    params = dict(module.named_parameters())
    by_ldm = {ldm: params[n] for ldm, n in local.items()}
    resolved = resolve(erased, {ldm: p.shape for ldm, p in by_ldm.items()}, family)
    names = base_parameter_names(erased, resolved, by_ldm)
    warning = base_mismatch_warning(erased, {n: by_ldm[n].data for n in names})
    for ldm, diff in dense_diffs(erased, resolved).items():
        p = by_ldm[ldm]
        p.data = merged_weight(p.data, diff, strength)
    return warning
