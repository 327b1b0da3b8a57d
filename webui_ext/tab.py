"""The ESD tab: every input of ESD Erase Concept, live progress with the loss, the saved name and how to use it.
Written against the gradio API that A1111 (3.41) and Forge (4.40) share.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from esd_core.config import Method, OptimizerName, SampleWith
from esd_core.erased_weights import SAVE_DTYPES
from esd_core.errors import ESDError

from .jobs import FINISHED, Job, JobQueue, JobState
from .request import FIELDS, TRAINING_DTYPES, parse_request

#: widget order = the request fields the tab sends
TAB_FIELDS = ("concept", "erase_from", "method", "iterations", "learning_rate", "negative_guidance", "start_guidance",
              "ddim_steps", "resolution", "seed", "sample_with", "training_dtype", "gradient_checkpointing", "fast",
              "lora_rank", "optimizer", "checkpoint_every", "resume", "save_dtype", "filename_prefix")


def describe(job: Job) -> str:
    """The job as Markdown: progress and loss while it runs, the file and its prompt tag when done."""
    if job.state == JobState.DONE:
        return (f"**Done.** Saved `esd/{job.file}.safetensors` in the Lora folder (final loss {job.loss:.4g}).\n\n"
                f"Use it in a prompt: `<lora:{job.file}:1>` (strength 1 = the erasure as trained, 0 = none).")
    if job.state == JobState.FAILED:
        return f"**Failed:** {job.error}"
    if job.state == JobState.CANCELLED:
        return "**Cancelled.** Nothing was saved; the model is unchanged."
    if job.state == JobState.QUEUED:
        return "Queued: waits for the generation in progress."
    loss = f", loss {job.loss:.4g}" if job.loss is not None else ""
    return f"Erasing: step {job.step}/{job.total}{loss}"


def submit_and_watch(jobs: JobQueue, check_model: Callable[[], None], poll: float = 1.0):
    """The Erase button's handler: a generator of (status, job id) until the job finished."""

    def handler(*values) -> Iterator[tuple[str, str]]:
        try:
            request = parse_request(dict(zip(TAB_FIELDS, values)))
            check_model()
        except ESDError as e:
            yield f"**Not started:** {e}", ""
            return
        job = jobs.submit(request, request.config.iterations)
        while job.state not in FINISHED:
            yield describe(job), job.id
            time.sleep(poll)
        yield describe(job), job.id

    return handler


def build_tab(jobs: JobQueue, check_model: Callable[[], None]):
    import gradio as gr

    default = {name: value for name, (_, value) in FIELDS.items()}
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                widgets = {
                    "concept": gr.Textbox(label="Concept(s) to erase, one per line", lines=3,
                                          placeholder="a painting by Van Gogh"),
                    "erase_from": gr.Textbox(label="Erase from (optional broader concept, e.g. 'cowboy')"),
                    "method": gr.Dropdown(label="Method: esd-x for styles, esd-u for objects and nudity",
                                          choices=[m.value for m in Method], value=default["method"]),
                    "iterations": gr.Number(label="Iterations", value=default["iterations"], precision=0),
                    "learning_rate": gr.Number(label="Learning rate", value=default["learning_rate"]),
                    "negative_guidance": gr.Number(label="Negative guidance (the paper's eta)",
                                                   value=default["negative_guidance"]),
                    "start_guidance": gr.Number(label="Start guidance (CFG when sampling x_t)",
                                                value=default["start_guidance"]),
                    "ddim_steps": gr.Number(label="DDIM steps", value=default["ddim_steps"], precision=0),
                    "resolution": gr.Number(label="Resolution (0 = the model's native size)",
                                            value=default["resolution"], precision=0),
                    "seed": gr.Number(label="Seed", value=default["seed"], precision=0),
                    "sample_with": gr.Radio(label="Weights that sample x_t", choices=[s.value for s in SampleWith],
                                            value=default["sample_with"]),
                    "training_dtype": gr.Radio(label="Training dtype (auto = the model's own; float32 masters "
                                                     "either way)", choices=list(TRAINING_DTYPES),
                                               value=default["training_dtype"]),
                    "gradient_checkpointing": gr.Checkbox(label="Gradient checkpointing (less memory, slower)",
                                                          value=default["gradient_checkpointing"]),
                    "fast": gr.Checkbox(label="Fast mode (x_t strategy measured best for the method)", value=default["fast"]),
                    "lora_rank": gr.Number(label="LoRA rank (0 = train the weights themselves)",
                                           value=default["lora_rank"], precision=0),
                    "optimizer": gr.Radio(label="Optimizer", choices=[o.value for o in OptimizerName],
                                          value=default["optimizer"]),
                    "checkpoint_every": gr.Number(label="Resumable checkpoint every N iterations (0 = none)",
                                                  value=default["checkpoint_every"], precision=0),
                    "resume": gr.Checkbox(label="Resume from this file name's checkpoint", value=default["resume"]),
                    "save_dtype": gr.Radio(label="Save dtype", choices=list(SAVE_DTYPES), value=default["save_dtype"]),
                    "filename_prefix": gr.Textbox(label="File name (saved in the Lora folder's esd/)",
                                                  value=default["filename_prefix"]),
                }
                with gr.Row():
                    start = gr.Button("Erase", variant="primary")
                    stop = gr.Button("Cancel")
            with gr.Column():
                status = gr.Markdown("Erases the concept from the loaded checkpoint and saves a file that "
                                     "`<lora:NAME:1>` applies; the loaded model itself is never changed.")
        job_id = gr.State("")
        start.click(fn=submit_and_watch(jobs, check_model), inputs=[widgets[n] for n in TAB_FIELDS],
                    outputs=[status, job_id])
        stop.click(fn=lambda current: jobs.cancel(current) and None, inputs=[job_id], outputs=[], queue=False)
    return tab
