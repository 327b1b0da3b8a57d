"""Typed settings of one ESD run.

Conventions follow the paper (arXiv 2303.07345): ``negative_guidance`` is the paper's eta, with 1.0 as its default.
The official code writes the same target as ``e_from - eta_code * (e_c - e_0)`` with ``e_from = e_c``, so
``eta_code = eta + 1`` (its SD default 2.0 is the paper's 1.0); see `esd_core.objective.esd_target`.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


class Method(str, enum.Enum):
    """Which UNet parameters ESD trains (rules in `esd_core.methods`)."""

    ESD_X = "esd-x"                # cross-attention: prompt-specific erasure (an artist's style)
    ESD_X_STRICT = "esd-x-strict"  # cross-attention key/value projections only
    ESD_U = "esd-u"                # everything but cross-attention: global erasure (nudity, object classes)
    ESD_ALL = "esd-all"            # every parameter
    SELFATTN = "selfattn"          # self-attention only


#: The official code's historic method names, accepted as aliases.
METHOD_ALIASES: dict[str, Method] = {
    "xattn": Method.ESD_X,
    "xattn-strict": Method.ESD_X_STRICT,
    "noxattn": Method.ESD_U,
    "full": Method.ESD_ALL,
}


def parse_method(name: str | Method) -> Method:
    """Resolve a method name or alias; an unknown name is a `ConfigError` listing the valid choices."""
    if isinstance(name, Method):
        return name
    key = name.strip().lower()
    if key in METHOD_ALIASES:
        return METHOD_ALIASES[key]
    try:
        return Method(key)
    except ValueError:
        valid = ", ".join([m.value for m in Method] + list(METHOD_ALIASES))
        raise ConfigError(f"unknown layer method {name!r}; choose one of: {valid}") from None


class SampleWith(str, enum.Enum):
    """Which weights produce x_t by partial DDIM sampling."""

    TRAINED = "trained"  # the model being fine-tuned, as in the paper and its original code
    FROZEN = "frozen"    # the frozen base model, as in the 2025+ official code


class OptimizerName(str, enum.Enum):
    """Optimizers the trainer offers (built by `esd_core.optim.make_optimizer`)."""

    ADAM = "adam"              # the paper's; fused on CUDA
    ADAMW8BIT = "adamw8bit"    # bitsandbytes' 8-bit AdamW (no weight decay): a quarter of Adam's state memory
    ADAFACTOR = "adafactor"    # torch's Adafactor: factored second moment, no first moment; relative step sizes


def parse_concepts(text: str) -> tuple[str, ...]:
    """Split user text into concepts, one per line; blank lines and surrounding spaces are ignored."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class ESDConfig:
    """Hyperparameters of one erasure. Defaults are the paper's (1000 iterations, Adam 1e-5, eta 1, guidance 3, DDIM 50)."""

    concepts: tuple[str, ...]
    method: Method = Method.ESD_X
    iterations: int = 1000
    learning_rate: float = 1e-5
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    resolution: int = 0  # pixels; 0 = the model's native size
    seed: int = 0
    sample_with: SampleWith = SampleWith.TRAINED
    #: Broader concepts the erased ones are mapped from ("erase cowboy hat from cowboy"): none, one for all
    #: concepts, or one per concept.
    erase_from: tuple[str, ...] = ()
    #: 0: a fresh partial trajectory per iteration (the paper). P > 0: P full trajectories are sampled together in one
    #: batch whenever the pool runs out, and every latent along them is one iteration's x_t, in random order
    #: (`esd_core.xt`).
    trajectory_pool: int = 0
    #: 0: train the method's weights themselves. R > 0: train rank-R LoRA adapters on its Linear/Conv2d layers instead
    #: (norms and biases stay frozen); ``lora_alpha`` scales them by alpha / R (None: alpha = R, scale 1).
    lora_rank: int = 0
    lora_alpha: float | None = None
    optimizer: OptimizerName = OptimizerName.ADAM

    def __post_init__(self) -> None:
        # Normalise loose inputs (lists, strings) so the frozen object is always well typed.
        object.__setattr__(self, "concepts", tuple(c.strip() for c in self.concepts if c and c.strip()))
        object.__setattr__(self, "erase_from", tuple(c.strip() for c in self.erase_from if c and c.strip()))
        object.__setattr__(self, "method", parse_method(self.method))
        object.__setattr__(self, "sample_with", _parse_choice(SampleWith, self.sample_with, "sample_with"))
        object.__setattr__(self, "optimizer", _parse_choice(OptimizerName, self.optimizer, "optimizer"))
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid setting and how to fix it."""
        if not self.concepts:
            raise ConfigError("no concept given; type the concept to erase, e.g. 'a painting by Van Gogh' (one per line)")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1 (got {self.iterations}); the paper uses 1000")
        if not (0 < self.learning_rate < 1):
            raise ConfigError(f"learning rate must be in (0, 1) (got {self.learning_rate}); the paper uses 1e-5")
        if self.ddim_steps < 2:
            raise ConfigError(f"ddim_steps must be at least 2 (got {self.ddim_steps}); the paper uses 50")
        if self.ddim_steps > 1000:
            raise ConfigError(f"ddim_steps must be at most 1000, the training schedule's length (got {self.ddim_steps})")
        if self.start_guidance < 0:
            raise ConfigError(f"start guidance must be >= 0 (got {self.start_guidance}); the paper uses 3")
        if self.resolution < 0 or (self.resolution and self.resolution % 8):
            raise ConfigError(f"resolution must be 0 (native) or a positive multiple of 8 pixels (got {self.resolution})")
        if self.trajectory_pool < 0:
            raise ConfigError(f"trajectory_pool must be >= 0 (got {self.trajectory_pool}); 0 samples x_t every iteration")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (got {self.lora_rank}); 0 trains the weights themselves")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive (got {self.lora_alpha}); leave it unset for alpha = rank")
        if len(self.erase_from) not in (0, 1, len(self.concepts)):
            raise ConfigError(
                f"erase_from has {len(self.erase_from)} entries for {len(self.concepts)} concepts; "
                "give none, one for all concepts, or one per concept")

    def pairs(self) -> list[tuple[str, str | None]]:
        """(concept, erase_from or None) for each concept."""
        if not self.erase_from:
            return [(c, None) for c in self.concepts]
        froms = self.erase_from * len(self.concepts) if len(self.erase_from) == 1 else self.erase_from
        return list(zip(self.concepts, froms))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values)."""
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        out["sample_with"] = self.sample_with.value
        out["optimizer"] = self.optimizer.value
        out["concepts"] = list(self.concepts)
        out["erase_from"] = list(self.erase_from)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ESDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**data, "concepts": tuple(data.get("concepts", ())), "erase_from": tuple(data.get("erase_from", ()))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _parse_choice(kind: type[enum.Enum], value, setting: str):
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{setting} must be one of {[c.value for c in kind]} (got {value!r})") from None


#: Methods that train only cross-attention: the text-conditioning path, which an erasure learns from few images.
CROSS_ATTENTION_METHODS = (Method.ESD_X, Method.ESD_X_STRICT)
#: The fast mode's x_t strategies, measured against the paper's on the toy benchmark (`python -m
#: esd_bench.xt_strategies`, three seeds each):
#: * cross-attention methods: one trajectory at a time sampled by the frozen model, every latent along it one
#:   iteration's x_t, the teacher's predictions recorded while sampling (no per-iteration sampling or teacher pass);
#: * the global methods (esd-u, esd-all, selfattn) lose most of their erasure with trajectory pools (they need a new
#:   image for nearly every iteration, sampled by the model being trained), so they keep the paper's per-iteration
#:   trajectory, with DDIM 10 instead of more steps (the erasure and interference of DDIM 25/50, at fewer passes).
FAST_CROSS_ATTENTION: dict[str, Any] = {"sample_with": SampleWith.FROZEN, "trajectory_pool": 1}
FAST_GLOBAL_DDIM_STEPS = 10


def fast(config: ESDConfig) -> ESDConfig:
    """``config`` with the fast mode's x_t strategy for its method; every other setting is kept."""
    if config.method in CROSS_ATTENTION_METHODS:
        return dataclasses.replace(config, **FAST_CROSS_ATTENTION)
    return dataclasses.replace(config, ddim_steps=min(config.ddim_steps, FAST_GLOBAL_DDIM_STEPS))


@dataclass(frozen=True)
class RunOptions:
    """How a run executes. None of these change what ESD computes, beyond float rounding."""

    #: Recompute activations during backward (less memory, ~30% more time per training pass).
    gradient_checkpointing: bool = False
    #: Where the run keeps its resumable checkpoint (`esd_core.resume`); None: no checkpoints.
    checkpoint: Path | None = None
    #: Write the checkpoint every N iterations (0: only when the run is cancelled).
    checkpoint_every: int = 0
    #: Continue from the checkpoint if there is one (it must belong to this run's settings and base model).
    resume: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (got {self.checkpoint_every}); 0 saves only on cancel")
        if (self.checkpoint_every or self.resume) and self.checkpoint is None:
            raise ConfigError("checkpoint_every and resume need a checkpoint path")
