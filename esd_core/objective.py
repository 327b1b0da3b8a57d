"""The ESD objective as small pure functions (paper: arXiv 2303.07345, eq. 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def esd_target(
    eps_uncond: torch.Tensor,
    eps_concept: torch.Tensor,
    negative_guidance: float,
    eps_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """The frozen model's negatively guided prediction that the trained model must imitate.

    Paper form: ``e_0 - eta * (e_c - e_0)``, with ``e_0 = eps_frozen(x_t, "", t)``, ``e_c = eps_frozen(x_t, c, t)``
    and ``eta = negative_guidance`` (1.0 in the paper).

    With ``eps_from`` (the frozen prediction for a broader concept the erased one is mapped from, the official code's
    ``erase_from``) the target is ``e_from - (eta + 1) * (e_c - e_0)``. It equals the paper form when
    ``e_from = e_c``, which is how the official code writes it with ``eta_code = eta + 1`` (its SD default 2.0 is the
    paper's 1.0).

    Computed in float32 whatever the inputs' dtype.
    """
    e0, ec = eps_uncond.float(), eps_concept.float()
    if eps_from is None:
        return e0 - negative_guidance * (ec - e0)
    return eps_from.float() - (negative_guidance + 1.0) * (ec - e0)


def esd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the trained model's conditional prediction and the ESD target, in float32."""
    return F.mse_loss(prediction.float(), target.float().detach())
