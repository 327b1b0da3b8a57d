"""The ``/esd/v1`` HTTP API, added to the host's FastAPI app at start (``script_callbacks.on_app_started``).

    POST /esd/v1/erase               JSON with ESD Erase Concept's input names -> {"job_id": ...}
    GET  /esd/v1/jobs/{id}           state (queued|running|done|cancelled|failed), step, total, loss, error, file
    POST /esd/v1/jobs/{id}/cancel    stop a queued or running job (nothing is written)
    GET  /esd/v1/jobs                every job of this session

Bad input is a 400 with the message ESD Erase Concept gives for it, before anything is queued or written.
"""
from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from esd_core.errors import ESDError

from .jobs import JobQueue
from .request import parse_request

PREFIX = "/esd/v1"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_routes(app: FastAPI, jobs: JobQueue, check_model) -> None:
    """Register the routes; ``check_model()`` raises an `ESDError` when the loaded model cannot be erased from."""

    # a plain def: FastAPI runs it on a worker thread, so asking for the loaded model never blocks the event loop
    @app.post(f"{PREFIX}/erase")
    def erase(body: Any = Body(None)):
        try:
            erase_request = parse_request(body)
            check_model()
        except ESDError as e:
            return _error(400, str(e))
        job = jobs.submit(erase_request, erase_request.config.iterations)
        return {"job_id": job.id}

    @app.get(f"{PREFIX}/jobs/{{job_id}}")
    async def job_status(job_id: str):
        job = jobs.get(job_id)
        return job.to_json() if job is not None else _error(404, f"no ESD job {job_id!r}")

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel")
    async def cancel(job_id: str):
        job = jobs.cancel(job_id)
        return job.to_json() if job is not None else _error(404, f"no ESD job {job_id!r}")

    @app.get(f"{PREFIX}/jobs")
    async def all_jobs():
        return [job.to_json() for job in jobs.jobs()]
