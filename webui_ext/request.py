"""An erasure request, as the ESD tab and ``POST /esd/v1/erase`` give it: fields named as ESD Erase Concept's inputs,
missing fields taking the node's defaults, bad input refused with the messages the node gives (those of
`esd_core.config.ESDConfig`). Pure Python: no host import.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from esd_core.config import ESDConfig, Method, OptimizerName, SampleWith, fast, parse_concepts
from esd_core.erased_weights import DEFAULT_SAVE_DTYPE, SAVE_DTYPES
from esd_core.errors import ConfigError

DEFAULT_PREFIX = "ESD_erased"
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ESDConfig) if f.name not in ("concepts", "erase_from")}
#: field -> (type, default): ESD Erase Concept's inputs and defaults.
FIELDS: dict[str, tuple[type, Any]] = {
    "concept": (str, ""),
    "method": (str, Method.ESD_X.value),
    "iterations": (int, _CONFIG_DEFAULTS["iterations"]),
    "learning_rate": (float, _CONFIG_DEFAULTS["learning_rate"]),
    "negative_guidance": (float, _CONFIG_DEFAULTS["negative_guidance"]),
    "start_guidance": (float, _CONFIG_DEFAULTS["start_guidance"]),
    "ddim_steps": (int, _CONFIG_DEFAULTS["ddim_steps"]),
    "resolution": (int, _CONFIG_DEFAULTS["resolution"]),
    "seed": (int, _CONFIG_DEFAULTS["seed"]),
    "filename_prefix": (str, DEFAULT_PREFIX),
    "sample_with": (str, SampleWith.TRAINED.value),
    "erase_from": (str, ""),
    "training_dtype": (str, "auto"),
    "gradient_checkpointing": (bool, False),
    "fast": (bool, False),
    "lora_rank": (int, _CONFIG_DEFAULTS["lora_rank"]),
    "optimizer": (str, OptimizerName.ADAM.value),
    "checkpoint_every": (int, 0),
    "resume": (bool, False),
    "save_dtype": (str, DEFAULT_SAVE_DTYPE),
}
#: training_dtype -> torch dtype name for autocast (None: the model's own dtype), as ESD Erase Concept offers
TRAINING_DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16"}
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$")


@dataclass(frozen=True)
class EraseRequest:
    """A validated request: the core's settings plus what the front end decides (file name, memory saver)."""

    config: ESDConfig
    filename_prefix: str = DEFAULT_PREFIX
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"  # a TRAINING_DTYPES key
    checkpoint_every: int = 0     # keep a resumable checkpoint every N iterations (0: none)
    resume: bool = False          # continue from this prefix's checkpoint
    save_dtype: str = DEFAULT_SAVE_DTYPE


def _typed(name: str, value: Any) -> Any:
    kind, _ = FIELDS[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 100.0 from a slider or a JSON client
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be {'a' if kind is not int else 'an'} {kind.__name__} (got {value!r})")


def check_prefix(prefix: str) -> str:
    """The file name prefix, if it is a plain name the Lora folder can hold; else a `ConfigError` saying so."""
    prefix = prefix.strip()
    if not prefix:
        raise ConfigError("filename_prefix is empty; give a name such as 'van_gogh'")
    if not _PLAIN_NAME.match(prefix) or ".." in prefix:
        raise ConfigError(f"filename_prefix {prefix!r} must be a plain name (letters, digits, space, '.', '-', '_'), "
                          "saved in the Lora folder's esd/ subfolder; use a name such as 'van_gogh'")
    return prefix


def parse_request(body: Mapping[str, Any] | None) -> EraseRequest:
    """Validate a JSON body; a `ConfigError` names the first bad field and how to fix it."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"the request body must be a JSON object with the fields {sorted(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    values = {name: _typed(name, body[name]) if name in body else default for name, (_, default) in FIELDS.items()}
    config = ESDConfig(
        concepts=parse_concepts(values["concept"]), method=values["method"], iterations=values["iterations"],
        learning_rate=values["learning_rate"], negative_guidance=values["negative_guidance"],
        start_guidance=values["start_guidance"], ddim_steps=values["ddim_steps"], resolution=values["resolution"],
        seed=values["seed"], sample_with=values["sample_with"], erase_from=parse_concepts(values["erase_from"]),
        lora_rank=values["lora_rank"], optimizer=values["optimizer"])
    for name, choices in (("training_dtype", TRAINING_DTYPES), ("save_dtype", SAVE_DTYPES)):
        if values[name] not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)} (got {values[name]!r})")
    if values["checkpoint_every"] < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (got {values['checkpoint_every']}); 0 keeps no checkpoint")
    return EraseRequest(config=fast(config) if values["fast"] else config,
                        filename_prefix=check_prefix(values["filename_prefix"]),
                        gradient_checkpointing=values["gradient_checkpointing"],
                        training_dtype=values["training_dtype"], checkpoint_every=values["checkpoint_every"],
                        resume=values["resume"], save_dtype=values["save_dtype"])
