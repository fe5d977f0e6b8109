"""Next-token selection: temperature, top-k, top-p and an explicit ``torch.Generator``.

Shared by every text-producing model so that sampling settings mean the same thing
everywhere. The order and edge cases follow VLA Foundry (format spec §4.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


# Below this a temperature is greedy: dividing float32 logits by it would overflow or give 0/0.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) ⇒ greedy
    top_k: int = 50  # 0 ⇒ off
    top_p: float = 0.9  # 1 ⇒ off
    # True: max_new_tokens is an upper bound, lowered to what fits in the model's context (for clients that
    # give no length, like OpenAI chat); False: a prompt + max_new_tokens over the context is an error.
    fit_context: bool = False


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scale by temperature and mask out (−inf) what top-k and top-p remove. ``logits``: (B, V), float32 out.

    The row maximum is subtracted first (softmax, top-k and top-p do not change), so a tiny
    temperature or a half-precision model cannot overflow into inf/NaN.
    """
    logits = logits.float()
    logits = logits - logits.max(dim=-1, keepdim=True).values
    if temperature != 0:
        logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        # Shift right by one so the token that crosses top_p stays (the first is always kept).
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def token_distribution(logits: torch.Tensor, temperature: float, top_k: int,
                       top_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, V) logits → what a draw picks from: probabilities (B, K) and the token ids they belong to (B, K), or None
    when they cover the whole vocabulary (K = V). Row by row: the rows of several requests with the same settings
    share one call, and each request then draws from its own rows (``draw``), as it would alone."""
    if 0 < top_k < logits.shape[-1]:
        # Sample among the k best only: same distribution, and top-p then sorts k values, not V.
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted
        probs, _ = token_distribution(values, temperature, 0, top_p)
        return probs, indices
    logits = filter_logits(logits, temperature, 0, top_p)
    return torch.softmax(logits.float(), dim=-1), None


def draw(probs: torch.Tensor, token_ids: Optional[torch.Tensor],
         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of a ``token_distribution`` (B,), drawn with ``generator``."""
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    return choice if token_ids is None else token_ids.gather(-1, choice[:, None]).squeeze(-1)


def select_next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits → (B,) token ids: argmax at temperature 0, else a draw from ``generator``."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)  # top-k and top-p always keep the best token
    return draw(*token_distribution(logits, temperature, top_k, top_p), generator)
