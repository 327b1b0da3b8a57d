"""ComfyUI glue, progress side: what a node shows while it runs.

A training node gets ComfyUI's progress bar (whose hook also makes Cancel work), a text line under the node, the
live view's ``esd.progress`` messages (drawn by web/js/esd_live_view.js) and preview images through ComfyUI's own
preview-image channel. The messages carry the node id, the prompt id, the phase, step, total, the latest loss and
the loss points since the previous message; they are batched to at most ten a second however fast the iterations
are (`message_batcher`), and go only to the client that queued the prompt.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy.cli_args import args as comfy_args
from comfy_execution.utils import get_executing_context

from ..esd_core.errors import ErasureCancelled
from .loss_plot import final_image
from .message_batcher import MessageBatcher
from .v3 import ui

EVENT = "esd.progress"


class TrainingView:
    """Everything a training node shows while it runs, fed by the core's ``on_progress(Progress)`` and ``on_phase``
    callbacks and the node's own phases. As a context manager it reports how the run ended: an exception leaving the
    block is sent as "cancelled" (ComfyUI's Cancel) or "failed", with what was kept."""

    def __init__(self, total: int, node_id: str | None, preview_every: int = 0):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id
        self.total = total
        self.preview_every = preview_every
        self.preview: Callable[[], object] | None = None  # () -> PIL image of the model as it is now
        self.previews: list[tuple[int, object]] = []  # (step, image): the first and the latest are kept
        self.step, self.loss, self.saved = 0, None, None  # the latest training point; the saved file
        self.kept: str | None = None  # what a stopped run keeps besides a saved file (e.g. a resumable checkpoint)
        self.server, self.sid = _server_and_client()
        context = get_executing_context()
        self.prompt_id = context.prompt_id if context is not None else getattr(self.server, "last_prompt_id", None)
        self.batcher = None
        if self.server is not None and self.sid is not None and node_id is not None:
            loop = self.server.loop
            self.batcher = MessageBatcher(lambda m: self.server.send_sync(EVENT, m, self.sid), loop.time,
                                          loop.call_later)

    # ---------------------------------------------------------------- reports
    def __call__(self, progress) -> None:
        """The core's on_progress, after every iteration."""
        points = []
        if progress.step > self.step and math.isfinite(progress.loss):
            points = [[progress.step, progress.loss]]
            self.step, self.loss = progress.step, progress.loss
        self.bar.update_absolute(progress.step, progress.total)
        if progress.step % 5 == 1 or progress.step == progress.total:  # every few steps: the text is for people
            show_text(f"step {progress.step}/{progress.total}  loss {progress.loss:.4g}  "
                      f"{progress.elapsed:.0f}s", self.node_id)
        self._post("training", points, elapsed=progress.elapsed)
        if self.preview is not None and points and (progress.step % self.preview_every == 0
                                                    or progress.step == progress.total):
            self._show_preview(progress.step)

    def phase(self, name: str) -> None:
        """A phase starts: the node's own ("encoding", "loading", "saving") and the core's (its on_phase)."""
        self._post(name, [])

    def start_preview(self, preview: Callable[[], object]) -> None:
        """Preview the model before training (step 0), then every `preview_every` iterations and at the end."""
        self.preview = preview
        self._show_preview(0)

    def done(self, saved: str, losses: list[float], summary: str) -> dict:
        """The run succeeded: send the end state and return the node's ui (the summary and the final image, a
        preview in ComfyUI's temp folder: nothing is added to the output folder)."""
        self.saved = saved
        self._post("done", [], message=summary, file=saved)
        image = final_image(losses, self.previews)
        self.bar.update_absolute(self.total, self.total, ("PNG", image, None))  # shown on the node at once
        return {"images": _temp_preview(image), "text": (summary,)}

    def __enter__(self) -> "TrainingView":
        self.phase("loading")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        kept = f"{self.saved} was saved" if self.saved else self.kept or "nothing saved"
        if issubclass(exc_type, (comfy.model_management.InterruptProcessingException, ErasureCancelled)):
            self._post("cancelled", [], message=f"cancelled at step {self.step}/{self.total}, {kept}")
        else:
            self._post("failed", [], message=f"failed at step {self.step}/{self.total}: {exc}; {kept}")

    # ---------------------------------------------------------------- internals
    def _post(self, phase: str, points: list, **extra) -> None:
        if self.batcher is None:
            return
        message = {"node": self.node_id, "prompt_id": self.prompt_id, "phase": phase, "step": self.step,
                   "total": self.total, "loss": self.loss, "points": points, "preview_every": self.preview_every,
                   **extra}
        self.server.loop.call_soon_threadsafe(self.batcher.post, message)

    def _show_preview(self, step: int) -> None:
        image = self.preview()
        self.previews = [*self.previews[:1], (step, image)]
        # at most the server's --preview-size, as its samplers' previews; ComfyUI scales a preview to fit the size
        # given (up, too), so a smaller one is given its own
        side = min(max(image.size), comfy_args.preview_size)
        self.bar.update_absolute(step, self.total, ("JPEG", image, side))


def _server_and_client():
    """ComfyUI's server and the id of the client that queued the running prompt (None when there is none)."""
    try:
        from server import PromptServer
    except ImportError:  # headless use without a server
        return None, None
    server = PromptServer.instance
    return server, getattr(server, "client_id", None)


def _temp_preview(image) -> list:
    """Save a PIL image as a temp-folder preview and return its ui entries (what ComfyUI's PreviewImage does)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
    return ui.PreviewImage(pixels).as_dict()["images"]


def show_text(text: str, node_id: str | None) -> None:
    """A line of text under the node in the browser (ComfyUI's progress-text channel), to the queuing client."""
    server, sid = _server_and_client()
    if node_id is not None and server is not None:
        server.send_progress_text(text, node_id, sid)
