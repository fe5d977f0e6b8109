"""Training/evaluation losses shared by the batch handlers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                       z_loss_coefficient: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over targets != ``ignore_index``, plus the z-loss.

    logits (B, T, V), targets (B, T). The z-loss, ``c · mean(logsumexp(logits)²)`` over the
    same tokens, keeps the softmax normaliser near 1 (PaLM); 0 turns it off.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])  # (B·T, V)
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    if not bool(valid.any()):
        raise ValueError("every target is masked: the batch has no token to score")
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if z_loss_coefficient:
        log_z = torch.logsumexp(logits[valid], dim=-1)
        loss = loss + z_loss_coefficient * log_z.pow(2).mean()
    return loss


def masked_mse_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the elements where ``mask`` is true (all when None).

    ``mask`` broadcasts against the prediction, e.g. (B, T) or (B, T, 1) for (B, T, D).
    """
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        return error.mean()
    mask = mask.to(error.dtype)
    while mask.dim() < error.dim():
        mask = mask[..., None]
    mask = mask.expand_as(error)
    count = mask.sum()
    if count == 0:
        raise ValueError("the mask selects no element: nothing to score")
    return (error * mask).sum() / count
