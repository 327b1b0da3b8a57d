"""Erasure jobs: a FIFO worked by one background thread, with the states the API reports. Pure Python: the work
itself (a callable) comes from the host glue, which runs it inside the host's own job queue.
"""
from __future__ import annotations

import enum
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from esd_core.errors import ErasureCancelled

log = logging.getLogger("esd")


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


FINISHED = (JobState.DONE, JobState.CANCELLED, JobState.FAILED)


@dataclass
class Job:
    """One erasure as the API reports it. ``file`` is the name ``<lora:NAME:1>`` takes once done."""

    id: str
    request: Any
    state: JobState = JobState.QUEUED
    step: int = 0
    total: int = 0
    loss: float | None = None
    error: str = ""
    file: str = ""
    cancel_requested: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {"job_id": self.id, "state": self.state.value, "step": self.step, "total": self.total,
               "loss": self.loss, "error": self.error, "file": self.file}
        if self.state == JobState.DONE:
            out["usage"] = f"<lora:{self.file}:1>"
        return out


#: (job) -> None: trains, saves, sets ``job.file``; raises `ErasureCancelled` when cancelled.
Work = Callable[[Job], None]


class JobQueue:
    """Jobs run one at a time, in submission order, on a daemon thread started with the first job."""

    def __init__(self, work: Work):
        self._work = work
        self._jobs: dict[str, Job] = {}
        self._pending: queue.Queue[Job] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, request: Any, total: int) -> Job:
        with self._lock:
            job = Job(id=f"esd-{next(self._ids)}", request=request, total=total)
            self._jobs[job.id] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="esd-jobs", daemon=True)
                self._thread.start()
        self._pending.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop: a queued job never starts, a running one stops within an iteration."""
        job = self._jobs.get(job_id)
        if job is not None and job.state not in FINISHED:
            job.cancel_requested = True
            if job.state == JobState.QUEUED:
                job.state = JobState.CANCELLED
        return job

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job.cancel_requested:
                job.state = JobState.CANCELLED
                continue
            job.state = JobState.RUNNING
            try:
                self._work(job)
                job.state = JobState.DONE
            except ErasureCancelled:
                job.state = JobState.CANCELLED
            except Exception as e:  # a failed job is reported through the API; the worker keeps serving
                log.exception("ESD job %s failed", job.id)
                job.error = str(e) or type(e).__name__
                job.state = JobState.FAILED
