"""Errors the core raises. Each message names the problem and the fix; front ends show them as they are."""


class ESDError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(ESDError, ValueError):
    """A setting is invalid (unknown method, iterations < 1, empty concept, ...)."""


class NonFiniteLossError(ESDError):
    """Training produced a NaN/inf loss; nothing was saved and the model was restored."""


class ErasureCancelled(ESDError):
    """The caller's cancel check asked to stop; nothing was saved and the model was restored."""


class ErasedWeightsError(ESDError):
    """An erased-weights file is damaged, of another format, or does not fit the target model."""


class ModelLoadError(ESDError):
    """A model folder is missing, incomplete or of an unsupported kind."""


class ResumeError(ESDError):
    """A resume checkpoint is damaged or belongs to another run (other settings or another base model)."""


class InsufficientMemoryError(ESDError):
    """The planned run needs more memory than the device has available; the message lists options that fit."""
