"""The autoregressive loop every text-producing model shares (format spec §4.4, §6).

A model supplies one ``step``: given everything generated so far it returns the logits of
the next token, keeping whatever cache it uses to itself. The loop owns the rest — sampling
with an explicit ``torch.Generator``, growing the mask, eos and early stopping — so the
sampling settings mean exactly the same thing for ``transformer``, ``vlm`` and the HF
wrappers, and a model cannot get them subtly wrong on its own.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from vla_foundry.sampling import select_next_token

# step(generated (B, T), attention_mask (B, T) or None) -> logits of the next token (B, V)
StepFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# stopping(new_ids (B, n)) -> (B,) bool: rows that are done; the loop ends when all are
StoppingFn = Callable[[torch.Tensor], torch.Tensor]


def sample_loop(step: StepFn, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], *,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                stopping: Optional[StoppingFn] = None,
                suppress_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Prompt + new ids, (B, T + n) with n <= max_new_tokens.

    The reference stops only when every row emits ``eos_token_id`` at the same step (kept);
    ``stopping`` ends generation once every row is done by the caller's rules.
    ``suppress_token_ids`` can never be sampled (e.g. image placeholders in a caption).
    """
    generated, mask = input_ids, attention_mask
    prompt_len = input_ids.shape[1]
    suppress = torch.tensor(list(suppress_token_ids), dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = step(generated, mask)  # (B, V)
        if suppress.numel():
            logits = logits.index_fill(-1, suppress, float("-inf"))
        next_ids = select_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        generated = torch.cat([generated, next_ids[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_ids[:, None])], dim=1)
        if eos_token_id is not None and bool((next_ids == eos_token_id).all()):
            break
        if stopping is not None and bool(stopping(generated[:, prompt_len:]).all()):
            break
    return generated


def batch_prompt(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """1-D prompts get a batch dim; an all-ones mask is dropped (the unmasked paths are equal and faster)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    return input_ids, attention_mask


class LanguageModelStep:
    """The step of a plain language model: the whole prompt first, then (with the cache) one new token at a
    time; without the cache every step re-runs the whole sequence. ``past`` is the cache so far.

    ``lm(ids, attention_mask=, past_key_values=, use_cache=)`` returns ``.logits`` (B, T, V) and
    ``.past_key_values``.
    """

    def __init__(self, lm: Callable, use_cache: bool):
        self.lm, self.use_cache, self.past = lm, use_cache, None

    def __call__(self, generated: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        step_ids = generated[:, -1:] if (self.use_cache and self.past is not None) else generated
        out = self.lm(step_ids, attention_mask=mask, past_key_values=self.past, use_cache=self.use_cache)
        self.past = out.past_key_values if self.use_cache else None
        return out.logits[:, -1]  # (B, V)
