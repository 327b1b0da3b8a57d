"""The web UI extension's host-independent parts: request parsing (the node's names, defaults and messages) and the
job queue (order, states, cancelling). The host glue is proven inside the real hosts (tests/webui_host)."""
import threading
import time

import pytest

from esd_core.config import ESDConfig, Method, SampleWith, fast
from esd_core.errors import ConfigError, ErasureCancelled
from webui_ext.jobs import JobQueue, JobState
from webui_ext.request import DEFAULT_PREFIX, parse_request


def test_missing_fields_take_the_nodes_defaults():
    request = parse_request({"concept": "a painting by Van Gogh\n\n  a starry night  "})
    assert request.config == ESDConfig(concepts=("a painting by Van Gogh", "a starry night"))
    assert request.config.method == Method.ESD_X and request.config.iterations == 1000
    assert request.config.learning_rate == 1e-5 and request.config.sample_with == SampleWith.TRAINED
    assert request.filename_prefix == DEFAULT_PREFIX == "ESD_erased" and request.gradient_checkpointing is False


def test_every_field_is_passed_through():
    request = parse_request({"concept": "a cat", "method": "noxattn", "iterations": 7, "learning_rate": 3e-4,
                             "negative_guidance": 2, "start_guidance": 5.5, "ddim_steps": 10, "resolution": 256,
                             "seed": 9, "filename_prefix": "my cat", "sample_with": "frozen",
                             "erase_from": "an animal", "gradient_checkpointing": True, "training_dtype": "bf16",
                             "lora_rank": 4, "optimizer": "adafactor", "checkpoint_every": 50, "resume": True,
                             "save_dtype": "fp32"})
    c = request.config
    assert (c.method, c.iterations, c.learning_rate, c.negative_guidance, c.start_guidance, c.ddim_steps,
            c.resolution, c.seed, c.sample_with, c.erase_from) == (
        Method.ESD_U, 7, 3e-4, 2.0, 5.5, 10, 256, 9, SampleWith.FROZEN, ("an animal",))
    assert request.filename_prefix == "my cat" and request.gradient_checkpointing is True
    assert (request.training_dtype, request.checkpoint_every, request.resume, request.save_dtype) == (
        "bf16", 50, True, "fp32")
    assert (c.lora_rank, c.optimizer.value) == (4, "adafactor")


def test_fast_mode_is_the_cores_preset():
    assert parse_request({"concept": "a cat", "fast": True}).config == fast(ESDConfig(concepts=("a cat",)))
    assert parse_request({"concept": "a cat"}).config.trajectory_pool == 0


@pytest.mark.parametrize("body, message", [
    ({}, "no concept given"),
    ({"concept": "a cat", "ddim_steps": 1}, "ddim_steps must be at least 2"),
    ({"concept": "a cat", "iterations": 2.5}, "iterations must be an int (got 2.5)"),
    ({"concept": "a cat", "iterations": True}, "iterations must be an int"),
    ({"concept": 3}, "concept must be a str"),
    ({"concept": "a cat", "gradient_checkpointing": "yes"}, "gradient_checkpointing must be a bool"),
    ({"concept": "a cat", "sample_with": "teacher"}, "sample_with must be one of ['trained', 'frozen']"),
    ({"concept": "a cat", "filename_prefix": "  "}, "filename_prefix is empty"),
    ({"concept": "a cat", "filename_prefix": "a/b"}, "must be a plain name"),
    ({"concept": "a cat", "filename_prefix": "x..y"}, "must be a plain name"),
    ({"concept": "a cat", "iteration": 5}, "unknown field(s) ['iteration']"),
    ({"concept": "a cat", "training_dtype": "fp8"}, "training_dtype must be one of ['auto', 'bf16', 'fp16']"),
    ({"concept": "a cat", "save_dtype": "int8"}, "save_dtype must be one of ['fp16', 'bf16', 'fp32']"),
    ({"concept": "a cat", "checkpoint_every": -1}, "checkpoint_every must be >= 0"),
    ({"concept": "a cat", "lora_rank": -2}, "lora_rank must be >= 0"),
    ({"concept": "a cat", "optimizer": "sgd"}, "optimizer must be one of"),
    (None, "must be a JSON object"),
])
def test_bad_fields_get_the_nodes_messages(body, message):
    with pytest.raises(ConfigError) as e:
        parse_request(body)
    assert message in str(e.value)


def test_a_whole_number_float_is_an_int():
    assert parse_request({"concept": "a cat", "iterations": 20.0}).config.iterations == 20


def _wait(job, states=(JobState.DONE, JobState.CANCELLED, JobState.FAILED), timeout=10):
    deadline = time.monotonic() + timeout
    while job.state not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.005)
    return job


def test_jobs_run_one_at_a_time_in_order_and_report_failures():
    order, gate = [], threading.Event()

    def work(job):
        order.append(job.request)
        if job.request == "first":
            gate.wait(5)
        if job.request == "broken":
            raise RuntimeError("the model went away")
        job.file = f"{job.request}_00001_"

    jobs = JobQueue(work)
    first, broken, last = (jobs.submit(name, total=1) for name in ("first", "broken", "last"))
    _wait(first, (JobState.RUNNING,))
    assert (broken.state, last.state) == (JobState.QUEUED, JobState.QUEUED)
    gate.set()
    assert _wait(last).state == JobState.DONE and order == ["first", "broken", "last"]
    assert (broken.state, broken.error, broken.file) == (JobState.FAILED, "the model went away", "")
    assert first.to_json() == {"job_id": "esd-1", "state": "done", "step": 0, "total": 1, "loss": None, "error": "",
                               "file": "first_00001_", "usage": "<lora:first_00001_:1>"}
    assert [j.id for j in jobs.jobs()] == ["esd-1", "esd-2", "esd-3"] and jobs.get("esd-9") is None


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts():
    started = []

    def work(job):
        started.append(job.id)
        while not job.cancel_requested:  # the trainer's should_cancel, checked between iterations
            time.sleep(0.005)
        raise ErasureCancelled("cancelled")

    jobs = JobQueue(work)
    running, waiting = jobs.submit("a", total=5), jobs.submit("b", total=5)
    _wait(running, (JobState.RUNNING,))
    assert jobs.cancel(waiting.id).state == JobState.CANCELLED
    assert jobs.cancel(running.id).state == JobState.RUNNING
    assert _wait(running).state == JobState.CANCELLED and running.file == ""
    time.sleep(0.05)
    assert started == [running.id] and waiting.state == JobState.CANCELLED
    assert jobs.cancel(running.id).state == JobState.CANCELLED  # cancelling a finished job changes nothing
    assert jobs.cancel("esd-404") is None
