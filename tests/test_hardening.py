"""Nothing lost, nothing broken: bad settings, the model's schedule, out of memory, write failures, output names and
pickle files, through the core and the command line (the ComfyUI side: tests/host/test_hardening.py)."""
from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tiny import make_adapter

from esd_core.cli import main
from esd_core.config import ESDConfig, check_schedule
from esd_core.erased_weights import load_erased_weights, save_erased_weights
from esd_core.errors import ConfigError, ErasedWeightsError, OutputWriteError, TrainingOutOfMemory
from esd_core.plan import PlanSettings, fitting_options, plan_memory
from esd_core.files import check_inside, check_output_name, write_new_directory, write_new_file
from esd_core.sampling import ddim_timesteps
from esd_core.testing import build_tiny_pipeline
from esd_core.trainer import erase

FAST = dict(ddim_steps=4, seed=0, learning_rate=1e-3)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad,message", [
    (dict(concepts=(" ", "\t")), "no concept given"),
    (dict(concepts=tuple(f"concept {i}" for i in range(1001))), "1001 concepts given; at most 1000"),
    (dict(concepts=("a" * 1001,)), "1001 characters long"),
    (dict(concepts=("a cat\x00",)), "control character"),
    (dict(concepts=("a \ud800 cat",)), "control character"),   # a lone surrogate: no file header can store it
    (dict(concepts="a cat"), "list of texts"),
    (dict(erase_from=("x" * 5000,)), "erase_from"),
    (dict(method="esd-q"), "choose one of: esd-x"),
    (dict(method=3), "layer method must be a name"),
    (dict(learning_rate=NAN), "learning rate must be a number in (0, 1)"),
    (dict(learning_rate=INF), "learning rate"),
    (dict(learning_rate=1.0), "learning rate"),
    (dict(learning_rate=-1e-5), "learning rate"),
    (dict(negative_guidance=NAN), "negative guidance must be a number in [0, 20]"),
    (dict(negative_guidance=-1.0), "negative guidance"),
    (dict(start_guidance=INF), "start guidance"),
    (dict(start_guidance=21.0), "start guidance"),
    (dict(iterations=0), "iterations must be an integer in [1, 1000000]"),
    (dict(iterations=2.5), "iterations"),
    (dict(iterations=True), "iterations"),
    (dict(ddim_steps=1000), "ddim_steps must be an integer in [2, 999]"),
    (dict(resolution=100), "multiple of 8"),
    (dict(resolution=-8), "resolution"),
    (dict(resolution=8192), "resolution must be an integer in [0, 4096]"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(trajectory_pool=10**6), "trajectory_pool"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_rank=2, lora_alpha=NAN), "lora_alpha"),
    (dict(sample_with="teacher"), "sample_with must be one of"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
])
def test_every_bad_setting_is_refused_with_what_would_be_right(bad, message):
    with pytest.raises(ConfigError) as e:
        ESDConfig(**{"concepts": ("a cat",), **bad})
    assert message in str(e.value)


def test_limits_accept_their_edges():
    config = ESDConfig(concepts=tuple(f"c{i}" for i in range(1000)), iterations=1_000_000, negative_guidance=20.0,
                       start_guidance=0.0, ddim_steps=999, resolution=4096, seed=2**64 - 1, learning_rate=0.999)
    assert len(config.concepts) == 1000 and config.seed == 2**64 - 1


@pytest.mark.parametrize("length", [10, 100, 1000])
def test_ddim_schedules_below_the_schedule_length_stay_inside_it(length):
    for steps in range(2, length):
        timesteps = ddim_timesteps(length, steps)
        assert int(timesteps.max()) < length and int(timesteps.min()) >= 0, steps
        check_schedule(steps, length)
    with pytest.raises(ConfigError, match=f"below the model's noise schedule length, {length}"):
        check_schedule(length, length)


def test_ddim_steps_past_the_models_schedule_are_refused_before_any_work():
    adapter = make_adapter()
    adapter.alphas_cumprod = adapter.alphas_cumprod[:100]  # a model trained with a 100-step schedule
    calls = []
    predict = adapter.predict_noise
    adapter.predict_noise = lambda *a: calls.append(1) or predict(*a)
    with pytest.raises(ConfigError, match="below the model's noise schedule length, 100 .got 100"):
        erase(adapter, ESDConfig(concepts=("a cat",), iterations=1, **{**FAST, "ddim_steps": 100}))
    assert calls == []
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=1, **{**FAST, "ddim_steps": 99}))
    assert result.iterations_run == 1 and calls  # the longest schedule that fits trains (no IndexError)


class OutOfMemoryInTraining:
    """The tiny adapter, except that its ``fail_at``-th training pass (the passes with autograd on) fails like a full
    GPU."""

    def __init__(self, adapter, fail_at: int = 1, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB "
                 "(GPU 0; 7.79 GiB total)"):
        self.adapter, self.fail_at, self.passes, self.message = adapter, fail_at, 0, message

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def predict_noise(self, latents, t, cond):
        if torch.is_grad_enabled():
            self.passes += 1
            if self.passes == self.fail_at:
                raise torch.OutOfMemoryError(self.message)
        return self.adapter.predict_noise(latents, t, cond)


def _optimizers() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)}


def test_out_of_memory_releases_the_run_and_says_what_it_needed_and_what_uses_less():
    adapter = make_adapter()
    before = {n: p.detach().clone() for n, p in adapter.unet.named_parameters()}
    optimizers = _optimizers()
    with pytest.raises(TrainingOutOfMemory) as e:  # in iteration 2: Adam's state exists by then
        erase(OutOfMemoryInTraining(adapter, fail_at=2), ESDConfig(concepts=("a cat",), iterations=3, method="esd-u",
                                                                   **FAST))
    message = str(e.value)
    assert "out of memory on cpu while training at iteration 2 of 3" in message
    assert "asked for 2.00 GiB more" in message
    for option in ("gradient_checkpointing on", "optimizer adamw8bit", "lora_rank 16", "lower resolution"):
        assert option in message, option
    assert e.value.__context__ is None and e.value.__cause__ is None  # the failed run's frames are not kept
    # the optimizer and its state (two float32 moments per trained weight) are gone, and the model is as received
    assert _optimizers() <= optimizers
    assert all(torch.equal(p, before[n]) for n, p in adapter.unet.named_parameters())
    assert all(p.grad is None for p in adapter.unet.parameters())


def test_out_of_memory_after_the_planner_passed_the_run_names_its_settings_that_need_the_shortfall_less():
    adapter = make_adapter()
    config = ESDConfig(concepts=("a cat",), iterations=2, method="esd-all", resolution=64, **FAST)
    plan = plan_memory(adapter.memory_model(), PlanSettings.for_run(config, False, torch.float32, "cpu"))
    shortfall = plan.total // 4  # more than checkpointing alone saves on this model, less than LoRA does
    expected = [o.describe() for o in fitting_options(plan, plan.total - shortfall)]
    assert expected and not any(o.startswith("gradient checkpointing:") for o in expected)
    with pytest.raises(TrainingOutOfMemory) as e:
        erase(OutOfMemoryInTraining(adapter, message=f"you tried to allocate {shortfall} bytes"), config)
    message = str(e.value)
    assert (f"settings the memory planner estimates at least {shortfall / 2**20:.1f} MiB below this run's "
            f"{plan.total / 2**20:.1f} MiB: " + "; ".join(expected)) in message, message


def test_out_of_memory_options_leave_out_what_the_run_already_uses():
    adapter = OutOfMemoryInTraining(make_adapter())
    config = ESDConfig(concepts=("a cat",), iterations=2, lora_rank=2, optimizer="adafactor", resolution=64, **FAST)
    from esd_core.config import RunOptions
    with pytest.raises(TrainingOutOfMemory) as e:
        erase(adapter, config, options=RunOptions(gradient_checkpointing=True))
    assert "every memory-saving setting is already on" in str(e.value)


# ------------------------------------------------------------------ writing

def _fill(folder: Path):
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(b"x" * (1 << 20))  # far more than the tiny disk holds
    return write


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs (root only; CI runs as root)."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root; test_write_failures_injected covers the same path")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_gives_a_clear_error_and_leaves_no_file(tiny_disk):
    (tiny_disk / "kept.txt").write_text("an earlier file")
    with pytest.raises(OutputWriteError, match="is full: free some space or choose another folder"):
        write_new_file(tiny_disk / "out.safetensors", _fill(tiny_disk))
    with pytest.raises(OutputWriteError, match="is full"):
        write_new_directory(tiny_disk / "pipeline", lambda tmp: _fill(tmp)(tmp / "weights.bin"))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["kept.txt"]
    assert (tiny_disk / "kept.txt").read_text() == "an earlier file"


def test_a_read_only_folder_gives_a_clear_error_and_leaves_no_file(tiny_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(OutputWriteError, match="is read-only or not writable"):
        write_new_file(tiny_disk / "out.safetensors", lambda tmp: tmp.write_bytes(b"data"))
    with pytest.raises(OutputWriteError, match="read-only"):
        write_new_file(tiny_disk / "sub" / "out.safetensors", lambda tmp: tmp.write_bytes(b"data"))
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "is full"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "read-only or not writable")])
def test_write_failures_injected(tmp_path, code, message):
    """The same failures raised by the write itself (any OS, any user): a clear error, no partial file."""
    def failing(tmp: Path):
        tmp.write_bytes(b"half of a file")
        raise OSError(code, os.strerror(code))
    with pytest.raises(OutputWriteError, match=message):
        write_new_file(tmp_path / "out.safetensors", failing)
    assert list(tmp_path.iterdir()) == []


def test_saving_an_erasure_on_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    from esd_core import erased_weights

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    erased = load_erased_weights(_saved(tmp_path))
    monkeypatch.setattr(erased_weights, "save_file", no_space)
    with pytest.raises(OutputWriteError):
        save_erased_weights(tmp_path / "again.safetensors", erased)
    assert not (tmp_path / "again.safetensors").exists() and not list(tmp_path.glob(".*partial"))


def _saved(folder: Path) -> Path:
    adapter = make_adapter()
    result = erase(adapter, ESDConfig(concepts=("a cat",), iterations=1, **FAST))
    return save_erased_weights(folder / "saved.safetensors", result.to_erased_weights(adapter))


# ------------------------------------------------------------------ names

@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "C:/x", "C:x", "a\\b", "con", "NUL.txt",
                                  "sub/COM1", "lpt9.safetensors", "a.", "a /b", "", "  ", "a\x00", "a\nb", "x" * 201,
                                  "a//b", "./a", "a:b", "what?", "a|b"])
def test_output_names_that_could_leave_their_folder_or_fail_on_some_os_are_refused(name):
    with pytest.raises(ConfigError):
        check_output_name(name)


@pytest.mark.parametrize("name,clean", [("van_gogh", "van_gogh"), ("styles/van gogh", "styles/van gogh"),
                                        (" spaced ", "spaced"), ("console", "console"), ("a.b", "a.b")])
def test_plain_output_names_are_kept(name, clean):
    assert check_output_name(name) == clean


def test_a_symlinked_subfolder_cannot_carry_a_file_outside(tmp_path):
    root, outside = tmp_path / "loras" / "esd", tmp_path / "elsewhere"
    root.mkdir(parents=True), outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "real").mkdir()
    assert check_inside(root, root / "real") == root / "real"
    with pytest.raises(ConfigError, match="leads outside"):
        check_inside(root, root / "link")


# ------------------------------------------------------------------ pickle

class _Planted:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt"])
def test_a_pickle_is_refused_with_how_to_convert_it_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    torch_file = tmp_path / f"torch_save{suffix}"
    torch.save({"lora_unet_x.diff": torch.zeros(2), "payload": _Planted(marker)}, torch_file)
    raw = tmp_path / f"raw_pickle{suffix}"
    raw.write_bytes(pickle.dumps(_Planted(marker)))
    for path in (torch_file, raw):
        with pytest.raises(ErasedWeightsError, match="PyTorch pickle file") as e:
            load_erased_weights(path)
        assert "never unpickles" in str(e.value) and "st.save_file(torch.load('IN', weights_only=True)" in str(e.value)
    assert not marker.exists()


def test_a_pipeline_folder_with_only_pickle_weights_is_refused(tmp_path, capsys):
    folder = tmp_path / "pickled"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))
    code = main(["erase", "--model", str(folder), "--concept", "a cat", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "holds only pickle weights" in err and "safe_serialization=True" in err


@pytest.mark.parametrize("change,message", [
    (lambda f: (f / "unet").rename(f / "transformer"), "transformer-based model"),
    (lambda f: _set_unet(f, in_channels=9), "9 input channels"),
])
def test_pipelines_of_other_families_are_refused(tiny_pipeline_dir, tmp_path, capsys, change, message):
    folder = tmp_path / "other"
    shutil.copytree(tiny_pipeline_dir, folder)
    change(folder)
    code = main(["erase", "--model", str(folder), "--concept", "a cat", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Stable Diffusion 1.x, 2.x and SDXL" in err


def _set_unet(folder: Path, **changes):
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


# ------------------------------------------------------------------ command line

@pytest.mark.parametrize("extra,message", [
    (["--lr", "nan"], "learning rate must be a number"),
    (["--negative-guidance", "inf"], "negative guidance"),
    (["--ddim-steps", "1000"], "ddim_steps must be an integer in [2, 999]"),
    (["--device", "warp-drive"], "is not a torch device"),
    (["--device", "cuda:7"], "CUDA"),
    (["--seed", "-3"], "seed"),
])
def test_bad_flags_fail_before_any_work_with_a_clear_message(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    code = main(["erase", "--model", str(tiny_pipeline_dir), "--concept", "a cat", "--iterations", "2",
                 "--out", str(tmp_path / "o.safetensors"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("strength", ["nan", "inf", "11"])
def test_apply_refuses_a_strength_that_is_not_a_finite_number_in_range(tiny_pipeline_dir, tmp_path, capsys, strength):
    weights = _saved(tmp_path)
    code = main(["apply", "--model", str(tiny_pipeline_dir), "--weights", str(weights), "--strength", strength,
                 "--save-pipeline", str(tmp_path / "out")])
    assert code == 2 and "strength must be a number in [-10, 10]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
