"""Small pure functions on weight tensors shared by training, saving and applying."""
from __future__ import annotations

import hashlib

import torch


def merged_weight(base: torch.Tensor, diff: torch.Tensor, strength: float) -> torch.Tensor:
    """``base + strength * diff``, computed in float32 as ComfyUI's weight patches do, cast back to base's dtype."""
    return (base.float() + strength * diff.to(base.device, torch.float32)).to(base.dtype)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 values, in name order: identifies the base weights an erasure changed.

    Float32 makes the hash independent of the storage dtype a loader chose (fp16 values are exact in float32).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


#: Values sampled per tensor for its fingerprint (every value of a smaller tensor), and random projections of them.
FINGERPRINT_SAMPLES = 4096
FINGERPRINT_PROJECTIONS = 4
#: Two sets of weights are the same base when no tensor's fingerprint moved by more than this fraction of the
#: tensor's root mean square. Rounding to any 16-bit dtype moves a weight by at most 2^-7 of itself (bf16 with
#: ComfyUI's stochastic rounding; fp16 2^-10), and the estimate of that movement from the projections stays within a
#: few times its true size, so rounding is well below the tolerance; a fine-tune or a LoRA at a useful strength
#: changes the weights by several percent.
SAME_BASE_TOLERANCE = 0.02

Fingerprint = dict[str, list[float]]


def _sample_plan(name: str, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed positions (and +-1 projection signs) for a tensor, from its name and size only (not its dtype, device
    or values), so every front end samples the same elements."""
    seed = int.from_bytes(hashlib.sha256(f"{name}:{numel}".encode()).digest()[:8], "little")
    g = torch.Generator("cpu").manual_seed(seed)
    positions = (torch.arange(numel) if numel <= FINGERPRINT_SAMPLES
                 else torch.randint(0, numel, (FINGERPRINT_SAMPLES,), generator=g))
    signs = torch.randint(0, 2, (FINGERPRINT_PROJECTIONS, len(positions)), generator=g).double() * 2 - 1
    return positions, signs


def weights_fingerprint(tensors) -> Fingerprint:
    """A small summary of weights that survives rounding: per tensor (name -> ``[rms, p_1, ..., p_K]``) the root mean
    square of up to `FINGERPRINT_SAMPLES` values at fixed positions and K random +-1 projections of them (divided by
    the square root of their count, so each projection of a difference has the difference's rms as its typical size).
    ``tensors``: a mapping or (name, tensor) pairs; values are read one tensor at a time. Compare with `same_weights`.
    """
    out: Fingerprint = {}
    for name, t in (tensors.items() if hasattr(tensors, "items") else tensors):
        flat = t.detach().reshape(-1)
        positions, signs = _sample_plan(name, flat.numel())
        values = flat[positions.to(flat.device)].to("cpu", torch.float64)
        scale = max(len(values), 1) ** 0.5
        out[name] = [float(f"{v:.7g}") for v in (values.norm() / scale, *(signs @ values / scale))]
    return out


def same_weights(recorded: Fingerprint, measured: Fingerprint, tolerance: float = SAME_BASE_TOLERANCE) -> bool:
    """Whether two fingerprints (`weights_fingerprint`) describe the same weights up to rounding: the same tensors,
    and in each the estimated rms of the difference and the change of the rms within ``tolerance`` of the rms."""
    if recorded.keys() != measured.keys():
        return False
    for name, (rms, *p) in recorded.items():
        rms_now, *q = measured[name]
        moved = (sum((a - b) ** 2 for a, b in zip(p, q)) / len(p)) ** 0.5
        limit = tolerance * max(rms, rms_now)
        if moved > limit or abs(rms - rms_now) > limit:
            return False
    return True
