"""ComfyUI glue, files side: where erasures and checkpoints are saved and listed, and applying an erasure to a MODEL
as ComfyUI weight patches."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.model_base
import comfy.sd
import folder_paths
from comfy.cli_args import args as comfy_args

from ..esd_core.erased_weights import (DEFAULT_SAVE_DTYPE, ErasedWeights, base_parameter_names, matches_base,
                                       resolve, save_erased_weights)
from ..esd_core.errors import ESDError
from ..esd_core.files import write_new_file
from ..esd_core.resume import checkpoint_path_for
from .comfy_model import patched_weights, supported_model

ESD_SUBFOLDER = "esd"
#: model_options key under which a MODEL carries the headers of erasures applied to it (deep-copied by clone()).
ERASURES_KEY = "esd_erasures"


def _save_target(folder_kind: str, prefix: str) -> tuple[str, Path, str, int]:
    """(root, folder, file stem, next free counter) for files named by ``prefix`` under ``<folder_kind>/esd``."""
    root = folder_paths.get_folder_paths(folder_kind)[0]
    base = os.path.join(root, ESD_SUBFOLDER)
    if not prefix.strip():
        raise ESDError("filename_prefix is empty; give a name such as 'van_gogh'")
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, base)
    except Exception as e:  # ComfyUI raises a bare Exception for paths outside the folder
        raise ESDError(f"filename_prefix {prefix!r} points outside the {folder_kind}/{ESD_SUBFOLDER} folder ({e}); "
                       "use a plain name such as 'van_gogh'") from None
    return root, Path(folder), filename, counter


def _save_path(folder_kind: str, prefix: str) -> tuple[Path, str]:
    """A new ``<folder>/esd/<prefix>_NNNNN_.safetensors`` path and its name as ComfyUI's loaders list it."""
    root, folder, filename, counter = _save_target(folder_kind, prefix)
    path = folder / f"{filename}_{counter:05}_.safetensors"
    return path, Path(os.path.relpath(path, root)).as_posix()


def erased_weights_path(prefix: str) -> tuple[Path, str]:
    return _save_path("loras", prefix)


def resume_checkpoint_path(prefix: str) -> Path:
    """Where a run with this filename prefix keeps its resumable checkpoint (one per prefix, not numbered)."""
    _, folder, filename, _ = _save_target("loras", prefix)
    return checkpoint_path_for(folder / f"{filename}.safetensors")


def listed_name(path: Path) -> str:
    """A file under the loras folder as the UI names it (``esd/x.esd-resume``)."""
    return Path(os.path.relpath(path, folder_paths.get_folder_paths("loras")[0])).as_posix()


def save_erasure(erased: ErasedWeights, prefix: str, save_dtype: str = DEFAULT_SAVE_DTYPE) -> str:
    """Save under ``loras/esd/<prefix>_NNNNN_.safetensors``; returns the name the LoRA loaders list it under."""
    path, listed_name = erased_weights_path(prefix)
    save_erased_weights(path, erased, save_dtype=save_dtype)
    return listed_name


def erased_weight_files() -> list[str]:
    """Erased-weights files of every kind (full, trained or exported LoRA) as ComfyUI's LoRA loaders list them: the
    ``esd/`` subfolder of the loras folders, where the pack saves them."""
    return [f for f in folder_paths.get_filename_list("loras") if f.startswith(f"{ESD_SUBFOLDER}/")]


def full_lora_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", name)


def unet_shapes(patcher) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in patcher.model.diffusion_model.named_parameters()}


def resolve_erasure(patcher, erased: ErasedWeights) -> dict[str, str]:
    """Stem -> LDM module path of the MODEL for every module of the erasure; an `ESDError` if it does not fit."""
    family, _ = supported_model(patcher)
    return resolve(erased, unet_shapes(patcher), family.value)


def apply_erasure(patcher, erased: ErasedWeights, strength: float):
    """A clone of ``patcher`` with the erasure as ComfyUI weight patches, through the stock LoRA loader's own code
    with the file's own tensors (so the result is what LoraLoader gives, and no copy of the model is made); refused
    before anything is patched if a key does not fit the MODEL. The clone records the header for savers downstream."""
    resolve_erasure(patcher, erased)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, erased.tensors(), strength, 0)
    record = {**erased.header.to_metadata(), "esd.strength": str(strength)}
    patched.model_options[ERASURES_KEY] = [*patcher.model_options.get(ERASURES_KEY, []), record]
    return patched


def base_mismatch(patcher, erased: ErasedWeights) -> str | None:
    """Warning text if the MODEL's weights under the erasure (with the MODEL's own patches, e.g. a LoRA it was
    trained with) differ from the base it was trained on, beyond rounding."""
    names = base_parameter_names(erased, resolve_erasure(patcher, erased), unet_shapes(patcher))
    if matches_base(erased, patched_weights(patcher, names)):
        return None
    return (f"the MODEL's weights differ from the base this erasure was trained on ({erased.header.base_model}); "
            "applied anyway, results may vary")


def save_checkpoint(model, clip, vae, prefix: str, prompt=None, extra_pnginfo=None,
                    unet_dtype: torch.dtype | None = None) -> str:
    """Write a full checkpoint under ``checkpoints/esd`` (atomically, never overwriting) that the stock
    CheckpointLoaderSimple lists and loads, with the erasures applied to the MODEL in its header.

    The UNet is saved in the MODEL's own dtype (None: ComfyUI merges the patches in float32 and rounds once to the
    dtype the model was loaded in, as its CheckpointSave does), or in ``unet_dtype``: the patched weights computed in
    float32 from the loaded values and rounded once to it."""
    path, listed_name = _save_path("checkpoints", prefix)
    metadata = {"esd.erasures": json.dumps(model.model_options.get(ERASURES_KEY, []))}
    extra_keys = {}
    if unet_dtype is not None:  # comfy.sd.save_checkpoint writes extra_keys over the state dict's own tensors
        names = [n for n, _ in model.model.diffusion_model.named_parameters()]
        extra_keys |= {f"model.diffusion_model.{n}": w.to(unet_dtype) for n, w in patched_weights(model, names)}
    if isinstance(model.model, comfy.model_base.SDXL):
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm",
                         "modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": path.stem})
    if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        metadata["modelspec.predict_key"] = "v"
        extra_keys["v_pred"] = torch.tensor([])  # how ComfyUI recognises a v-prediction checkpoint on load
    else:
        metadata["modelspec.predict_key"] = "epsilon"
    if not comfy_args.disable_metadata:
        metadata["prompt"] = json.dumps(prompt) if prompt is not None else ""
        for k, v in (extra_pnginfo or {}).items():
            metadata[k] = json.dumps(v)
    write_new_file(path, lambda tmp: comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata=metadata,
                                                              extra_keys=extra_keys))
    return listed_name


@dataclass
class ErasedWeightsRef:
    """What flows through an ERASED_WEIGHTS socket: the erasure and the file it was saved to."""

    erased: ErasedWeights
    file_name: str
