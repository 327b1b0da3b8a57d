"""Resumable training: the whole state of a run at an iteration boundary, in one safetensors file.

A checkpoint holds the trained tensors (or LoRA adapters), the optimizer's and the loss scaler's state, both random
streams, the x_t source's state (a trajectory pool's latents), the iteration and the losses so far, and the settings
and the base weights' hash it belongs to. Resuming from it continues the run exactly: the result equals an
uninterrupted run with the same seed. Only tensors and JSON are stored (never pickle), and the file is replaced
atomically, so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ESDConfig
from .errors import ResumeError
from .files import replace_file

FORMAT_ID = "esd-resume"
FORMAT_VERSION = 1
#: Checkpoints are kept beside the output under this suffix: not ``.safetensors``, so that no LoRA or model list
#: (ComfyUI's, A1111's) ever offers one as a model.
SUFFIX = ".esd-resume"


def checkpoint_path_for(output: str | os.PathLike) -> Path:
    """The checkpoint that belongs to an output file: ``x.safetensors`` -> ``x.esd-resume``."""
    output = Path(output)
    return output.with_name(output.stem + SUFFIX)


@dataclass
class RunState:
    """Everything that decides how a run continues, at the end of an iteration."""

    iteration: int
    losses: list[float]
    rng: Any                      # random.Random.getstate()
    noise: torch.Tensor           # torch.Generator.get_state()
    source: dict                  # the x_t source's state_dict (tensors and plain values)
    trainables: dict[str, torch.Tensor]
    optimizer: dict               # the optimizer's state_dict
    scaler: dict                  # the GradScaler's state_dict


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed: the run's settings and its base weights."""

    config: ESDConfig
    base_tensors_hash: str
    base_model: str

    def mismatch(self, saved: dict) -> str | None:
        """Which setting or base differs from a saved identity, in words, or None."""
        mine = self.config.to_dict()
        theirs = saved.get("config", {})
        diffs = [f"{k}={theirs.get(k)!r} (this run: {mine.get(k)!r})" for k in sorted(set(mine) | set(theirs))
                 if mine.get(k) != theirs.get(k)]
        if saved.get("base_tensors_hash") != self.base_tensors_hash:
            diffs.append(f"base model {saved.get('base_model')!r} with other weights (this run: {self.base_model!r})")
        return "; ".join(diffs) or None


def save_checkpoint(path: str | os.PathLike, state: RunState, identity: Identity) -> Path:
    """Write (atomically replacing) the checkpoint at ``path``."""
    tensors: dict[str, torch.Tensor] = {"noise": state.noise}
    tensors.update({f"trained/{k}": v for k, v in state.trainables.items()})
    source = _split("source", state.source, tensors)
    optimizer = _split("optimizer", {str(k): v for k, v in state.optimizer["state"].items()}, tensors)
    meta = {"format": FORMAT_ID, "version": FORMAT_VERSION, "config": identity.config.to_dict(),
            "base_tensors_hash": identity.base_tensors_hash, "base_model": identity.base_model,
            "iteration": state.iteration, "losses": state.losses, "rng": _jsonable(state.rng),
            "source": source, "optimizer": optimizer, "scaler": _jsonable(state.scaler)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"esd.resume": json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike, identity: Identity) -> RunState:
    """Read a checkpoint and check it belongs to this run; a `ResumeError` says what is wrong and what to do."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("esd.resume", "{}"))
            if meta.get("format") != FORMAT_ID:
                raise ResumeError(f"{path} is not an ESD resume checkpoint; delete it or choose another name")
            if meta.get("version", 0) > FORMAT_VERSION:
                raise ResumeError(f"{path} was written by a newer version of this pack; update it or start over")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ResumeError(f"resume checkpoint {path} is damaged ({e}); delete it to start over") from None
    mismatch = identity.mismatch(meta)
    if mismatch:
        raise ResumeError(f"resume checkpoint {path} belongs to another run: {mismatch}. Resume with the same "
                          "settings and model, or delete the checkpoint (or turn resume off) to start over")
    try:
        rng = meta["rng"]
        optimizer = _join("optimizer", meta["optimizer"], tensors)
        return RunState(iteration=meta["iteration"], losses=list(meta["losses"]),
                        rng=(rng[0], tuple(rng[1]), rng[2]), noise=tensors["noise"],
                        source=_join("source", meta["source"], tensors),
                        trainables={k.removeprefix("trained/"): v for k, v in tensors.items()
                                    if k.startswith("trained/")},
                        optimizer={"state": {int(k): v for k, v in optimizer.items()}}, scaler=meta["scaler"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ResumeError(f"resume checkpoint {path} is damaged ({type(e).__name__}: {e}); delete it to start "
                          "over") from None


#: In the JSON part, where a tensor stored under that safetensors key goes.
_TENSOR = "__tensor__"


def _split(prefix: str, tree: dict, tensors: dict[str, torch.Tensor]):
    """Move the tensors of a nested dict into ``tensors`` (keyed by their path); return the rest as JSON data."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {_TENSOR: prefix}
    if isinstance(tree, dict):
        return {str(k): _split(f"{prefix}/{k}", v, tensors) for k, v in tree.items()}
    return _jsonable(tree)


def _join(prefix: str, data, tensors: dict[str, torch.Tensor]):
    """Inverse of `_split`."""
    if isinstance(data, dict):
        if set(data) == {_TENSOR}:
            return tensors[data[_TENSOR]]
        return {k: _join(f"{prefix}/{k}", v, tensors) for k, v in data.items()}
    return data


def _jsonable(value):
    """Tuples as lists, recursively (JSON has no tuples); numbers and strings as they are."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
