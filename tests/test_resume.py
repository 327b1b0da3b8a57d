"""Resumable training: a cancelled or killed run continues to exactly the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_adapter

from esd_core.config import ESDConfig, RunOptions
from esd_core.errors import ErasureCancelled, NonFiniteLossError, ResumeError
from esd_core.trainer import erase

ROOT = Path(__file__).resolve().parents[1]


def config(**kw):
    return ESDConfig(**{"concepts": ("a cat", "a dog"), "iterations": 8, "learning_rate": 1e-3, "ddim_steps": 4,
                        "seed": 3, **kw})


def cancel_after(checks: int):
    count = [0]

    def should_cancel():
        count[0] += 1
        return count[0] > checks

    return should_cancel


def assert_same_result(a, b):
    assert a.losses == b.losses
    assert a.diffs.keys() == b.diffs.keys() and a.loras.keys() == b.loras.keys()
    assert all(torch.equal(a.diffs[k], b.diffs[k]) for k in a.diffs)
    assert all(torch.equal(a.loras[k].down, b.loras[k].down) and torch.equal(a.loras[k].up, b.loras[k].up)
               for k in a.loras)


@pytest.mark.parametrize("settings", [
    dict(),                                                                   # the paper's procedure, full weights
    dict(trajectory_pool=2, sample_with="frozen", lora_rank=2, method="esd-u"),  # fast mode's pool, LoRA, convs
    dict(optimizer="adamw8bit", trajectory_pool=1),                           # 8-bit optimizer state, trained pool
])
def test_a_cancelled_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, settings):
    cfg = config(**settings)
    whole = erase(make_adapter(), cfg)
    options = RunOptions(checkpoint=tmp_path / "run.esd-resume", checkpoint_every=3)
    with pytest.raises(ErasureCancelled, match="resumable checkpoint is kept"):
        erase(make_adapter(), cfg, options=options, should_cancel=cancel_after(12))  # mid-run
    assert options.checkpoint.exists()
    resumed = erase(make_adapter(), cfg, options=RunOptions(checkpoint=options.checkpoint, resume=True))
    assert_same_result(whole, resumed)


def test_a_checkpoint_of_other_settings_or_another_base_is_refused_saying_what_differs(tmp_path):
    path = tmp_path / "run.esd-resume"
    with pytest.raises(ErasureCancelled):
        erase(make_adapter(), config(), options=RunOptions(checkpoint=path), should_cancel=cancel_after(10))
    with pytest.raises(ResumeError, match=r"learning_rate=0\.001 \(this run: 0\.0002\)"):
        erase(make_adapter(), config(learning_rate=2e-4), options=RunOptions(checkpoint=path, resume=True))
    from esd_core.testing import TinyPipelineSpec
    with pytest.raises(ResumeError, match="base model .* other weights"):
        erase(make_adapter(TinyPipelineSpec(seed=1)), config(), options=RunOptions(checkpoint=path, resume=True))
    with pytest.raises(ResumeError, match="resume it, or delete it"):  # never replaced without asking
        erase(make_adapter(), config(), options=RunOptions(checkpoint=path))


def test_a_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run.esd-resume"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ResumeError, match="damaged"):
        erase(make_adapter(), config(), options=RunOptions(checkpoint=path, resume=True))


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "run.esd-resume"
    adapter = make_adapter()
    calls = [0]
    predict = adapter.predict_noise

    def poisoned(latents, timesteps, cond):
        out = predict(latents, timesteps, cond)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 6:  # the sixth training pass: after the checkpoint of iteration 4
                return out * float("nan")
        return out

    adapter.predict_noise = poisoned
    with pytest.raises(NonFiniteLossError, match=r"iteration 6.*last checkpoint .* is kept"):
        erase(adapter, config(), options=RunOptions(checkpoint=path, checkpoint_every=4))
    from esd_core.resume import Identity, load_checkpoint
    from esd_core.trainer import ldm_names
    from esd_core.methods import select_parameters
    from esd_core.weights import tensors_hash
    fresh = make_adapter()
    to_ldm = ldm_names(fresh)
    base_hash = tensors_hash({to_ldm[n]: p.data for n, p in select_parameters("esd-x", fresh.unet).items()})
    assert load_checkpoint(path, Identity(config(), base_hash, fresh.base.name)).iteration == 4


def run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "esd_core", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_run_killed_between_checkpoints_resumes_to_the_same_file(tiny_pipeline_dir, tmp_path):
    """SIGKILL (no chance to save anything) after the first checkpoint; --resume continues from it."""
    common = ["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", "--iterations", "24", "--lr", "1e-3",
              "--ddim-steps", "6", "--seed", "5"]
    whole = run_cli([*common, "--out", str(tmp_path / "whole.safetensors")])
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    out = tmp_path / "killed.safetensors"
    checkpoint = tmp_path / "killed.esd-resume"
    killed = run_cli([*common, "--out", str(out), "--checkpoint-every", "8"])
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.3)  # past the checkpoint, before the next one
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not out.exists() and checkpoint.exists()
    resumed = run_cli([*common, "--out", str(out), "--checkpoint-every", "8", "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert not checkpoint.exists()  # a finished run removes its checkpoint
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
