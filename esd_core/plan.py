"""Memory planning: what an ESD run needs on its device, part by part, before anything is loaded.

The planner builds the real UNet on the meta device (shapes, no memory) laid out as the trainer lays it out, and
*measures* what the run allocates by running it there:

- **weights**: every UNet parameter at the storage dtype, loaded once (the frozen teacher is the same tensors);
- **trained tensors**: the trainer's own (`esd_core.trainer.make_trainables`, made on the meta copy): one float32
  copy of each selected parameter, or with LoRA (``lora_rank`` r > 0) float32 factors ``r * (in * kh * kw + out)``
  for each selected Linear/Conv2d weight (norms and biases are not trained);
- **gradients**: float32, one per trained element;
- **optimizer state** (`optimizer_state_bytes`): ``adam`` two float32 moments; ``adamw8bit`` (bitsandbytes) two
  uint8 moments plus one float32 absmax per 256-element block each, float32 moments for tensors under 4,096
  elements; ``adafactor`` (``torch.optim.Adafactor``) float32 row and column second-moment factors over the last two
  dimensions (for a 3x3 convolution that is 6 of every 9 elements, for a 1x1 convolution all of them: Adafactor
  saves little on ESD-u's convolutions), the full second moment for 1-D tensors, no first moment;
- **working set**, the largest of: the training step (the student forward at batch 1 and its backward: what
  autograd keeps and the backward's temporaries, measured by running both on the meta device while tracking every
  tensor storage that is alive), one no-grad forward at the sampling batch (2 for guided sampling, 3 with
  ``erase_from``, 2P for P trajectories sampled at once), and the optimizer step's temporaries (fused Adam none;
  foreach implementations about one float32 copy of all trained tensors; per-tensor loops about two of the
  largest: `optimizer_step_bytes`);
- **overhead**: on CUDA a fixed `CUDA_CONTEXT_BYTES` plus `FRAGMENTATION` of the working set; on the CPU only the
  fragmentation allowance (the process that asks is already running).

The trainer's kernels are modelled as they run on the target device. CUDA: the model computes under autocast in the
storage dtype when that is bf16/fp16 (autocast's casting rules are replayed on the meta device, including its cache
of the float32 trained weights' low-precision copies); attention is PyTorch's fused SDPA (flash for bf16/fp16,
memory-efficient for fp32), which keeps q, k, v, the output and a log-sum-exp for backward, never the attention
matrix. CPU: float32, attention as PyTorch's CPU flash kernel. Gradient checkpointing recomputes the front end's
units (`MemoryModel.checkpoint_units`). Gradients are counted as alive through the whole iteration (the trainer
keeps them from one step to the next), which errs on the safe side.

Text encoders encode the prompts before the UNet is loaded and are released, so they are not in the training total;
they are reported, since they set a floor.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .adapter import ModelFamily
from .config import ESDConfig, Method, SampleWith, parse_method
from .errors import ConfigError, InsufficientMemoryError
from .memory import checkpoint_units, gradient_checkpointing

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adam", "adamw8bit", "adafactor")
DEVICES = ("cuda", "cpu")
GIB = 1 << 30

#: A CUDA context with PyTorch's kernels loaded: 723 MiB measured by a PyTorch user for ``torch.randn(1).cuda()``
#: (discuss.pytorch.org/t/73021); lazy module loading (the default since CUDA 12.2) usually needs less, and cuBLAS and
#: cuDNN workspaces come on top: 768 MiB covers the usual case.
CUDA_CONTEXT_BYTES = 768 << 20
#: PyTorch's caching allocator rounds block sizes and splits blocks, so the memory it reserves exceeds what tensors
#: use; an allowance on the varying part (the working set), not a measurement.
FRAGMENTATION = 0.10
#: The rank the planner suggests when LoRA would make a run fit (the rank LECO and Concept Sliders train).
SUGGESTED_LORA_RANK = 4

#: (unet, batch, latent side) -> the noise prediction; builds its own inputs on the meta device.
Forward = Callable[[torch.nn.Module, int, int], torch.Tensor]


@dataclass(frozen=True)
class MemoryModel:
    """A UNet to plan for: a structurally identical copy on the meta device and how the front end calls it."""

    unet: torch.nn.Module
    forward: Forward
    #: The modules gradient checkpointing recomputes, found in a (copy of the) UNet.
    checkpoint_units: Callable[[torch.nn.Module], list[torch.nn.Module]]
    native_resolution: int  # pixels
    latent_channels: int = 4
    vae_scale_factor: int = 8
    text_encoder_parameters: int = 0
    label: str = "UNet"


@dataclass(frozen=True)
class PlanSettings:
    """The settings of a run that decide its memory."""

    method: Method = Method.ESD_X
    dtype: str = "fp32"  # storage dtype of the base weights; on CUDA also the autocast dtype
    device: str = "cuda"
    resolution: int = 0  # pixels; 0 = the model's native size
    gradient_checkpointing: bool = False
    optimizer: str = "adam"
    lora_rank: int = 0
    #: Batch of the largest no-grad forward: 2 for guided sampling, 3 for the teacher with ``erase_from``, 2P when
    #: P trajectories are sampled together (`for_run` derives it).
    sampling_batch: int = 2
    #: The x_t pool (`esd_core.xt.PoolSource`): P trajectories of ``ddim_steps`` latents each, and with
    #: ``pool_teacher`` the teacher's two predictions for each latent too (0: no pool).
    trajectory_pool: int = 0
    ddim_steps: int = 50
    pool_teacher: bool = False
    #: torch.autocast's ``cache_enabled``: the cache keeps a low-precision copy of every float32 trained weight for
    #: the whole forward, even where checkpointing would not keep it (2 bytes per trained weight at the peak). The
    #: trainer's adapters run with it off.
    autocast_cache: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_method(self.method))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)} (got {self.dtype!r})")
        if self.device not in DEVICES:
            raise ConfigError(f"the planner models {list(DEVICES)} devices (got {self.device!r})")
        if self.device == "cpu" and self.dtype != "fp32":
            raise ConfigError("on the CPU the trainer computes in float32; plan CPU runs with dtype fp32")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be 0 (train the weights) or a positive rank (got {self.lora_rank})")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"resolution must be 0 (native) or a positive multiple of 8 pixels (got {self.resolution})")
        if self.sampling_batch < 1:
            raise ConfigError(f"sampling_batch must be at least 1 (got {self.sampling_batch})")
        if self.trajectory_pool < 0:
            raise ConfigError(f"trajectory_pool must be >= 0 (got {self.trajectory_pool})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def for_run(cls, config: ESDConfig, gradient_checkpointing: bool, dtype: torch.dtype,
                device: torch.device | str) -> "PlanSettings":
        """The settings of a trainer run: its config, whether it checkpoints, the model's compute dtype and device."""
        pool = config.trajectory_pool
        return cls(method=config.method, dtype={v: k for k, v in DTYPES.items()}[dtype],
                   device=torch.device(device).type, resolution=config.resolution,
                   gradient_checkpointing=gradient_checkpointing, optimizer=config.optimizer.value,
                   lora_rank=config.lora_rank, sampling_batch=2 * pool if pool else 3 if config.erase_from else 2,
                   trajectory_pool=pool, ddim_steps=config.ddim_steps,
                   pool_teacher=config.sample_with == SampleWith.FROZEN and not config.erase_from)

    def replace(self, **changes) -> "PlanSettings":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Short human form, e.g. ``esd-u, bf16, checkpointing, adafactor`` (the resolution is the plan's)."""
        parts = [self.method.value, self.dtype]
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        parts.append(self.optimizer)
        if self.lora_rank:
            parts.append(f"LoRA rank {self.lora_rank}")
        if self.trajectory_pool:
            parts.append(f"pool of {self.trajectory_pool}")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes each part of a run needs on its device; `total` is the estimated peak."""

    settings: PlanSettings
    resolution: int  # pixels actually planned for
    parameters: int
    trained_numel: int
    weights: int
    trained: int
    gradients: int
    optimizer_state: int
    pool: int               # the x_t pool, kept between refills
    saved_activations: int  # alive after the student forward (what autograd keeps, and the prediction itself)
    training_step: int      # the student forward + backward: activations and the backward's temporaries
    sampling: int           # one no-grad forward at the sampling batch (and, refilling, the pool being built)
    optimizer_step: int     # temporaries of optimizer.step()
    overhead: int
    text_encoders: int      # not in the total: encoded and released before the UNet is loaded
    label: str = "UNet"
    replan: Callable[[PlanSettings], "MemoryPlan"] | None = field(default=None, compare=False, repr=False)

    @property
    def working_set(self) -> int:
        return max(self.training_step, self.sampling, self.optimizer_step)

    @property
    def total(self) -> int:
        return (self.weights + self.trained + self.gradients + self.optimizer_state + self.pool + self.working_set
                + self.overhead)

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in print order; indented rows are the candidates of the working set."""
        s = self.settings
        trained = (f"LoRA rank {s.lora_rank} factors" if s.lora_rank else "float32 copies") + f", {self.trained_numel:,}"
        return [
            (f"weights ({s.dtype}, {self.parameters:,} parameters)", self.weights),
            (f"trained tensors ({trained})", self.trained),
            ("gradients (float32)", self.gradients),
            (f"optimizer state ({s.optimizer})", self.optimizer_state),
            *([(f"x_t pool ({s.trajectory_pool} trajectories x {s.ddim_steps} latents)", self.pool)]
              if s.trajectory_pool else []),
            ("working set, the largest of:", self.working_set),
            (f"  training step (batch 1; {_gib(self.saved_activations)} kept for backward)", self.training_step),
            (f"  sampling forward (batch {s.sampling_batch}, no gradients)", self.sampling),
            ("  optimizer step temporaries", self.optimizer_step),
            ("overhead (" + ("CUDA context + " if s.device == "cuda" else "") +
             f"{FRAGMENTATION:.0%} of the working set)", self.overhead),
            ("total", self.total),
            ("text encoders (before training, then released)", self.text_encoders),
        ]

    def format(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        head = f"{self.label}, {self.settings.describe()}, {self.resolution} px, on {self.settings.device}"
        return "\n".join([head] + [f"  {k.ljust(width)}  {_gib(v):>10}" for k, v in rows])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


# --- front ends ---------------------------------------------------------------------------------------------------

def diffusers_memory_model(unet: torch.nn.Module, *, native_resolution: int | None = None,
                           text_encoder_parameters: int = 0, label: str = "UNet",
                           units: Callable[[torch.nn.Module], list[torch.nn.Module]] = checkpoint_units) -> MemoryModel:
    """A `MemoryModel` for a diffusers ``UNet2DConditionModel`` (a meta copy is made if it is not on meta), with
    gradient checkpointing on the units the trainer checkpoints (`esd_core.memory.checkpoint_units`: on diffusers'
    UNet its whole down/mid/up blocks)."""
    meta = unet if _is_meta(unet) else _meta_copy_of_diffusers(unet)
    native = native_resolution or int(meta.config.sample_size) * 8
    return MemoryModel(meta, _diffusers_forward, units, native, latent_channels=int(meta.config.in_channels),
                       text_encoder_parameters=text_encoder_parameters, label=label)


def architecture_memory_model(family: ModelFamily) -> MemoryModel:
    """The `MemoryModel` of a named family's real architecture (`esd_core.architectures`), checkpointed as the
    ComfyUI nodes checkpoint it (`comfyui_units`)."""
    from .architectures import ARCHITECTURES

    arch = ARCHITECTURES[family]
    return diffusers_memory_model(arch.meta_unet(), native_resolution=arch.native_resolution,
                                  text_encoder_parameters=arch.text_encoder_parameters(), label=arch.label,
                                  units=comfyui_units)


def _is_meta(module: torch.nn.Module) -> bool:
    return all(p.is_meta for p in module.parameters())


def _meta_copy_of_diffusers(unet: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        return type(unet).from_config(unet.config)


def _diffusers_forward(unet: torch.nn.Module, batch: int, side: int) -> torch.Tensor:
    cfg = unet.config
    meta = dict(device="meta")
    sample = torch.empty(batch, cfg.in_channels, side, side, **meta)
    timesteps = torch.full((batch,), 500, dtype=torch.long, **meta)
    context = torch.empty(batch, 77, cfg.cross_attention_dim, **meta)
    extra = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + six size/crop numbers
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text_dim, **meta),
                                      "time_ids": torch.empty(batch, 6, **meta)}
    return unet(sample, timesteps, context, return_dict=False, **extra)[0]


def comfyui_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The units `checkpoint_units` finds in ComfyUI's UNet (each ResBlock, transformer and up/downsampler), found
    in diffusers' tree, which groups them in down/mid/up block modules: these blocks are opened here."""
    units: list[torch.nn.Module] = []
    for name, child in unet.named_children():
        if name in ("down_blocks", "up_blocks", "mid_block"):
            for block in [child] if name == "mid_block" else child:
                for part in ("resnets", "attentions", "downsamplers", "upsamplers"):
                    units.extend(getattr(block, part, None) or [])
        else:
            units.extend(checkpoint_units(torch.nn.ModuleList([child])))
    return units


# --- parts that follow from shapes --------------------------------------------------------------------------------

def optimizer_state_bytes(shapes: Iterable[torch.Size], optimizer: str) -> int:
    """Bytes of optimizer state for float32 trained tensors of these shapes, read off the implementations: torch's
    optimizers keep a float32 step counter per tensor besides their moments; bitsandbytes keeps 8-bit moments for
    tensors of 4,096 elements and more, with a float32 absmax per 256-element block, and two quantisation maps
    shared by all tensors."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adam":
            total += 8 * n + 4
        elif optimizer == "adamw8bit":
            total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256)
        elif optimizer == "adafactor":
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) > 1 else n) + 4
        else:
            raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)} (got {optimizer!r})")
    if optimizer == "adamw8bit" and total:
        total += 2 * 256 * 4
    return total


def pool_bytes(settings: PlanSettings, latent_channels: int, side: int) -> int:
    """The x_t pool (`esd_core.xt.PoolSource`): float32 latents (S, P, C, H, W), and with the teacher recorded its
    two predictions (S, P, 2, C, H, W)."""
    latents = settings.ddim_steps * settings.trajectory_pool * latent_channels * side * side * 4
    return latents * (3 if settings.pool_teacher else 1)


def optimizer_implementation(optimizer: str, device: str) -> str:
    """How `esd_core.optim.make_optimizer`'s optimizer runs: Adam ``fused`` on CUDA; bitsandbytes' fused 8-bit
    kernel; otherwise torch's default, ``foreach`` on CUDA and a per-tensor loop (``single``) on the CPU."""
    if optimizer == "adamw8bit" or (optimizer == "adam" and device == "cuda"):
        return "fused"
    return "foreach" if device == "cuda" else "single"


def optimizer_step_bytes(shapes: Sequence[torch.Size], optimizer: str, implementation: str) -> int:
    """Temporaries of one optimizer step over float32 tensors of these shapes, read off torch's implementations.

    Fused kernels (Adam on CUDA, bitsandbytes) make none. Adam: foreach takes the square roots of all second moments
    at once (one copy of everything), the per-tensor loop two copies of the largest tensor. Adafactor: its variance
    estimate ``row_var @ col_var`` is full size, plus the row factors' means (``prod(shape[:-2])``, for a 1x1
    convolution as large as the tensor itself); foreach makes them for all tensors at once; the loop holds one
    tensor's while making the next one's, bounded here by twice the largest.
    """
    if implementation == "fused" or not shapes:
        return 0
    if optimizer == "adam":
        sizes = [math.prod(s) for s in shapes]
        return 4 * (sum(sizes) if implementation == "foreach" else 2 * max(sizes))
    sizes = [math.prod(s) + (math.prod(s[:-2]) if len(s) > 1 else 0) for s in shapes]
    return 4 * (sum(sizes) if implementation == "foreach" else 2 * max(sizes))


# --- planning -----------------------------------------------------------------------------------------------------

class Planner:
    """Plans runs of one `MemoryModel`; measurements are cached, so trying many option sets stays quick."""

    def __init__(self, model: MemoryModel):
        self.model = model
        self._measured: dict[tuple, tuple[int, int, int]] = {}
        self._shapes: dict[tuple, list[torch.Size]] = {}

    def plan(self, settings: PlanSettings) -> MemoryPlan:
        model, s = self.model, settings
        resolution = s.resolution or model.native_resolution
        side = resolution // model.vae_scale_factor
        if side < 1:
            raise ConfigError(f"resolution {resolution} px is below one latent pixel")
        trained_shapes = self._trained_shapes(s)
        trained_numel = sum(math.prod(t) for t in trained_shapes)
        parameters = sum(p.numel() for p in model.unet.parameters())
        weights = parameters * s.torch_dtype.itemsize + sum(b.nbytes for b in model.unet.buffers())

        key = (s.method, s.lora_rank, s.dtype, s.device, side, s.gradient_checkpointing, s.sampling_batch,
               s.autocast_cache)
        if key not in self._measured:
            self._measured[key] = measure_working_set(model, s, side)
        saved, step, sampling = self._measured[key]
        optimizer_step = optimizer_step_bytes(trained_shapes, s.optimizer,
                                              optimizer_implementation(s.optimizer, s.device))
        pool = pool_bytes(s, model.latent_channels, side)
        # refilling: the new pool's latents accumulate while the old pool is kept, then are stacked (a second copy)
        sampling = max(sampling + pool, 2 * pool)
        working = max(step, sampling, optimizer_step)
        overhead = (CUDA_CONTEXT_BYTES if s.device == "cuda" else 0) + int(FRAGMENTATION * working)
        text = model.text_encoder_parameters * s.torch_dtype.itemsize
        return MemoryPlan(
            settings=s, resolution=resolution, parameters=parameters, trained_numel=trained_numel, weights=weights,
            trained=4 * trained_numel, gradients=4 * trained_numel,
            optimizer_state=optimizer_state_bytes(trained_shapes, s.optimizer), pool=pool, saved_activations=saved,
            training_step=step, sampling=sampling, optimizer_step=optimizer_step, overhead=overhead,
            text_encoders=text, label=model.label, replan=self.plan)

    def _trained_shapes(self, s: PlanSettings) -> list[torch.Size]:
        """Shapes of the tensors the trainer trains (its own trainables, made on a meta copy)."""
        key = (s.method, s.lora_rank)
        if key not in self._shapes:
            trainables = trainer_layout(copy.deepcopy(self.model.unet), s)
            self._shapes[key] = [t.shape for t in trainables.parameters()]
        return self._shapes[key]


def plan_memory(model: MemoryModel, settings: PlanSettings) -> MemoryPlan:
    """Plan one run (see the module docstring for what each part holds)."""
    return Planner(model).plan(settings)


# --- measuring on the meta device ---------------------------------------------------------------------------------

def measure_working_set(model: MemoryModel, settings: PlanSettings, side: int) -> tuple[int, int, int]:
    """(kept for backward, training-step peak, sampling-forward peak) in bytes, beyond the parameters and gradients,
    measured by running a copy of the meta UNet laid out as the trainer lays it out."""
    unet = copy.deepcopy(model.unet)
    trained = trainer_layout(unet, settings).parameters()
    kernels = TargetKernels.of(settings)
    units = model.checkpoint_units(unet) if settings.gradient_checkpointing else []
    for unit in units:  # a recomputation during backward runs outside `kernels`: re-enter it there
        unit.forward = kernels.wrap(unit.forward)
    ignore = [*unet.parameters(), *unet.buffers(), *trained]
    with gradient_checkpointing(units):
        with LiveBytes(ignore) as live:
            for t in trained:  # gradients are counted as their own part: keep them out of the working set
                t.register_post_accumulate_grad_hook(lambda t: live.ignore(t.grad))
            with kernels:
                prediction = model.forward(unet, 1, side)
            kernels.end_of_forward()  # autocast empties its cast cache when the forward's autocast region exits
            saved = live.current
            prediction.float().square().mean().backward()
            del prediction
            step = live.peak
    with torch.no_grad(), LiveBytes(ignore) as live, TargetKernels.of(settings):
        model.forward(unet, settings.sampling_batch, side)
        sampling = live.peak
    return saved, step, sampling


def trainer_layout(unet: torch.nn.Module, settings: PlanSettings):
    """Lay a meta UNet out as the trainer does: every weight at the storage dtype, then the trainer's own trained
    tensors (`esd_core.trainer.make_trainables`: float32 copies of the method's weights, or LoRA adapters on its
    Linear/Conv2d layers, added by forward hooks). Returns the trainables."""
    from .trainer import make_trainables  # the trainer calls the planner: imported when used

    unet.requires_grad_(False)
    for p in unet.parameters():
        p.data = torch.empty(p.shape, dtype=settings.torch_dtype, device="meta")
    config = ESDConfig(concepts=("memory plan",), method=settings.method, lora_rank=settings.lora_rank)
    return make_trainables(config, unet)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every tensor storage the ops under it create, while they are alive: `current` and
    `peak`. Storages of the tensors in ``ignore`` (parameters, trained tensors) and their views are not counted."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._ignored = {t.untyped_storage()._cdata for t in ignore}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._bytes = 0
        self.peak = 0

    @property
    def current(self) -> int:
        self._drop_freed()
        return self._bytes

    def ignore(self, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        key = tensor.untyped_storage()._cdata
        self._ignored.add(key)
        if key in self._live:
            self._bytes -= self._live.pop(key)[1]

    def _drop_freed(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._bytes -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._ignored and (key not in self._live or self._live[key][0].expired()):
                    if key in self._live:  # a freed storage's address, reused
                        self._bytes -= self._live[key][1]
                    self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self._bytes += storage.nbytes()
        # _bytes may still count storages freed since the last sweep: an upper bound. Only when it exceeds the peak
        # can the peak move, so only then is the (costly) sweep needed to know by how much.
        if self._bytes > self.peak:
            self._drop_freed()
            self.peak = max(self.peak, self._bytes)
        return out


#: Autocast's CUDA op lists (torch.amp docs, "CUDA Ops that can autocast to ..."), as the functions a UNet calls.
_TO_LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
             torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
             torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum,
             F.scaled_dot_product_attention}
_TO_FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
               torch.log_softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
               torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, torch.norm, torch.Tensor.norm,
               F.normalize, F.mse_loss, torch.cumsum, torch.Tensor.cumsum}
_TO_WIDEST = {torch.cat, torch.stack}


class TargetKernels(TorchFunctionMode):
    """Runs a forward on meta tensors as it runs on the target device: scaled-dot-product attention through the fused
    kernel PyTorch picks there, and on CUDA with a bf16/fp16 compute dtype autocast's casting rules and cast cache
    (meta tensors have no autocast of their own)."""

    def __init__(self, device: str, autocast_dtype: torch.dtype | None = None, autocast_cache: bool = True):
        super().__init__()
        self.device = device
        self.lower = autocast_dtype
        self._cache: dict[int, torch.Tensor] = {}
        self._caching = autocast_cache
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        return super().__exit__(*exc)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run under these kernels, whether or not they are active where it is called."""
        def wrapped(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            with self:
                return fn(*args, **kwargs)
        return wrapped

    @classmethod
    def of(cls, settings: PlanSettings) -> "TargetKernels":
        """The trainer's kernels for these settings: autocast on CUDA when the storage dtype is bf16/fp16."""
        dtype = settings.torch_dtype
        autocast = dtype if settings.device == "cuda" and dtype != torch.float32 else None
        return cls(settings.device, autocast, settings.autocast_cache)

    def end_of_forward(self) -> None:
        """Like leaving autocast: drop the cast cache. A recomputation during backward (checkpointing) runs in an
        autocast region of its own whose cache goes with it; its casts are saved for its backward anyway, so from
        here on they are simply not cached."""
        self._cache.clear()
        self._caching = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.lower is not None:
            if func in _TO_LOWER:
                args, kwargs = tree_map(lambda a: self._cast(a, self.lower), (args, kwargs))
            elif func in _TO_FLOAT32:
                args, kwargs = tree_map(lambda a: self._cast(a, torch.float32), (args, kwargs))
            elif func in _TO_WIDEST:
                floats = [a.dtype for a in tree_leaves((args, kwargs)) if _castable(a)]
                if floats:
                    widest = max(floats, key=lambda d: torch.finfo(d).bits)
                    args, kwargs = tree_map(lambda a: self._cast(a, widest), (args, kwargs))
        if func is F.scaled_dot_product_attention:
            return self._fused_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, a, dtype: torch.dtype):
        if not _castable(a) or a.dtype == dtype:
            return a
        cacheable = (self._caching and dtype == self.lower and a.dtype == torch.float32 and a.is_leaf
                     and a.requires_grad)
        if not cacheable:
            return a.to(dtype)
        if id(a) not in self._cache:
            self._cache[id(a)] = a.to(dtype)
        return self._cache[id(a)]

    def _fused_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        aten = torch.ops.aten
        if self.device == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16):
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal,
                                                            scale=scale)[0]


def _castable(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64


# --- what fits ----------------------------------------------------------------------------------------------------

#: Changes that leave what is erased (nearly) as it is, cheapest first: (name, how it changes the settings, applies?).
_LEVERS: tuple[tuple[str, Callable[[PlanSettings], PlanSettings], Callable[[PlanSettings], bool]], ...] = (
    ("checkpointing", lambda s: s.replace(gradient_checkpointing=True), lambda s: not s.gradient_checkpointing),
    ("bf16", lambda s: s.replace(dtype="bf16"), lambda s: s.device == "cuda" and s.dtype == "fp32"),
    ("half the trajectory pool", lambda s: s.replace(trajectory_pool=s.trajectory_pool // 2,
                                                     sampling_batch=2 * (s.trajectory_pool // 2)),
     lambda s: s.trajectory_pool > 1),
    ("adamw8bit", lambda s: s.replace(optimizer="adamw8bit"), lambda s: s.optimizer == "adam"),
    ("adafactor", lambda s: s.replace(optimizer="adafactor"), lambda s: s.optimizer == "adam"),
    (f"LoRA rank {SUGGESTED_LORA_RANK}", lambda s: s.replace(lora_rank=SUGGESTED_LORA_RANK), lambda s: not s.lora_rank),
)
#: Methods that train fewer weights, for when nothing else fits (they erase differently).
_SMALLER_METHOD = {Method.ESD_ALL: Method.ESD_U, Method.ESD_U: Method.ESD_X, Method.ESD_X: Method.ESD_X_STRICT,
                   Method.SELFATTN: Method.ESD_X_STRICT}


@dataclass(frozen=True)
class FittingOption:
    """A set of changes to the requested settings and the plan it gives."""

    changes: tuple[str, ...]
    plan: MemoryPlan

    def describe(self) -> str:
        return f"{' + '.join(self.changes)}: {_gib(self.plan.total)}"


def fitting_options(plan: MemoryPlan, budget: int, limit: int = 4) -> list[FittingOption]:
    """The smallest sets of changes to ``plan``'s settings whose plan fits in ``budget`` bytes, recommended first.

    Tries every combination of the memory levers (checkpointing, bf16, half the trajectory pool, a low-memory
    optimizer, LoRA); a set is listed only if no subset of its changes fits. If none fits, the leanest such
    combination is tried with a lower resolution or a smaller method. Sets are ranked by how much they change
    (checkpointing only costs time; bf16, the pool, then the optimizer, then LoRA change the training more).
    """
    if plan.replan is None:
        raise ConfigError("this plan cannot be re-planned (build it with plan_memory or Planner)")
    base = plan.settings
    levers = [lv for lv in _LEVERS if lv[2](base)]
    found: list[FittingOption] = []
    for size in range(len(levers) + 1):
        for combo in itertools.combinations(range(len(levers)), size):
            names = {levers[i][0] for i in combo}
            if {"adamw8bit", "adafactor"} <= names:
                continue  # one optimizer at a time
            if any(set(f.changes) <= names for f in found):
                continue  # a subset already fits
            settings = base
            for i in combo:
                settings = levers[i][1](settings)
            candidate = plan.replan(settings)
            if candidate.total <= budget:
                found.append(FittingOption(tuple(levers[i][0] for i in combo), candidate))
    if not found:
        found = _result_changing_options(plan, budget, levers)
    rank = {name: i for i, (name, _, _) in enumerate(_LEVERS)}
    found.sort(key=lambda f: (sum(1 + rank.get(c, len(rank)) for c in f.changes), f.plan.total))
    return found[:limit]


def _result_changing_options(plan: MemoryPlan, budget: int, levers) -> list[FittingOption]:
    """With every memory lever on (Adafactor for the optimizer): a lower resolution, or a smaller method."""
    lean = plan.settings
    names = []
    for name, change, _ in levers:
        if name != "adamw8bit":
            lean, names = change(lean), names + [name]
    out = []
    planned = plan.resolution
    for resolution in (planned * 3 // 4 // 64 * 64, planned // 2 // 64 * 64):
        if resolution >= 256:
            candidate = plan.replan(lean.replace(resolution=resolution))
            if candidate.total <= budget:
                out.append(FittingOption((*names, f"{resolution} px"), candidate))
                break
    method = lean.method
    while method in _SMALLER_METHOD:
        method = _SMALLER_METHOD[method]
        candidate = plan.replan(lean.replace(method=method))
        if candidate.total <= budget:
            out.append(FittingOption((*names, f"method {method.value}"), candidate))
            break
    return out


def check_fits(plan: MemoryPlan, available: int | None) -> None:
    """Raise `InsufficientMemoryError` before training if ``plan`` needs more than ``available`` bytes, with the
    estimate and the option sets that would fit. ``available=None`` (a device whose free memory is unknown) passes."""
    if available is None or plan.total <= available:
        return
    options = fitting_options(plan, available)
    parts = ", ".join(f"{name} {n / GIB:.1f}" for name, n in (
        ("weights", plan.weights), ("trained", plan.trained), ("gradients", plan.gradients),
        ("optimizer", plan.optimizer_state), ("working set", plan.working_set), ("overhead", plan.overhead)))
    if options:
        advice = ("Settings that fit (change them and run again): " + "; ".join(o.describe() for o in options)
                  + ".")
    else:
        advice = ("Nothing the planner knows fits: use a device with more memory (every lever, a lower "
                  "resolution and a smaller method were tried).")
    raise InsufficientMemoryError(
        f"this erasure ({plan.settings.describe()}, {plan.resolution} px) needs about {_gib(plan.total)} "
        f"({parts} GiB) but only {_gib(available)} are available on the {plan.settings.device} device. {advice}")


def preflight(model: MemoryModel, config: ESDConfig, gradient_checkpointing: bool, dtype: torch.dtype,
              device: torch.device | str, resident: torch.nn.Module | None = None) -> MemoryPlan | None:
    """Plan a trainer run and stop it before training if it cannot fit on ``device`` (`check_fits` against
    `available_memory`). ``resident``: the UNet whose weights are already on the device. Runs the planner does not
    model (devices other than CUDA and the CPU, low-precision CPU runs) are not checked: None."""
    device = torch.device(device)
    if device.type not in DEVICES or (device.type == "cpu" and dtype != torch.float32):
        return None
    plan = plan_memory(model, PlanSettings.for_run(config, gradient_checkpointing, dtype, device))
    check_fits(plan, available_memory(device, resident))
    return plan


def available_memory(device: torch.device | str, resident: torch.nn.Module | None = None) -> int | None:
    """Bytes a run could use on ``device`` now: free device memory plus what PyTorch holds cached (CUDA), or the
    available RAM (CPU); plus ``resident``'s parameters and buffers already on that device, which a plan counts as
    its weights. None for other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    elif device.type == "cpu":
        import psutil

        free = psutil.virtual_memory().available
    else:
        return None
    if resident is not None:
        tensors = itertools.chain(resident.parameters(), resident.buffers())
        free += sum(t.nbytes for t in tensors if t.device.type == device.type)
    return int(free)
