"""Speed and memory of ESD: the paper's original procedure against this project's trainer in each of its modes.

    python -m esd_bench.speed [--out BENCHMARKS.md] [--device cpu|cuda] [--models tiny,toy,sd15]

Writes the ``esd_bench.speed`` section of BENCHMARKS.md (`esd_bench.markdown`). Side by side on the same model and
settings: the baseline (`esd_bench.baseline`, in the issue's definition and as the 2023 code runs), the trainer's
default (paper-faithful) mode and each of its faster or leaner modes (`MODES`, one declarative row each). Models: the
tiny random test model, the toy (``esd_bench/assets/toy_sd``) and the full-size SD1.5 UNet architecture with random
weights and a random CLIP-L-sized text encoder (built from their configs: nothing is downloaded), at small latents.
Then how the cost grows with ``ddim_steps``, the resolution and the number of trained weights.

Every row runs in a fresh subprocess with one torch thread, so rows do not pollute each other's memory figures. Per
row: seconds per iteration (the median of the measured iterations of one run, after warm-up iterations; every row
draws the same concepts, x_t step counts and noise from seed 0, so rows do the same work); where the time goes (UNet
and text-encoder forward passes timed by forward hooks, classed by autograd mode and by which weights ran them; the
rest of an iteration is backward, the optimizer step and Python); peak memory (on CPU the peak resident set size,
reset after the model is loaded, and its increase over the resident size after loading; on CUDA
``torch.cuda.max_memory_allocated`` and its increase over the memory allocated after loading); and how far the erased
weights are from the baseline's.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from esd_core.trainer import PHASE_SAMPLING

from . import TOY_SD_DIR
from .markdown import replace_section

SECTION = "esd_bench.speed"
ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("sampling", "teacher", "student", "text")


# ----------------------------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Mode:
    """One row of the benchmark: a baseline variant, or the trainer with settings that differ from its default."""

    key: str
    label: str
    baseline: str = ""                            # a `esd_bench.baseline` variant name; "" = the trainer
    config: tuple[tuple[str, Any], ...] = ()      # ESDConfig fields that differ from the default
    fast: bool = False                            # the fast mode's x_t strategy for the method (`config.fast`)
    dtype: str = "fp32"                           # the model's dtype when loaded (it computes under autocast)
    gradient_checkpointing: bool = False          # the trainer's RunOptions
    onednn: bool = True                           # torch.backends.mkldnn.enabled (CPU convolutions)
    devices: tuple[str, ...] = ("cpu", "cuda")    # device types the row means something on


#: Every mode, in the order of the tables. Add a row per new trainer option.
MODES: tuple[Mode, ...] = (
    Mode("baseline-issue", "baseline, the issue's definition", baseline="issue"),
    Mode("baseline-code", "baseline, as the 2023 code runs", baseline="code"),
    Mode("default", "default (paper-faithful)"),
    # Per method (`esd_core.config.fast`): esd-x a pool of one trajectory sampled by the frozen model, its teacher
    # predictions recorded; esd-u the paper's per-iteration trajectory at DDIM min(ddim_steps, 10).
    Mode("fast", "fast mode (`--fast`)", fast=True),
    Mode("checkpointing", "gradient checkpointing", gradient_checkpointing=True),
    Mode("bf16", "bf16 model (autocast)", dtype="bf16"),
    Mode("fp16", "fp16 model (autocast)", dtype="fp16"),
    Mode("lora", "LoRA rank 8", config=(("lora_rank", 8),)),
    Mode("adamw8bit", "8-bit AdamW", config=(("optimizer", "adamw8bit"),)),
    Mode("adafactor", "Adafactor", config=(("optimizer", "adafactor"),)),
    # On CPU torch runs batched convolutions through oneDNN, which at small latents is slower than two batch-1
    # passes: these two rows show what batching gains with torch's native convolutions instead.
    Mode("baseline-issue-native-conv", "baseline, the issue's definition, oneDNN off", baseline="issue", onednn=False,
         devices=("cpu",)),
    Mode("default-native-conv", "default, oneDNN off", onednn=False, devices=("cpu",)),
)
MODES_BY_KEY = {m.key: m for m in MODES}
REFERENCE = "baseline-issue"   # erased weights are compared with this row's
BASELINES = ("baseline-issue", "baseline-code")


@dataclass(frozen=True)
class ModelSpec:
    """A model the benchmark runs, and the run settings every row on it shares."""

    key: str
    label: str
    concept: str
    resolution: int     # pixels
    warmup: int         # iterations run before the measured ones (the first one also absorbs the setup)
    iterations: int     # measured iterations
    #: Chosen (for DDIM 50, one concept and these iteration counts) so that the warm-up iterations sample x_t with
    #: few DDIM steps and the measured ones with the paper's mean, 24.5 (mean and median within 1.5).
    seed: int
    #: Roughly the most memory one of its rows needs on CPU (the baseline as the code runs: two UNets and all their
    #: gradients); the runner waits for that much to be available before starting a row, not to push others out.
    peak_gib: float
    methods: tuple[str, ...] = ("esd-x", "esd-u")
    ddim_steps: int = 50                # DDIM steps for x_t (the paper's 50) unless --ddim-steps says otherwise
    modes: tuple[str, ...] = ()         # the rows run on this model unless --modes says otherwise; () = every row
    #: Methods not run by default and why (printed, and written into the section).
    skipped: str = ""


MODELS: dict[str, ModelSpec] = {s.key: s for s in (
    ModelSpec("tiny", "tiny random test model (`esd_core.testing`)", "a cat", resolution=64, warmup=1,
              iterations=6, seed=520, peak_gib=1.5),
    ModelSpec("toy", "toy model (`esd_bench/assets/toy_sd`)", "a striped background", resolution=64, warmup=1,
              iterations=6, seed=520, peak_gib=1.5),
    # On a CPU one SD1.5 iteration at DDIM 50 takes about a minute of CPU time: DDIM 10 (seed 2: the measured
    # iterations sample 4.5 steps, the mean of DDIM 10) and the rows that differ in speed or memory at this size.
    # The optimizers' and fp16's rows are on the tiny and toy models (they change only the optimizer state of esd-x's
    # few trained weights, and fp16 autocast on a CPU is bf16's emulation path again).
    ModelSpec("sd15", "SD1.5 architecture, random weights", "a painting by Van Gogh", resolution=64, warmup=1,
              iterations=2, seed=2, peak_gib=12.5, methods=("esd-x",), ddim_steps=10,
              modes=("baseline-issue", "baseline-code", "default", "fast", "checkpointing", "bf16", "lora",
                     "baseline-issue-native-conv", "default-native-conv"),
              skipped="esd-u is not run by default on SD1.5: in float32 it trains 813M weights (weights, gradients "
                      "and Adam's two moments: 16 bytes each, 13 GB) on top of the model, about 17 GiB for the "
                      "trainer and 20 GiB for the baseline's two copies; pass --methods esd-x,esd-u where that fits"),
)}


@dataclass(frozen=True)
class Job:
    """What one worker subprocess runs and measures."""

    model: str
    mode: str
    method: str
    device: str
    resolution: int
    ddim_steps: int
    warmup: int
    iterations: int


@dataclass
class Measurement:
    """A worker's figures. Phase seconds and rows are per measured iteration (means)."""

    job: Job
    seconds_per_iteration: float            # median over the measured iterations, by `timer`
    iteration_seconds: list[float]
    wall_seconds_per_iteration: float       # median wall time (equal to the above on an otherwise idle CPU)
    clock: str                              # "CPU" (process time) or "wall"
    phase_seconds: dict[str, float]         # sampling, teacher, student (forward), text; plus "rest"
    phase_rows: dict[str, float]            # samples run through the UNet / text encoder per iteration
    phase_calls: dict[str, float]           # forward passes per iteration
    memory_kind: str                        # "RSS" or "CUDA allocated"
    loaded_bytes: int
    peak_bytes: int
    unet_numel: int
    trained_numel: int
    losses: list[float]
    diffs_file: str = ""
    error: str = ""
    wall_seconds_total: float = 0.0         # the whole job: process start, loading, warm-up, measured iterations
    load_average: float = float("nan")      # the machine's 1-minute load average when the job started

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def guided_steps(self) -> float:
        """Guided DDIM steps per iteration: each one runs an unconditional and a conditional sample."""
        return self.phase_rows.get("sampling", 0.0) / 2

    @property
    def training_bytes(self) -> int:
        return self.peak_bytes - self.loaded_bytes


# --------------------------------------------------------------------------------------------------- the models


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet (``unet/config.json`` of the SD1.5 diffusers release), 859.5M parameters."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def build_sd15_parts():
    """SD1.5's UNet and a CLIP-L-sized text encoder with random weights (seeded), the real CLIP tokenizer (the toy's
    copy, at SD's 77 tokens) and SD1.5's DDIM scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .comfy_toy import CLIP_L

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_SD_DIR / "tokenizer"), model_max_length=77)
    unet = UNet2DConditionModel(**sd15_unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return unet, text_encoder, tokenizer, scheduler


def build_adapter(model: str, device: str, dtype: torch.dtype):
    """The model as a `DiffusersSDAdapter` on ``device`` in ``dtype`` (every row of a model gets the same weights)."""
    from types import SimpleNamespace

    from esd_core.adapter import BaseModelInfo
    from esd_core.diffusers_adapter import DiffusersSDAdapter
    from esd_core.testing import TinyPipelineSpec, build_tiny_pipeline

    if model == "toy":
        return DiffusersSDAdapter.from_folder(TOY_SD_DIR, device=device, dtype=dtype)
    if model == "tiny":
        pipe = build_tiny_pipeline(TinyPipelineSpec())
        unet, text_encoder, vae_scale_factor = pipe.unet, pipe.text_encoder, pipe.vae_scale_factor
        tokenizer, scheduler = pipe.tokenizer, pipe.scheduler
    elif model == "sd15":
        unet, text_encoder, tokenizer, scheduler = build_sd15_parts()
        vae_scale_factor = 8
    else:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    unet.to(dtype)
    text_encoder.to(dtype)
    parts = SimpleNamespace(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            vae_scale_factor=vae_scale_factor)
    return DiffusersSDAdapter(parts, BaseModelInfo(name=model), device=device)


# ------------------------------------------------------------------------------------------- measuring in a worker


def timer(device: torch.device) -> Callable[[], float]:
    """The clock of the s/it figures: on CPU the process's CPU time (one torch thread: the time it computed, which
    other processes on a shared machine do not inflate the way they inflate wall time), on CUDA wall time."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class PassClock:
    """Times every forward pass of a UNet (and of its deep copies) and of a text encoder, by phase.

    A UNet pass with autograd on is the student's; without, it samples x_t while the run reports its sampling phase
    (``on_phase`` of the trainer and of the baseline; a pool sampled by the frozen model records the teacher's
    predictions there too) and is the teacher's otherwise. The hooks are plain functions, so ``copy.deepcopy``
    copies them with the module: the baseline's second UNet reports to this clock as well.
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, device: torch.device):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.rows = dict.fromkeys(PHASES, 0)
        self.calls = dict.fromkeys(PHASES, 0)
        sync, now = synchronizer(device), timer(device)
        self.run_phase = ""  # the run's phase, set through `on_phase`
        started: list[tuple[str, float]] = []

        def phase(module: torch.nn.Module) -> str:
            if module is text_encoder:
                return "text"
            if torch.is_grad_enabled():
                return "student"
            return "sampling" if self.run_phase == PHASE_SAMPLING else "teacher"

        def before(module, args):
            sync()
            started.append((phase(module), now()))

        def after(module, args, output):
            sync()
            name, t0 = started.pop()
            self.seconds[name] += now() - t0
            self.rows[name] += int(args[0].shape[0]) if args else 1
            self.calls[name] += 1

        for m in (unet, text_encoder):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after)

    def on_phase(self, name: str) -> None:
        self.run_phase = name

    def snapshot(self) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        return dict(self.seconds), dict(self.rows), dict(self.calls)


class MemoryMeter:
    """Peak memory from the moment it is created: on CPU the resident set size (Linux: VmHWM, reset through
    ``/proc/self/clear_refs``; elsewhere the process's lifetime peak), on CUDA the allocator's figures."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.kind = "CUDA allocated"
            self.loaded = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        _return_freed_memory_to_the_os()
        self.kind = "RSS"
        self.loaded = _proc_status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
        except OSError:
            self.kind = "RSS (lifetime peak)"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.kind == "RSS":
            return _proc_status_bytes("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _return_freed_memory_to_the_os() -> None:
    """glibc keeps freed heap memory resident; trimming makes "RSS after loading" the loaded model's real footprint."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def row_config(mode: Mode, spec: ModelSpec, method: str, ddim_steps: int, resolution: int, iterations: int):
    """The trainer's (or the baseline's) `ESDConfig` of a row: the model's settings, the mode's overrides, and the
    fast mode's x_t strategy for the method where the row asks for it."""
    from esd_core.config import ESDConfig, fast

    config = ESDConfig(concepts=(spec.concept,), method=method, iterations=iterations, ddim_steps=ddim_steps,
                       resolution=resolution, seed=spec.seed, **dict(mode.config))
    return fast(config) if mode.fast else config


def run_job(job: Job, diffs_file: str = "") -> Measurement:
    """Load the model, run one erasure in the job's mode and measure it (in the current process)."""
    from esd_core.config import RunOptions
    from esd_core.diffusers_adapter import quiet_hf_logging
    from esd_core.trainer import erase

    from .baseline import AS_THE_CODE_RUNS, ISSUE_DEFINITION, erase_baseline

    if job.warmup < 1:
        raise ValueError("at least one warm-up iteration is needed: the first iteration also carries the setup")
    quiet_hf_logging()
    mode, spec = MODES_BY_KEY[job.mode], MODELS[job.model]
    device = torch.device(job.device)
    adapter = build_adapter(job.model, job.device, DTYPES[mode.dtype])
    config = row_config(mode, spec, job.method, job.ddim_steps, job.resolution, job.warmup + job.iterations)
    meter = MemoryMeter(device)
    clock = PassClock(adapter.unet, adapter.text_encoder, device)
    sync, now = synchronizer(device), timer(device)
    marks = [(now(), time.perf_counter(), clock.snapshot())]

    def mark(*_progress) -> None:
        sync()
        marks.append((now(), time.perf_counter(), clock.snapshot()))

    onednn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, mode.onednn
    try:
        if mode.baseline:
            variant = {v.name: v for v in (ISSUE_DEFINITION, AS_THE_CODE_RUNS)}[mode.baseline]
            result = erase_baseline(adapter, config, variant, on_progress=mark, on_phase=clock.on_phase)
            diffs, trained = result.diffs, sum(d.numel() for d in result.diffs.values())
        else:
            result = erase(adapter, config, options=RunOptions(gradient_checkpointing=mode.gradient_checkpointing),
                           on_progress=mark, on_phase=clock.on_phase)
            diffs, trained = result.dense_diffs(), result.trained_numel
    finally:
        torch.backends.mkldnn.enabled = onednn
    peak = meter.peak()
    if diffs_file:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in diffs.items()}, diffs_file)
    measured = marks[job.warmup:]
    durations = [b[0] - a[0] for a, b in zip(measured, measured[1:])]
    wall = [b[1] - a[1] for a, b in zip(measured, measured[1:])]
    (s0, r0, c0), (s1, r1, c1) = measured[0][2], measured[-1][2]
    n = len(durations)
    phase_seconds = {k: (s1[k] - s0[k]) / n for k in PHASES}
    phase_seconds["rest"] = sum(durations) / n - sum(phase_seconds.values())
    # A pool's cost comes in bursts (one refill per cycle): its figure is the mean over the cycle the job measures.
    typical = statistics.mean if config.trajectory_pool else statistics.median
    return Measurement(
        job=job, seconds_per_iteration=typical(durations), iteration_seconds=durations,
        wall_seconds_per_iteration=typical(wall), clock="wall" if device.type == "cuda" else "CPU",
        phase_seconds=phase_seconds, phase_rows={k: (r1[k] - r0[k]) / n for k in PHASES},
        phase_calls={k: (c1[k] - c0[k]) / n for k in PHASES}, memory_kind=meter.kind,
        loaded_bytes=meter.loaded, peak_bytes=peak, unet_numel=sum(p.numel() for p in adapter.unet.parameters()),
        trained_numel=trained, losses=list(result.losses),
        diffs_file=diffs_file)


def spawn(job: Job, diffs_file: Path) -> Measurement:
    """Run ``job`` in a fresh Python process with one torch thread; a failure becomes a Measurement with an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "esd_bench.speed", "--worker", json.dumps(dataclasses.asdict(job)),
           "--diffs-file", str(diffs_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return _failed(job, f"exit {proc.returncode}: {tail}")
    data = json.loads(lines[-1][len("RESULT "):])
    return Measurement(**{**data, "job": Job(**data["job"])})


def _failed(job: Job, error: str) -> Measurement:
    return Measurement(job=job, seconds_per_iteration=float("nan"), iteration_seconds=[],
                       wall_seconds_per_iteration=float("nan"), clock="", phase_seconds={},
                       phase_rows={}, phase_calls={}, memory_kind="", loaded_bytes=0, peak_bytes=0, unet_numel=0, trained_numel=0,
                       losses=[], error=error)


def worker_main(job_json: str, diffs_file: str) -> int:
    torch.set_num_threads(1)
    m = run_job(Job(**json.loads(job_json)), diffs_file)
    print("RESULT " + json.dumps(dataclasses.asdict(m)), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass
class Runner:
    """Runs each distinct job once (tables share rows), ``repeats`` times keeping the fastest run (the one other work
    on the machine disturbed least), and prints a line per finished row.

    With a ``results`` file, every finished job is saved there at once (its erased weights beside it, in
    ``<results>.diffs/``) and jobs already in it are reused, not run again (failed ones are retried): an interrupted
    benchmark continues where it stopped."""

    diffs_dir: Path
    repeats: int = 1
    results_file: Path | None = None
    results: dict[Job, Measurement] = field(default_factory=dict)
    reuse_only: bool = False   # report jobs missing from the results file as not run instead of running them
    used: dict[Job, None] = field(default_factory=dict)   # the jobs this report asked for, in order
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.results_file is not None and self.results_file.exists():
            for data in json.loads(self.results_file.read_text()):
                m = Measurement(**{**data, "job": Job(**data["job"])})
                if m.ok and Path(m.diffs_file).exists():
                    self.results[m.job] = m

    def get(self, job: Job) -> Measurement:
        self.used[job] = None
        if job not in self.results and self.reuse_only:
            return _failed(job, "not run (--reuse-only)")
        if job not in self.results:
            wait_for_memory(MODELS[job.model].peak_gib if job.device == "cpu" else 0.0, self.log)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            t0 = time.perf_counter()
            diffs_file = self.diffs_dir / f"{len(self.results)}-{job.model}-{job.method}-{job.mode}.safetensors"
            runs = [spawn(job, diffs_file) for _ in range(self.repeats)]
            m = min(runs, key=lambda r: r.seconds_per_iteration if r.ok else float("inf"))
            m.wall_seconds_total, m.load_average = time.perf_counter() - t0, load
            self.results[job] = m
            what = (f"{m.seconds_per_iteration:.3f} {m.clock} s/it ({m.wall_seconds_per_iteration:.3f} wall), "
                    f"peak {_gib(m.peak_bytes)} (+{_gib(m.training_bytes)})" if m.ok else f"FAILED: {m.error}")
            self.log(f"  {job.model} {job.method} {job.mode} ddim {job.ddim_steps} {job.resolution}px: {what} "
                     f"[{m.wall_seconds_total:.0f}s]")
            if self.results_file is not None:
                self.results_file.write_text(json.dumps([dataclasses.asdict(r) for r in self.results.values()],
                                                        indent=1))
        return self.results[job]


def wait_for_memory(gib: float, log: Callable[[str], None], poll_seconds: float = 30.0) -> None:
    """Return once the system reports ``gib`` of available memory (Linux ``MemAvailable``; elsewhere at once)."""
    said = False
    while True:
        available = available_gib()
        if not available < gib:  # also NaN: unknown, do not wait
            return
        if not said:
            log(f"  waiting for {gib:.1f} GiB of available memory ({available:.1f} GiB now)")
            said = True
        time.sleep(poll_seconds)


def available_gib() -> float:
    """The memory the system reports available (Linux ``MemAvailable``), in GiB; NaN where unknown."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) * 1024 / 2**30


def weight_difference(a: Measurement, b: Measurement) -> float:
    """Relative L2 distance between two runs' erased weights (trained minus base), ``|a - b| / |b|``; a tensor only
    one run changed (LoRA leaves biases alone) counts as unchanged in the other."""
    from safetensors.torch import load_file

    da, db = load_file(a.diffs_file), load_file(b.diffs_file)
    zero = torch.zeros(())
    num = sum(float((da.get(k, zero) - db.get(k, zero)).double().square().sum()) for k in da.keys() | db.keys())
    den = sum(float(d.double().square().sum()) for d in db.values())
    return (num / den) ** 0.5 if den else float("nan")


# ------------------------------------------------------------------------------------------------------ reporting


def _gib(n: float) -> str:
    if n != n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _s(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _ratios(value: float, bases: Sequence[float]) -> str:
    return " / ".join(f"{value / b:.2f}" if b and b == b else "-" for b in bases)


def mode_table(rows: list[Measurement], bases: list[Measurement], reference: Measurement | None) -> str:
    """Every mode on one model and method: time, memory and the erased weights, with ratios to both baselines."""
    lead = next((m for m in rows if m.ok), rows[0])
    unit = "RSS" if lead.memory_kind.startswith("RSS") else "allocated"
    clock = "CPU " if lead.clock == "CPU" else ""
    out = [f"| mode | {clock}s/it | × baseline (issue / code) | wall s/it | peak {unit} | × baseline | peak − loaded "
           "| × baseline | erased weights: rel. difference from the issue baseline's |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        label = MODES_BY_KEY[m.job.mode].label
        if not m.ok:
            out.append(f"| {label} | failed: {m.error} | | | | | | | |")
            continue
        is_base = m.job.mode in BASELINES
        t = "-" if is_base else _ratios(m.seconds_per_iteration, [b.seconds_per_iteration for b in bases])
        p = "-" if is_base else _ratios(m.peak_bytes, [b.peak_bytes for b in bases])
        d = "-" if is_base else _ratios(m.training_bytes, [b.training_bytes for b in bases])
        w = "-" if reference is None or m is reference or not reference.ok else f"{weight_difference(m, reference):.1e}"
        out.append(f"| {label} | {_s(m.seconds_per_iteration)} | {t} | {_s(m.wall_seconds_per_iteration)} | "
                   f"{_gib(m.peak_bytes)} | {p} | "
                   f"{_gib(m.training_bytes)} | {d} | {w} |")
    return "\n".join(out)


def phase_table(rows: list[Measurement]) -> str:
    """Where an iteration's time goes, per mode (seconds per iteration; passes timed by forward hooks)."""
    out = ["| mode | x_t sampling | teacher | student forward | text encoding | backward, optimizer, rest "
           "| guided DDIM steps / it | s per guided step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        if not m.ok:
            continue
        p = m.phase_seconds
        per_step = p["sampling"] / m.guided_steps if m.guided_steps else float("nan")
        out.append(f"| {MODES_BY_KEY[m.job.mode].label} | {_s(p['sampling'])} | {_s(p['teacher'])} | "
                   f"{_s(p['student'])} | {_s(p['text'])} | {_s(p['rest'])} | {m.guided_steps:.1f} | {_s(per_step)} |")
    return "\n".join(out)


def scaling_table(column: str, points: list[tuple[str, list[Measurement]]], modes: Sequence[str]) -> str:
    """One row per value of a setting: s/it and peak − loaded of ``modes``, and the default's ratios."""
    short = {"baseline-issue": "issue", "baseline-code": "code"}
    names = " / ".join(short.get(k, k) for k in modes)
    bases = " / ".join(short[k] for k in BASELINES if k in modes)
    out = [f"| {column} | trained weights | guided DDIM steps / it | s/it ({names}) | default × baseline ({bases}) "
           f"| peak − loaded ({names}) | default × baseline |", "|---|---:|---:|---:|---:|---:|---:|"]
    for value, ms in points:
        by = dict(zip(modes, ms))
        if not all(m.ok for m in ms):
            out.append(f"| {value} | failed: {next(m.error for m in ms if not m.ok)} | | | | | |")
            continue
        d = by.get("default")
        bases = [by[k] for k in BASELINES if k in by]
        t_ratio = _ratios(d.seconds_per_iteration, [b.seconds_per_iteration for b in bases]) if d else "-"
        m_ratio = _ratios(d.training_bytes, [b.training_bytes for b in bases]) if d else "-"
        out.append(f"| {value} | {ms[0].trained_numel:,} | {ms[0].guided_steps:.1f} | "
                   f"{' / '.join(_s(m.seconds_per_iteration) for m in ms)} | {t_ratio} | "
                   f"{' / '.join(_gib(m.training_bytes) for m in ms)} | {m_ratio} |")
    return "\n".join(out)


#: (trainer row, baseline row, how the pair is described): the comparisons of the targets and of batching.
PAIRS = (("default", "baseline-issue", "the baseline (the issue's definition)"),
         ("default", "baseline-code", "the baseline (as the 2023 code runs)"),
         ("default-native-conv", "baseline-issue-native-conv", "the baseline (the issue's), both with oneDNN off"))


def _pairs(rows: dict[str, Measurement]):
    for mine, theirs, what in PAIRS:
        d, b = rows.get(mine), rows.get(theirs)
        if d and b and d.ok and b.ok:
            yield d, b, what


def verdict(model: ModelSpec, rows: dict[str, Measurement]) -> list[str]:
    """The targets for esd-x: default at most 0.5x the baseline's time per iteration and 0.6x its peak memory."""
    lines = []
    for d, b, what in _pairs(rows):
        t, p, g = (d.seconds_per_iteration / b.seconds_per_iteration, d.peak_bytes / b.peak_bytes,
                   d.training_bytes / b.training_bytes)
        lines.append(f"- {model.label}, esd-x, DDIM {d.job.ddim_steps}, against {what}: "
                     f"time {t:.2f}x ({'met' if t <= 0.5 else 'not met'}), "
                     f"peak memory {p:.2f}x ({'met' if p <= 0.6 else 'not met'}); memory added by training {g:.2f}x")
    return lines


def batching_lines(model: ModelSpec, rows: dict[str, Measurement]) -> list[str]:
    """What batching buys on this device: a guided step as one batch-2 pass against two batch-1 passes (from the
    trainer's and the issue baseline's sampling phases), and the teacher's two passes against one."""
    lines = []
    for d, b, what in _pairs(rows):
        if b.job.mode == "baseline-code" or not (d.guided_steps and b.guided_steps):
            continue  # the code's sampler batches too
        one, two = d.phase_seconds["sampling"] / d.guided_steps, b.phase_seconds["sampling"] / b.guided_steps
        conv = ", oneDNN off" if not MODES_BY_KEY[d.job.mode].onednn else ""
        lines.append(f"- {model.label}{conv}: a guided DDIM step takes {_s(two)} s as two batch-1 passes and "
                     f"{_s(one)} s as one batch-2 pass (batching: {one / two:.2f}x the time); the teacher "
                     f"{_s(b.phase_seconds['teacher'])} s as two passes, {_s(d.phase_seconds['teacher'])} s as one")
    return lines


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esd_bench.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--results", type=Path,
                   help="JSON file of measurements: reused where present, extended after every row (resumable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny,toy,sd15", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--methods", help="comma-separated methods instead of each model's own (sd15: esd-x)")
    p.add_argument("--modes", help="comma-separated rows of MODES (default: each model's own; every row on tiny "
                                   "and toy)")
    p.add_argument("--ddim-steps", type=int,
                   help="DDIM steps for x_t (default: each model's own; the paper's 50, sd15 10)")
    p.add_argument("--iterations", type=int, help="measured iterations per row (default: the model's)")
    p.add_argument("--warmup", type=int, help="warm-up iterations per row (default: the model's)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is reported")
    p.add_argument("--scaling-model", default="toy", help="model of the scaling tables ('none' to skip them)")
    p.add_argument("--scaling-modes", default="baseline-issue,default")
    p.add_argument("--ddim-sweep", default="10,25,50")
    p.add_argument("--resolution-sweep", default="32,64,128", help="pixels")
    p.add_argument("--method-sweep", default="esd-x-strict,esd-x,esd-u,esd-all")
    p.add_argument("--reuse-only", action="store_true",
                   help="only write the section from the rows in --results; rows missing there are shown as not run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--diffs-file", default="", help=argparse.SUPPRESS)
    return p


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.diffs_file)
    models = _list(args.models)
    device_type = torch.device(args.device).type
    for name in models + ([args.scaling_model] if args.scaling_model != "none" else []):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    for key in _list(args.modes or "") + _list(args.scaling_modes):
        if key not in MODES_BY_KEY:
            raise SystemExit(f"unknown mode {key!r}; choose from {[m.key for m in MODES]}")

    def modes_of(model: str) -> list[str]:
        keys = _list(args.modes) if args.modes else list(MODELS[model].modes or MODES_BY_KEY)
        return [k for k in keys if device_type in MODES_BY_KEY[k].devices]

    def steps_of(model: str) -> int:
        return args.ddim_steps or MODELS[model].ddim_steps

    def job(model: str, mode: str, method: str, ddim_steps: int | None = None, resolution: int | None = None) -> Job:
        spec, steps = MODELS[model], ddim_steps or steps_of(model)
        warmup = args.warmup if args.warmup is not None else spec.warmup
        iterations = args.iterations or spec.iterations
        config = row_config(MODES_BY_KEY[mode], spec, method, steps, resolution or spec.resolution, 1)
        if config.trajectory_pool:  # the first iteration fills the pool (warm-up); the measured ones run to the
            warmup, iterations = 1, config.trajectory_pool * steps  # next refill, included
        return Job(model=model, mode=mode, method=method, device=args.device, resolution=resolution or spec.resolution,
                   ddim_steps=steps, warmup=warmup, iterations=iterations)

    def fast_note(model: str, method: str) -> str:
        """What the fast row of this model and method runs (`esd_core.config.fast` picks per method)."""
        j = job(model, "fast", method)
        c = row_config(MODES_BY_KEY["fast"], MODELS[model], method, j.ddim_steps, j.resolution, 1)
        if c.trajectory_pool:
            return (f"the fast mode: x_t from a pool of {c.trajectory_pool} trajectory sampled by the "
                    f"{c.sample_with.value} model, teacher predictions recorded while sampling; the mean of "
                    f"{j.iterations} iterations, one pool cycle including its refill, after the iteration that fills "
                    "the pool first")
        return f"the fast mode: the paper's per-iteration trajectory at DDIM {c.ddim_steps}"

    with tempfile.TemporaryDirectory(prefix="esd-speed-") as tmp:
        diffs_dir = Path(tmp)
        if args.results is not None:
            diffs_dir = args.results.with_name(args.results.name + ".diffs")
            diffs_dir.mkdir(parents=True, exist_ok=True)
        runner = Runner(diffs_dir, repeats=args.repeats, results_file=args.results, reuse_only=args.reuse_only)
        sections, verdicts, batching = [], [], []
        for model in models:
            spec = MODELS[model]
            for method in (_list(args.methods) if args.methods else spec.methods):
                print(f"{model} {method}", flush=True)
                rows = {k: runner.get(job(model, k, method)) for k in modes_of(model)}
                ms = list(rows.values())
                bases = [rows[k] for k in BASELINES if k in rows]
                lead = next((m for m in ms if m.ok), None)
                size = (f"UNet {lead.unet_numel / 1e6:.1f}M weights, {lead.trained_numel:,} trained; "
                        if lead else "")
                sections.append((f"{spec.label}: {method}",
                                 f"{size}{spec.resolution} px, DDIM {steps_of(model)} for x_t; "
                                 f"median of {job(model, 'default', method).iterations} iterations after "
                                 f"{job(model, 'default', method).warmup} warm-up ({fast_note(model, method)})\n\n"
                                 + mode_table(ms, bases, rows.get(REFERENCE))
                                 + "\n\nWhere the time goes (seconds per iteration):\n\n" + phase_table(ms)))
                if method == "esd-x":
                    verdicts += verdict(spec, rows)
                    batching += batching_lines(spec, rows)
            if spec.skipped and not args.methods:
                note = f"{spec.skipped} ({available_gib():.1f} GiB available when this benchmark ran)."
                print(f"{model}: {note}", flush=True)
                sections.append((f"{spec.label}: not run", note))
        if args.scaling_model != "none":
            sm, smodes = args.scaling_model, _list(args.scaling_modes)
            print(f"scaling on {sm}", flush=True)
            ddim = [(str(n), [runner.get(job(sm, k, "esd-x", ddim_steps=n)) for k in smodes])
                    for n in map(int, _list(args.ddim_sweep))]
            res = [(f"{px} px", [runner.get(job(sm, k, "esd-x", resolution=px)) for k in smodes])
                   for px in map(int, _list(args.resolution_sweep))]
            meth = [(name, [runner.get(job(sm, k, name)) for k in smodes]) for name in _list(args.method_sweep)]
            label = MODELS[sm].label
            sections.append((f"How the cost grows, {label}",
                             f"esd-x, {MODELS[sm].resolution} px, DDIM {steps_of(sm)} unless the row says "
                             "otherwise.\n\nWith the number of DDIM steps for x_t:\n\n"
                             + scaling_table("DDIM steps", ddim, smodes)
                             + "\n\nWith the resolution:\n\n" + scaling_table("resolution", res, smodes)
                             + "\n\nWith the number of trained weights (the layer method):\n\n"
                             + scaling_table("method", meth, smodes)))
        used = [runner.results[j] for j in runner.used if j in runner.results]  # --reuse-only: only rows that ran
        minutes = sum(m.wall_seconds_total for m in used) / 60
        loads = [m.load_average for m in used if m.load_average == m.load_average]
        body = render(reproducing_command(sys.argv[1:] if argv is None else argv), args.device, minutes,
                      (min(loads, default=float("nan")), max(loads, default=float("nan"))), args.repeats, sections,
                      verdicts, batching)
        replace_section(args.out, SECTION, body)
    print("\n".join(verdicts), f"\nwrote the {SECTION} section of {args.out} (rows: {minutes:.0f} min)", sep="\n")
    return 0


def reproducing_command(argv: Sequence[str]) -> str:
    """The command line, without ``--results`` and ``--reuse-only``: they only save and reuse rows, they change no
    figure."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--results":
            skip = True
        elif not a.startswith("--results=") and a != "--reuse-only":
            kept.append(a)
    return " ".join(["python -m esd_bench.speed", *kept])


def render(command: str, device: str, minutes: float, load: tuple[float, float], repeats: int, sections, verdicts,
           batching) -> str:
    fastest = f" (the fastest of {repeats} runs)" if repeats > 1 else ""
    how = " ".join([
        f"Generated by `{command}` ({minutes:.0f} min of rows) on {device_description(device)} (1-minute load average",
        f"{load[0]:.1f} to {load[1]:.1f} when the rows started: other work on the machine makes timings noisy).",
        "Each row is a fresh process with one torch thread. **s/it**: median seconds per iteration of one run after",
        f"its warm-up iterations{fastest}; on CPU in CPU time of the process (with one thread, the time it computed,",
        "which other work on the machine inflates less than wall time; on an idle machine the two agree), on CUDA in",
        "wall time; the wall-time median is shown too. All rows of a table draw the same concepts, x_t step counts and",
        "noise (the model's seed): they do the same work.",
        "**Memory**: on CPU the peak resident set size (RSS, reset after loading) and its increase over the RSS after",
        "the model was loaded (*peak − loaded*: what training itself adds; the loaded RSS includes the Python/torch",
        "runtime); on CUDA `torch.cuda.max_memory_allocated` and its increase over the memory allocated after",
        "loading. Ratios are to the two baselines (`esd_bench/baseline.py`): **the issue's definition** (two full",
        "UNet copies, the guidance passes and the two frozen predictions as separate forward passes, float32) and",
        "**as the 2023 code runs** (rohitgandikota/erasing@a2189e9: its DDIM sampler batches the guidance passes, it",
        "re-encodes four prompts per iteration, all UNet weights require gradients, and SD v1's config checkpoints",
        "every ResBlock and transformer block). **Erased weights**: relative L2 distance of each row's",
        "trained-minus-base weights from the issue baseline's (float rounding gives ~1e-5..1e-3, a wrong result ~1).",
        "**Where the time goes**: UNet and text-encoder forward passes timed by forward hooks (a pass with autograd",
        "is the student's, one run by the frozen weights the teacher's, other UNet passes sample x_t); the rest of an",
        "iteration is backward, the optimizer step and Python. The SD1.5 rows use the real architecture (UNet 859.5M",
        "weights, a CLIP-L-sized text encoder of 123M, the CLIP tokenizer at 77 tokens) with random weights, at small",
        "latents so that they run on a CPU.",
    ])
    head = (f"## Speed and memory against the paper's procedure\n\n{how}\n\n"
            "**Targets** (esd-x: the default mode at most 0.5x the baseline's time per iteration and 0.6x its peak "
            "memory):\n" + "\n".join(verdicts) + "\n\n**Batching on this device** (esd-x rows):\n"
            + "\n".join(batching) + "\n")
    return head + "".join(f"\n### {title}\n\n{body}\n" for title, body in sections)


if __name__ == "__main__":
    raise SystemExit(main())
