"""The ESD tab under each host's own gradio (A1111: 3.41, Forge: 4.40): it builds with every input of ESD Erase Concept
at the node's defaults, and its Erase handler submits to the job queue and reports progress, the saved name and how
to use it, or the node's message for bad input. Runs in the host's venv (a subprocess), without starting the host:
the training behind the queue is the one test_extension.py proves inside the running hosts.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from webui_server import ROOT, find_host

SCRIPT = r"""
import json, gradio
from webui_ext.jobs import JobQueue
from webui_ext.tab import TAB_FIELDS, build_tab, submit_and_watch

def work(job):  # the host's training stands behind this in the extension; here the queue's contract only
    for step in range(1, job.total + 1):
        job.step, job.loss = step, 1.0 / step
    job.file = "cat_00001_"

jobs = JobQueue(work)
tab = build_tab(jobs, check_model=lambda: None)
labels = {getattr(b, "label", None): getattr(b, "value", None) for b in tab.blocks.values()}
values = dict(concept="a cat", erase_from="", method="esd-x", iterations=3, learning_rate=1e-5,
              negative_guidance=1.0, start_guidance=3.0, ddim_steps=50, resolution=0, seed=0, sample_with="trained",
              training_dtype="auto", gradient_checkpointing=False, fast=False, lora_rank=0, optimizer="adam",
              checkpoint_every=0, resume=False, save_dtype="fp16", filename_prefix="cat")
handler = submit_and_watch(jobs, check_model=lambda: None, poll=0.01)
done = list(handler(*[values[n] for n in TAB_FIELDS]))
bad = list(handler(*[{**values, "concept": ""}[n] for n in TAB_FIELDS]))
print(json.dumps({"gradio": gradio.__version__, "labels": labels, "done": done, "bad": bad}, default=str))
"""


@pytest.fixture(scope="session")
def tab_run(webui_host):
    host = find_host(webui_host)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.run([str(host.venv / "bin" / "python"), "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_tab_builds_under_the_hosts_gradio(webui_host, tab_run):
    assert tab_run["gradio"] == {"a1111": "3.41.2", "forge": "4.40.0"}[webui_host]
    labels = tab_run["labels"]
    assert labels["Iterations"] == 1000 and labels["Learning rate"] == 1e-5 and labels["DDIM steps"] == 50
    assert labels["Method: esd-x for styles, esd-u for objects and nudity"] == "esd-x"
    assert labels["Negative guidance (the paper's eta)"] == 1.0 and labels["Start guidance (CFG when sampling x_t)"] == 3
    assert labels["File name (saved in the Lora folder's esd/)"] == "ESD_erased"
    assert labels["Training dtype (auto = the model's own; float32 masters either way)"] == "auto"
    assert labels["LoRA rank (0 = train the weights themselves)"] == 0 and labels["Save dtype"] == "fp16"
    assert labels["Optimizer"] == "adam" and labels["Resumable checkpoint every N iterations (0 = none)"] == 0
    assert labels["Fast mode (x_t strategy measured best for the method)"] is False
    assert {"Concept(s) to erase, one per line", "Seed", "Weights that sample x_t",
            "Gradient checkpointing (less memory, slower)", "Resolution (0 = the model's native size)"} <= set(labels)


def test_the_erase_button_reports_the_file_and_how_to_use_it(tab_run):
    status, job_id = tab_run["done"][-1]
    assert job_id == "esd-1" and "<lora:cat_00001_:1>" in status and "final loss 0.3333" in status, status


def test_the_erase_button_shows_the_nodes_message_for_bad_input(tab_run):
    assert tab_run["bad"] == [["**Not started:** no concept given; type the concept to erase, e.g. 'a painting by "
                               "Van Gogh' (one per line)", ""]]
