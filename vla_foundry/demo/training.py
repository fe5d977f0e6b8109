"""The short training loop every trained demo member runs: AdamW, warm-up then cosine decay, gradient
clipping, a progress bar, and the loss from the type's own batch handler."""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm


def train(model: torch.nn.Module, handler, make_batch: Callable[[], dict], *, steps: int, lr: float,
          warmup: int, desc: str, progress: bool, generator: torch.Generator,
          betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """``steps`` optimizer steps on ``make_batch()`` batches; returns the last loss. The model ends in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", mininterval=1.0)
    for _ in bar:
        loss = handler.compute_loss(model, make_batch(), generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    model.eval()
    return loss_value
