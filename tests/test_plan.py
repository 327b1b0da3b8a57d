"""The memory planner: real architecture sizes, parts that equal real allocations, activation figures against
measured CPU memory, CUDA autocast emulation against torch's own autocast, and the pre-flight check."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esd_core.architectures import ARCHITECTURES
from esd_core.adapter import ModelFamily
from esd_core.cli import main
from esd_core.errors import ConfigError, InsufficientMemoryError
from esd_core.methods import count_trained, select_parameter_names
from esd_core.config import ESDConfig
from esd_core.optim import make_optimizer
from esd_core.plan import (GIB, LiveBytes, Planner, PlanSettings, TargetKernels, architecture_memory_model,
                           available_memory, check_fits, comfyui_units, diffusers_memory_model, fitting_options,
                           preflight)
from esd_core.testing import TinyPipelineSpec, build_tiny_pipeline
from esd_core.trainer import erase, make_trainables
from tiny import make_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_unet():
    return build_tiny_pipeline(TinyPipelineSpec()).unet


@pytest.fixture(scope="module")
def tiny_planner(tiny_unet):
    return Planner(diffusers_memory_model(tiny_unet))


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# --- the named architectures --------------------------------------------------------------------------------------

def test_named_architectures_have_the_released_sizes():
    expected = {  # UNet, esd-x, esd-u, text encoders: the released models' parameter counts
        ModelFamily.SD1: (859_520_964, 43_962_560, 813_495_680, 123_060_480),
        ModelFamily.SD2: (865_910_724, 50_352_320, 813_495_680, 340_387_840),
        ModelFamily.SDXL: (2_567_463_684, 545_670_400, 2_014_485_120, 123_060_480 + 694_659_840),
    }
    for family, (unet, esd_x, esd_u, text) in expected.items():
        arch = ARCHITECTURES[family]
        shapes = [(n, p.shape) for n, p in arch.meta_unet().named_parameters()]
        assert count_trained("esd-all", shapes) == unet, family
        assert count_trained("esd-x", shapes) == esd_x, family
        assert count_trained("esd-u", shapes) == esd_u, family
        assert arch.text_encoder_parameters() == text, family


def test_sd15_plan_parts_follow_from_the_real_architecture():
    plan = Planner(architecture_memory_model(ModelFamily.SD1)).plan(
        PlanSettings("esd-u", "bf16", "cuda", resolution=256, gradient_checkpointing=True, optimizer="adamw8bit"))
    assert (plan.parameters, plan.trained_numel) == (859_520_964, 813_495_680)
    assert plan.weights == 2 * 859_520_964                # bf16 storage, loaded once
    assert plan.trained == plan.gradients == 4 * 813_495_680  # one float32 copy, float32 gradients
    assert 2 * 813_495_680 < plan.optimizer_state < 2.1 * 813_495_680  # 8-bit moments + block statistics
    assert plan.text_encoders == 2 * 123_060_480
    assert plan.total == (plan.weights + plan.trained + plan.gradients + plan.optimizer_state + plan.working_set
                          + plan.overhead)


# --- parts against what really gets allocated (tiny model, CPU) --------------------------------------------------

@pytest.mark.parametrize("method,lora_rank", [("esd-x", 0), ("esd-u", 0), ("esd-u", 2)])
@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_parameter_parts_equal_what_the_trainer_allocates(tiny_planner, method, lora_rank, optimizer):
    """Against the trainer's own report of one real iteration (its trained tensors, gradients, optimizer state)."""
    plan = tiny_planner.plan(PlanSettings(method, "fp32", "cpu", resolution=64, optimizer=optimizer,
                                          lora_rank=lora_rank))
    adapter = make_adapter()
    assert plan.weights == _storage_bytes(adapter.unet.parameters())
    result = erase(adapter, ESDConfig(concepts=("a cat",), method=method, lora_rank=lora_rank, optimizer=optimizer,
                                      iterations=1, ddim_steps=2))
    assert plan.trained_numel == result.trained_numel
    assert (plan.trained, plan.gradients, plan.optimizer_state) == (
        result.memory.trained, result.memory.gradients, result.memory.optimizer)


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_8bit_adamw_state_equals_what_bitsandbytes_allocates(tiny_planner, method):
    pytest.importorskip("bitsandbytes", reason="adamw8bit needs bitsandbytes (tools/requirements-dev.txt)")
    plan = tiny_planner.plan(PlanSettings(method, "fp32", "cpu", resolution=64, optimizer="adamw8bit"))
    unet = build_tiny_pipeline(TinyPipelineSpec()).unet.requires_grad_(False)
    trained = make_trainables(ESDConfig(concepts=("a cat",), method=method), unet).parameters()
    for p in trained:
        p.grad = torch.randn_like(p)
    opt = make_optimizer("adamw8bit", trained, 1e-5, torch.device("cpu"))  # the trainer's optimizer
    opt.step()
    # bitsandbytes shares its two quantisation maps between tensors: count each storage once
    assert plan.optimizer_state == _storage_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("optimizer,implementation", [
    ("adam", dict(foreach=True)), ("adam", dict(fused=True)), ("adam", dict(foreach=False)),
    ("adafactor", dict(foreach=True)), ("adafactor", dict(foreach=False))])
def test_optimizer_step_temporaries_equal_what_torch_allocates(optimizer, implementation):
    from esd_core.plan import optimizer_step_bytes

    torch.manual_seed(0)
    shapes = [torch.Size(s) for s in [(640, 320, 3, 3), (1280, 640), (640,), (320, 320, 1, 1)]]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.Adafactor
    opt = cls(params, lr=1e-3, **implementation)
    opt.step()  # the first step creates the state; the second shows the temporaries alone
    with LiveBytes(ignore=[*params, *(p.grad for p in params),
                           *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]) as live:
        opt.step()
    kind = "fused" if implementation.get("fused") else "foreach" if implementation["foreach"] else "single"
    predicted = optimizer_step_bytes(shapes, optimizer, kind)
    biggest = 4 * max(math.prod(s) for s in shapes)
    if (optimizer, kind) == ("adafactor", "single"):  # a bound: the loop overlaps two tensors' temporaries
        assert biggest <= live.peak <= predicted, (live.peak, predicted)
    else:  # exact up to small per-tensor scalars (step counts, norms), far below one tensor
        assert predicted - biggest // 100 <= live.peak <= predicted + biggest // 100, (kind, live.peak, predicted)


def test_lora_trains_the_factors_of_the_selected_linear_and_conv_weights(tiny_unet, tiny_planner):
    rank = 3
    plan = tiny_planner.plan(PlanSettings("esd-u", "fp32", "cpu", resolution=64, lora_rank=rank))
    params = dict(tiny_unet.named_parameters())
    weights = [params[n] for n in select_parameter_names("esd-u", params) if n.endswith(".weight")
               and params[n].dim() in (2, 4)]  # Linear and Conv2d weights; norms and biases are not trained
    expected = sum(rank * (w.shape[1:].numel() + w.shape[0]) for w in weights)
    assert plan.trained_numel == expected and plan.trained == plan.gradients == 4 * expected


# --- activations against measured CPU memory ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_kept_activations_equal_what_a_real_cpu_forward_saves(tiny_unet, tiny_planner, method):
    side = 32
    plan = tiny_planner.plan(PlanSettings(method, "fp32", "cpu", resolution=8 * side))
    unet = build_tiny_pipeline(TinyPipelineSpec()).unet.requires_grad_(False)
    selected = set(select_parameter_names(method, [n for n, _ in unet.named_parameters()]))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in selected)
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(torch.randn(1, 4, side, side), torch.tensor([500]), torch.randn(1, 77, 32)).sample
    # the plan also counts the prediction itself (alive after the forward, as in the trainer)
    assert plan.saved_activations == sum(saved.values()) + out.untyped_storage().nbytes()


def test_working_sets_match_the_peak_memory_of_a_real_cpu_run(tiny_unet, tiny_planner, tmp_path):
    """The strongest check: the planner's meta-device figures against the real process's peak RSS."""
    side = 64  # large enough latents that activations dwarf the process's small allocations
    settings = PlanSettings("esd-u", "fp32", "cpu", resolution=8 * side)
    plan, checkpointed = tiny_planner.plan(settings), tiny_planner.plan(settings.replace(gradient_checkpointing=True))
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(dict(tiny_unet.config)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_rss_probe.py"), str(config), "esd-u", str(side)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    assert real["step"] == pytest.approx(plan.training_step, rel=0.05), (real, plan.training_step)
    assert real["sampling"] == pytest.approx(plan.sampling, rel=0.05), (real, plan.sampling)
    assert real["step_checkpointed"] == pytest.approx(checkpointed.training_step, rel=0.05), (
        real, checkpointed.training_step)
    assert checkpointed.training_step < plan.training_step


# --- CUDA: autocast replayed on meta against torch's own autocast on fake CUDA tensors ----------------------------

def _fake_cuda_forward(config, method, side, batch, cache, grad):
    """torch's real CUDA autocast (bf16) on FakeTensor CUDA tensors (no GPU needed): (saved bytes, output bytes, peak)."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with torch.device("cuda"):
            unet = UNet2DConditionModel.from_config(config)
        unet.requires_grad_(False)
        selected = set(select_parameter_names(method, [n for n, _ in unet.named_parameters()]))
        for n, p in unet.named_parameters():  # the trainer's layout: frozen bf16, trained float32
            p.data = torch.empty(p.shape, dtype=torch.float32 if n in selected else torch.bfloat16, device="cuda")
            p.requires_grad_(n in selected)
        params = {p.untyped_storage()._cdata for p in unet.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in params:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_cache_enabled(cache)
        try:
            # TargetKernels without an autocast dtype only routes attention to the fused kernel CUDA runs
            with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    LiveBytes(list(unet.parameters())) as live, TargetKernels("cuda"):
                out = unet(torch.empty(batch, 4, side, side, device="cuda"), torch.full((batch,), 500, device="cuda"),
                           torch.empty(batch, 77, 32, device="cuda")).sample
        finally:
            torch.set_autocast_enabled("cuda", False)
            torch.clear_autocast_cache()
            torch.set_autocast_cache_enabled(True)
        return sum(saved.values()), out.untyped_storage().nbytes(), live.peak


@pytest.mark.parametrize("method,cache", [("esd-x", True), ("esd-u", True), ("esd-u", False)])
def test_cuda_autocast_plan_equals_torch_autocast(tiny_unet, tiny_planner, method, cache):
    side = 32
    plan = tiny_planner.plan(PlanSettings(method, "bf16", "cuda", resolution=8 * side, autocast_cache=cache))
    saved, out, _ = _fake_cuda_forward(dict(tiny_unet.config), method, side, 1, cache, grad=True)
    assert plan.saved_activations == saved + out
    _, _, sampling_peak = _fake_cuda_forward(dict(tiny_unet.config), method, side, 2, cache, grad=False)
    assert plan.sampling == sampling_peak


def test_cuda_attention_keeps_no_attention_matrix(tiny_planner):
    """Fused attention keeps q, k, v and the output: activations grow with the latent area (4x from 256 to 512 px),
    where a kept (tokens x tokens) attention matrix would make them grow with its square."""
    small, large = (tiny_planner.plan(PlanSettings("esd-x", "bf16", "cuda", resolution=r)).saved_activations
                    for r in (256, 512))
    assert 3.5 < large / small < 4.5


# --- pre-flight ---------------------------------------------------------------------------------------------------

def test_check_fits_passes_a_run_that_fits_or_an_unknown_device(tiny_planner):
    plan = tiny_planner.plan(PlanSettings("esd-u", "fp32", "cpu", resolution=256))
    check_fits(plan, plan.total)
    check_fits(plan, None)


def test_check_fits_names_the_estimate_and_exactly_the_option_sets_that_fit(tiny_planner):
    plan = tiny_planner.plan(PlanSettings("esd-u", "fp32", "cuda", resolution=512, sampling_batch=1))
    singles = {  # each lever alone, planned independently
        "checkpointing": plan.settings.replace(gradient_checkpointing=True),
        "bf16": plan.settings.replace(dtype="bf16"),
        "adamw8bit": plan.settings.replace(optimizer="adamw8bit"),
        "adafactor": plan.settings.replace(optimizer="adafactor"),
        "LoRA rank 4": plan.settings.replace(lora_rank=4),
    }
    totals = {name: tiny_planner.plan(s).total for name, s in singles.items()}
    budget = sorted(totals.values())[2] + 1  # two or three levers fit alone, the others do not
    assert plan.total > budget
    options = fitting_options(plan, budget, limit=100)
    listed = [o.changes for o in options]
    for name, total in totals.items():
        assert ((name,) in listed) == (total <= budget), (name, total, budget)
    for option in options:
        assert option.plan.total <= budget
        assert not any(set(other) < set(option.changes) for other in listed)  # only the smallest sets
    with pytest.raises(InsufficientMemoryError) as e:
        check_fits(plan, budget)
    message = str(e.value)
    assert f"{plan.total / GIB:.2f} GiB" in message and f"{budget / GIB:.2f} GiB" in message
    for option in options[:4]:
        assert option.describe() in message


def test_check_fits_when_nothing_but_a_smaller_run_fits(tiny_planner):
    plan = tiny_planner.plan(PlanSettings("esd-all", "fp32", "cpu", resolution=512))
    levers = [dict(gradient_checkpointing=True), dict(optimizer="adafactor"), dict(lora_rank=4)]  # the CPU's levers
    combos = [{k: v for i, lever in enumerate(levers) if mask >> i & 1 for k, v in lever.items()} for mask in range(8)]
    budget = min(tiny_planner.plan(plan.settings.replace(**c)).total for c in combos) - 1
    options = fitting_options(plan, budget)
    assert options and all(o.plan.total <= budget for o in options)
    assert all(any(c.endswith(" px") or c.startswith("method ") for c in o.changes) for o in options)


def test_available_memory_counts_the_resident_weights():
    resident = torch.nn.Linear(4096, 4096)  # 64 MiB of weights
    free = available_memory("cpu")
    assert free > 0
    # RAM use by other processes moves a little between two readings
    assert available_memory("cpu", resident=resident) - free == pytest.approx(_storage_bytes(resident.parameters()),
                                                                              abs=16 << 20)
    assert available_memory("meta") is None


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="float32"):
        PlanSettings(device="cpu", dtype="bf16")
    with pytest.raises(ConfigError, match="optimizer"):
        PlanSettings(optimizer="sgd")
    with pytest.raises(ConfigError, match="multiple of 8"):
        PlanSettings(resolution=500)


def test_comfyui_units_in_diffusers_tree(tiny_unet):
    names = [type(m).__name__ for m in comfyui_units(tiny_unet)]
    assert {"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"} <= set(names)
    assert not set(names) & {"CrossAttnDownBlock2D", "UpBlock2D", "UNetMidBlock2DCrossAttn", "ModuleList"}
    # every ResBlock and transformer once, as ComfyUI's UNet has them
    blocks = [*tiny_unet.down_blocks, tiny_unet.mid_block, *tiny_unet.up_blocks]
    assert names.count("ResnetBlock2D") == sum(len(b.resnets) for b in blocks)
    assert names.count("Transformer2DModel") == sum(len(getattr(b, "attentions", [])) for b in blocks)


# --- command line -------------------------------------------------------------------------------------------------

def test_plan_command_prints_the_parts_and_what_fits(capsys):
    code = main(["plan", "--family", "sd1", "--method", "esd-x-strict", "--dtype", "bf16", "--resolution", "256",
                 "--gradient-checkpointing", "--budget", "2.5", "--budget", "8"])
    out = capsys.readouterr().out
    assert code == 0
    for part in ("weights (bf16, 859,520,964 parameters)", "trained tensors (float32 copies, 19,169,280)",
                 "gradients", "optimizer state (adam)", "training step", "sampling forward", "total"):
        assert part in out
    assert "8 GiB: fits" in out
    # 2.7 GiB as planned, of which the bf16 weights are 1.6 and the CUDA context 0.75: only LoRA's cut fits
    assert "2.5 GiB: does not fit; options that fit: LoRA rank 4: 2.40 GiB" in out


def test_preflight_plans_and_stops_a_run_that_cannot_fit(tiny_unet):
    model = diffusers_memory_model(tiny_unet)
    config = ESDConfig(concepts=("a cat",), method="esd-u", resolution=64)
    plan = preflight(model, config, False, torch.float32, "cpu", resident=tiny_unet)  # a tiny run fits in RAM
    assert plan is not None and plan.total < available_memory("cpu", resident=tiny_unet)
    assert plan.settings == PlanSettings("esd-u", "fp32", "cpu", resolution=64)
    huge = ESDConfig(concepts=("a cat",), method="esd-u", resolution=8 * 2048, trajectory_pool=32)  # ~hundreds of GiB
    with pytest.raises(InsufficientMemoryError, match="needs about"):
        preflight(model, huge, False, torch.float32, "cpu")
    assert preflight(model, config, False, torch.float32, "meta") is None  # no memory figure: not checked
    assert preflight(model, config, False, torch.bfloat16, "cpu") is None  # CPU autocast is not modelled


def test_settings_of_a_run_follow_its_config():
    base = dict(concepts=("a cat",), method="esd-u", optimizer="adafactor", lora_rank=4, resolution=256)
    s = PlanSettings.for_run(ESDConfig(**base), True, torch.bfloat16, "cuda:0")
    assert (s.method.value, s.dtype, s.device, s.optimizer, s.lora_rank, s.resolution, s.gradient_checkpointing,
            s.sampling_batch) == ("esd-u", "bf16", "cuda", "adafactor", 4, 256, True, 2)
    assert PlanSettings.for_run(ESDConfig(**base, erase_from=("a pet",)), False, torch.float32, "cpu").sampling_batch == 3
    pooled = PlanSettings.for_run(ESDConfig(**base, trajectory_pool=6, ddim_steps=10, sample_with="frozen"), False,
                                  torch.float32, "cpu")
    assert (pooled.sampling_batch, pooled.trajectory_pool, pooled.ddim_steps, pooled.pool_teacher) == (12, 6, 10, True)


def test_the_pool_part_is_what_a_real_pool_holds(tiny_planner):
    import random

    from esd_core.sampling import ddim_timesteps
    from esd_core.trainer import encode_prompts, latent_shape
    from esd_core.xt import PoolSource, SamplingContext

    adapter = make_adapter()
    for sample_with in ("frozen", "trained"):
        config = ESDConfig(concepts=("a cat",), ddim_steps=4, trajectory_pool=3, sample_with=sample_with)
        trainables = make_trainables(config, adapter.unet)
        ctx = SamplingContext(predict=adapter.predict_noise, alphas_cumprod=adapter.alphas_cumprod,
                              timesteps=ddim_timesteps(1000, 4), latent_shape=latent_shape(adapter, 0),
                              device=adapter.device, frozen=trainables.frozen)
        source = PoolSource(config, encode_prompts(adapter, config), random.Random(0), torch.Generator().manual_seed(0))
        source.next(ctx)
        plan = tiny_planner.plan(PlanSettings.for_run(config, False, torch.float32, "cpu"))
        assert plan.pool == _storage_bytes(t for t in (source.latents, source.teacher) if t is not None), sample_with
        assert plan.sampling >= 2 * plan.pool  # the refill stacks a second copy while the first is kept
        trainables.restore()
