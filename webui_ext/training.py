"""One erasure inside a web UI, whichever host: the host's queue, its progress and Interrupt, the core's trainer on the
loaded model, the file into the host's Lora folder, the Lora list refreshed.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

from esd_core.config import RunOptions
from esd_core.erased_weights import save_erased_weights
from esd_core.errors import ErasureCancelled
from esd_core.resume import checkpoint_path_for
from esd_core.trainer import Progress, erase

from .jobs import Job, JobQueue
from .request import TRAINING_DTYPES, EraseRequest

log = logging.getLogger("esd")
ESD_SUBFOLDER = "esd"


def host_glue() -> ModuleType:
    """The running host's glue module: Forge (which has ``modules_forge``) or AUTOMATIC1111."""
    if importlib.util.find_spec("modules_forge") is not None:
        from . import forge
        return forge
    from . import a1111
    return a1111


def lora_folder() -> Path:
    """Where the host's Lora loader looks: ``--lora-dir``, by default ``models/Lora``."""
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))


def new_file_path(folder: Path, prefix: str) -> Path:
    """``<folder>/<prefix>_NNNNN_.safetensors`` with the next free counter (ComfyUI's naming, as the nodes save)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d{{5}})_\.safetensors$")
    used = [int(m.group(1)) for p in folder.glob("*.safetensors") if (m := pattern.match(p.name))] if folder.is_dir() \
        else []
    return folder / f"{prefix}_{max(used, default=0) + 1:05}_.safetensors"


def refresh_loras() -> None:
    """What ``/sdapi/v1/refresh-loras`` does: the host's Lora extension re-reads its folder."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


class StateProgress:
    """Reports to the job (for the API and the tab) and to ``shared.state`` (the host's own progress)."""

    def __init__(self, job: Job, state):
        self.job, self.state = job, state
        self.concepts = ", ".join(job.request.config.concepts)

    def __call__(self, p: Progress) -> None:
        self.job.step, self.job.total, self.job.loss = p.step, p.total, p.loss
        self.state.sampling_step, self.state.sampling_steps = p.step, p.total
        self.state.textinfo = f"ESD erasing {self.concepts}: step {p.step}/{p.total}, loss {p.loss:.4g}"

    def should_cancel(self) -> bool:
        return self.job.cancel_requested or bool(self.state.interrupted)


def run_job(job: Job) -> None:
    """The queue's work: train on the host's loaded model inside its job queue, then save and list the file."""
    glue = host_glue()
    glue.run_queued(lambda: _train_and_save(job, glue))
    refresh_loras()


def _train_and_save(job: Job, glue: ModuleType) -> None:
    from modules import shared

    request: EraseRequest = job.request
    state = shared.state
    state.begin(job="ESD erase")
    state.job_count = 1
    progress = StateProgress(job, state)
    try:
        if progress.should_cancel():
            raise ErasureCancelled("erasure cancelled before it started; nothing was saved")
        folder = lora_folder() / ESD_SUBFOLDER
        # one resumable checkpoint per prefix (as the nodes keep it): esd/<prefix>.esd-resume
        checkpoint = checkpoint_path_for(folder / f"{request.filename_prefix}.safetensors") \
            if request.checkpoint_every or request.resume else None
        options = RunOptions(gradient_checkpointing=request.gradient_checkpointing, checkpoint=checkpoint,
                             checkpoint_every=request.checkpoint_every, resume=request.resume)
        with torch.inference_mode(False), torch.enable_grad():
            dtype_name = TRAINING_DTYPES[request.training_dtype]
            adapter = glue.make_adapter(getattr(torch, dtype_name) if dtype_name else None)
            with glue.training_context(adapter):
                result = erase(adapter, request.config, options=options, on_progress=progress,
                               should_cancel=progress.should_cancel)
            erased = result.to_erased_weights(adapter)
        path = new_file_path(folder, request.filename_prefix)
        save_erased_weights(path, erased, request.save_dtype)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # finished and saved: nothing left to resume
        job.file = path.stem
        log.info("ESD: erased %s with %s in %.0fs, saved %s", list(request.config.concepts),
                 request.config.method.value, result.seconds, path)
    finally:
        state.end()


#: The one queue of the extension: the tab and the API submit to it.
JOBS = JobQueue(run_job)
