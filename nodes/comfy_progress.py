"""ComfyUI glue, progress side: the progress bar (which also makes Cancel work) and text under a node."""
from __future__ import annotations

import comfy.utils


class TrainingProgress:
    """Progress bar (which also makes Cancel work) and a loss line under the node."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id

    def __call__(self, progress) -> None:
        self.bar.update_absolute(progress.step, progress.total)
        if progress.step % 5 == 1 or progress.step == progress.total:  # every few steps: the text is for people
            show_text(f"step {progress.step}/{progress.total}  loss {progress.loss:.4g}  "
                      f"{progress.elapsed:.0f}s", self.node_id)


def show_text(text: str, node_id: str | None) -> None:
    """A line of text under the node in the browser (ComfyUI's progress-text channel)."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):  # headless use without a server
        pass
