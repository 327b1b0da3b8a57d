"""The ESD training loop (paper: arXiv 2303.07345, Algorithm 1), on any `DiffusionModelAdapter`.

Per iteration: an x_t from the run's source (`esd_core.xt`: the paper's fresh partial trajectory, or a trajectory
pool); the frozen weights' e_0 and e_c at x_t (swapped in by pointer, one batch; or recorded while the pool was
sampled); one training step of the model's conditional prediction towards ``e_0 - eta (e_c - e_0)``. What trains is
the method's weights as float32 copies, or LoRA adapters on them (`esd_core.trainable`). The model is returned exactly
as received; the result carries the trained differences.
"""
from __future__ import annotations

import math
import random
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import Conditioning, DiffusionModelAdapter, ParameterNaming
from .config import ESDConfig, RunOptions
from .erased_weights import ErasedWeights, ErasedWeightsHeader, file_key
from .errors import ConfigError, ErasureCancelled, NonFiniteLossError, ResumeError
from .keymap import diffusers_to_ldm_names
from .lora import LoRAAdapters, LoRAFactors, is_adaptable
from .memory import checkpoint_units, gradient_checkpointing
from .methods import is_trained, select_parameters
from .objective import esd_loss, esd_target
from .optim import make_optimizer, optimizer_state_bytes
from .plan import preflight
from .resume import Identity, RunState, load_checkpoint, save_checkpoint
from .sampling import ddim_timesteps
from .trainable import FullWeights, Trainables, autograd_ready
from .weights import Fingerprint, tensors_hash, weights_fingerprint
from .xt import Example, Prompts, SamplingContext, make_source

#: Phases a run reports through `Progress.phase`.
PHASE_ENCODING = "encoding"
PHASE_SAMPLING = "sampling x_t"
PHASE_TRAINING = "training"


@dataclass(frozen=True)
class Progress:
    """Reported after every iteration."""

    step: int        # iterations done, 1-based
    total: int
    loss: float
    elapsed: float   # seconds since training started


@dataclass(frozen=True)
class MemoryUse:
    """Bytes training allocated beyond the model, measured on the real tensors after the first step."""

    trained: int      # the trained tensors (float32 copies or LoRA factors)
    gradients: int
    optimizer: int    # the optimizer's state


@dataclass
class ErasureResult:
    """What a run produced: the trained differences (LDM names, float32, CPU) and its loss history.

    Full-weight runs fill ``diffs`` (parameter name -> difference); LoRA runs fill ``loras`` (module path -> factors).
    """

    config: ESDConfig
    diffs: dict[str, torch.Tensor]
    losses: list[float]
    base_tensors_hash: str
    seconds: float
    trained_numel: int = 0
    loras: dict[str, LoRAFactors] = field(default_factory=dict)
    memory: MemoryUse | None = None
    #: `weights_fingerprint` of the weights training started from (what the model computed with, patches included)
    base_fingerprint: Fingerprint = field(default_factory=dict)

    @property
    def iterations_run(self) -> int:
        return len(self.losses)

    def dense_diffs(self) -> dict[str, torch.Tensor]:
        """Differences by parameter name, LoRA factors multiplied out."""
        return {**self.diffs, **{f"{path}.weight": f.delta() for path, f in self.loras.items()}}

    def to_erased_weights(self, adapter: DiffusionModelAdapter) -> ErasedWeights:
        """Package the result with its header (concepts, settings, provenance) for saving."""
        header = ErasedWeightsHeader(
            concepts=self.config.concepts,
            method=self.config.method.value,
            hyperparameters=self.config.to_dict(),
            iterations_run=self.iterations_run,
            base_model=adapter.base.name,
            base_hash=adapter.base.file_hash,
            base_tensors_hash=self.base_tensors_hash,
            model_family=adapter.family.value,
            base_fingerprint=self.base_fingerprint,
        )
        if not self.loras:
            return ErasedWeights.from_diffs(header, self.diffs)
        # A LoRA run changes only the adapted weights; the method's other tensors (biases, norms: frozen) are listed as
        # not carried, so the base check, which covers everything the method selects, still holds for the file.
        selected = (ldm for n, ldm in ldm_names(adapter).items() if is_trained(self.config.method, n))
        carried = {*self.diffs, *(f"{path}.weight" for path in self.loras)}
        dropped = tuple(file_key(n) for n in sorted(selected) if n not in carried)
        return ErasedWeights.from_lora(dataclasses.replace(header, dropped=dropped), self.loras, self.diffs)


def ldm_names(adapter: DiffusionModelAdapter) -> dict[str, str]:
    """The adapter's parameter names mapped to LDM names (identity for LDM-named models)."""
    names = [n for n, _ in adapter.unet.named_parameters()]
    if adapter.naming == ParameterNaming.LDM:
        return {n: n for n in names}
    return diffusers_to_ldm_names(names)


def latent_shape(adapter: DiffusionModelAdapter, resolution: int) -> tuple[int, int, int, int]:
    """(1, C, H, W) latents for a square image of ``resolution`` pixels (0 = the model's native size)."""
    side = (resolution or adapter.native_resolution) // adapter.vae_scale_factor
    return (1, adapter.latent_channels, side, side)


def encode_prompts(adapter: DiffusionModelAdapter, config: ESDConfig) -> Prompts:
    """Encode every prompt of a run once. Front ends may call this first and release the text encoder before the
    UNet is loaded for training, then pass the result to `erase`."""
    texts = sorted({"", *config.concepts, *config.erase_from})
    with torch.no_grad():
        encoded = adapter.encode_prompts(texts)
    by_text = {t: encoded.row(i) for i, t in enumerate(texts)}
    pairs = config.pairs()
    return Prompts(uncond=by_text[""], concepts=[by_text[c] for c, _ in pairs],
                   sources=[by_text[f] if f is not None else None for _, f in pairs])


def erase(
    adapter: DiffusionModelAdapter,
    config: ESDConfig,
    *,
    options: RunOptions = RunOptions(),
    prompts: Prompts | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    restore: bool = True,
) -> ErasureResult:
    """Run ESD. ``on_progress`` is called after every iteration, ``on_phase`` when a phase starts (`PHASE_ENCODING`,
    `PHASE_SAMPLING`: producing x_t, `PHASE_TRAINING`); ``should_cancel`` is checked between iterations and between
    sampling steps (raising `ErasureCancelled`); either callback may itself raise to stop. On any exit the model is
    put back as received (with ``restore=False`` a successful run leaves the trained weights, ``base + diff``, in the
    model).
    """
    with autograd_ready(adapter.unet) as swapped:
        if swapped and not restore:
            raise ConfigError("restore=False is not possible for a model loaded under torch.inference_mode")
        flags = {n: p.requires_grad for n, p in adapter.unet.named_parameters()}
        try:
            adapter.unet.requires_grad_(False)
            return _erase(adapter, config, options, prompts, on_progress, on_phase, should_cancel, restore)
        finally:  # whatever happened, every parameter's requires_grad is as it was
            for n, p in adapter.unet.named_parameters():
                p.requires_grad_(flags[n])


def make_trainables(config: ESDConfig, unet: torch.nn.Module) -> Trainables:
    """The method's weights as float32 copies, or (``lora_rank`` > 0) LoRA adapters on its Linear/Conv2d layers."""
    if config.lora_rank == 0:
        return FullWeights(select_parameters(config.method, unet))
    modules = {path: m for path, m in unet.named_modules()
               if is_adaptable(m) and is_trained(config.method, f"{path}.weight")}
    if not modules:
        raise ConfigError(f"layer method {config.method.value!r} selects no Linear or Conv2d layer to adapt; "
                          "train the weights themselves (lora_rank 0)")
    try:
        return LoRAAdapters(modules, config.lora_rank, config.lora_alpha, seed=config.seed)
    except ValueError as e:
        raise ConfigError(f"{e}; choose a smaller lora_rank") from None


def _erase(adapter, config, options, prompts, on_progress, on_phase, should_cancel, restore) -> ErasureResult:
    unet = adapter.unet
    selected = select_parameters(config.method, unet)  # a method that selects nothing fails here, before any work
    to_ldm = ldm_names(adapter)
    base_values = {to_ldm[n]: p.data for n, p in selected.items()}
    base_hash = tensors_hash(base_values)
    base_fingerprint = weights_fingerprint(base_values)
    identity = Identity(config, base_hash, adapter.base.name)
    saved = _saved_state(options, identity)  # a checkpoint that does not belong to this run fails here too
    start = time.perf_counter()
    losses: list[float] = list(saved.losses) if saved else []
    phase = [""]

    def enter(name: str) -> None:
        if name != phase[0]:
            phase[0] = name
            if on_phase is not None:
                on_phase(name)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise ErasureCancelled("erasure cancelled; nothing was saved and the model is unchanged")

    if prompts is None:
        enter(PHASE_ENCODING)
        prompts = encode_prompts(adapter, config)
    if hasattr(adapter, "prepare_for_training"):
        adapter.prepare_for_training()
    if hasattr(adapter, "memory_model"):  # stop now, with the options that fit, rather than out of memory halfway
        preflight(adapter.memory_model(), config, options.gradient_checkpointing, adapter.dtype, adapter.device,
                  resident=adapter.unet)
    rng = random.Random(config.seed)
    noise = torch.Generator("cpu").manual_seed(config.seed)
    source = make_source(config, prompts, rng, noise)
    trainables = make_trainables(config, unet)
    ctx = SamplingContext(predict=adapter.predict_noise, alphas_cumprod=adapter.alphas_cumprod,
                          timesteps=ddim_timesteps(len(adapter.alphas_cumprod), config.ddim_steps),
                          latent_shape=latent_shape(adapter, config.resolution), device=adapter.device,
                          frozen=trainables.frozen, between_steps=check_cancel)
    succeeded = False
    memory = None
    try:
        optimizer = make_optimizer(config.optimizer, trainables.parameters(), config.learning_rate, adapter.device)
        # fp16 gradients underflow at ESD's small losses: scale the loss (dynamically, skipping overflowing steps).
        scaler = torch.amp.GradScaler(adapter.device.type, enabled=adapter.dtype == torch.float16)
        if saved:
            _restore_state(saved, trainables, optimizer, scaler, rng, noise, source)

        def boundary() -> RunState:
            """The run's state now, at the end of an iteration (tensors by reference: they are copied only when a
            checkpoint is written)."""
            return RunState(iteration=len(losses), losses=list(losses), rng=rng.getstate(), noise=noise.get_state(),
                            source=source.state_dict(), trainables=trainables.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict())

        last = [boundary()]

        def checkpointed(callback):
            """Run a callback that may stop the run; if it does (a cancel), keep what was trained so far."""
            def call(*args):
                try:
                    return callback(*args)
                except BaseException as stop:
                    if options.checkpoint is None:
                        raise
                    save_checkpoint(options.checkpoint, last[0], identity)
                    if isinstance(stop, ErasureCancelled):
                        raise ErasureCancelled(
                            f"erasure cancelled after {last[0].iteration} iterations; the model is unchanged and "
                            f"a resumable checkpoint is kept at {options.checkpoint}") from None
                    raise
            return call

        cancel_check = checkpointed(check_cancel)
        progress = checkpointed(on_progress) if on_progress is not None else None
        ctx.between_steps = cancel_check
        with gradient_checkpointing(checkpoint_units(unet), enabled=options.gradient_checkpointing):
            for step in range(len(losses) + 1, config.iterations + 1):
                cancel_check()
                if source.needs_sampling:
                    enter(PHASE_SAMPLING)
                example = source.next(ctx)
                enter(PHASE_TRAINING)
                loss = _train_step(adapter, config, trainables, optimizer, scaler, prompts, example, cancel_check)
                if not math.isfinite(loss):
                    kept = (f"; the last checkpoint ({options.checkpoint}) is kept" if options.checkpoint is not None
                            and options.checkpoint.exists() else "")
                    raise NonFiniteLossError(
                        f"loss became {loss} at iteration {step}; nothing was saved and the model is unchanged"
                        f"{kept}. Lower the learning rate, or train in float32 instead of fp16")
                if memory is None:
                    memory = _memory_use(trainables, optimizer)
                losses.append(loss)
                last[0] = boundary()
                if options.checkpoint is not None and options.checkpoint_every and step % options.checkpoint_every == 0:
                    save_checkpoint(options.checkpoint, last[0], identity)
                if progress is not None:
                    progress(Progress(step, config.iterations, loss, time.perf_counter() - start))
        diffs, loras = {}, {}
        if isinstance(trainables, FullWeights):
            diffs = {to_ldm[n]: d for n, d in trainables.diffs().items()}
        else:
            loras = {to_ldm[f"{path}.weight"].rpartition(".")[0]: f for path, f in trainables.factors().items()}
        succeeded = True
        return ErasureResult(config=config, diffs=diffs, loras=loras, losses=losses, base_tensors_hash=base_hash,
                             seconds=time.perf_counter() - start, trained_numel=trainables.numel, memory=memory,
                             base_fingerprint=base_fingerprint)
    finally:
        if restore or not succeeded:
            trainables.restore()
        else:
            trainables.keep_trained()


def _saved_state(options: RunOptions, identity: Identity) -> RunState | None:
    """The checkpoint to resume from, if asked for and present; refuses to silently replace an earlier run's."""
    path = options.checkpoint
    if path is None or not path.exists():
        return None
    if not options.resume:
        raise ResumeError(f"a resume checkpoint of an earlier run exists at {path}: resume it, or delete it to start "
                          "over (it is not replaced without asking)")
    state = load_checkpoint(path, identity)
    if state.iteration > identity.config.iterations:
        raise ResumeError(f"resume checkpoint {path} is at iteration {state.iteration}, past this run's "
                          f"{identity.config.iterations}")
    return state


def _restore_state(state: RunState, trainables, optimizer, scaler, rng, noise, source) -> None:
    try:
        trainables.load_state_dict(state.trainables)
        optimizer.load_state_dict({"state": state.optimizer["state"],
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise ResumeError(f"the resume checkpoint does not fit this model ({e}); delete it to start over") from None
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    rng.setstate(state.rng)
    noise.set_state(state.noise)
    source.load_state_dict(state.source)


def _memory_use(trainables: Trainables, optimizer: torch.optim.Optimizer) -> MemoryUse:
    params = trainables.parameters()
    return MemoryUse(trained=sum(p.numel() * p.element_size() for p in params),
                     gradients=sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
                     optimizer=optimizer_state_bytes(optimizer))


def _teacher(adapter, trainables: Trainables, prompts: Prompts, example: Example) -> torch.Tensor:
    """The frozen model's e_0, e_c (and e_from) at the example's x_t, in one batch (float32)."""
    source = prompts.sources[example.pair]
    conds = [prompts.uncond, prompts.concepts[example.pair]] + ([source] if source is not None else [])
    if example.teacher is not None:
        return example.teacher
    n = len(conds)
    t = torch.full((n,), example.t, dtype=torch.long, device=example.x_t.device)
    with trainables.frozen():
        return adapter.predict_noise(example.x_t.repeat(n, 1, 1, 1), t, Conditioning.cat(conds)).float()


def _train_step(adapter, config, trainables, optimizer, scaler, prompts, example, check_cancel) -> float:
    """One ESD iteration; returns the loss."""
    with torch.no_grad():
        eps = _teacher(adapter, trainables, prompts, example)
        target = esd_target(eps[0:1], eps[1:2], config.negative_guidance, eps[2:3] if len(eps) > 2 else None)
    check_cancel()
    t = torch.full((1,), example.t, dtype=torch.long, device=example.x_t.device)
    prediction = adapter.predict_noise(example.x_t, t, prompts.sampling_cond(example.pair))
    loss = esd_loss(prediction, target)
    if not torch.isfinite(loss):
        return float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # unscales the float32 gradients; skips the step if any overflowed
    scaler.update()
    return float(loss.detach())
