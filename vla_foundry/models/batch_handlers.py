"""Batch handlers: a batch in, the training/evaluation loss of a model type out.

A handler is the one place that knows how a type's batch becomes model inputs and
targets, so training (the demo pack) and online evaluation (``/evaluate/{type}``) give
the same number for the same batch and seed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.losses import IGNORE_INDEX, cross_entropy_loss
from vla_foundry.models.registry import register_batch_handler


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable when computed with grad
    num_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.item(), "num_samples": self.num_samples, **self.metrics}


class BatchHandler(ABC):
    """Base: ``compute_loss(model, batch, generator=None) -> LossOutput``.

    ``batch`` maps names to tensors on any device; the handler moves them to the model's.
    ``generator`` drives every random draw the loss needs (timesteps, noise), so the same
    seed gives the same loss in process and over HTTP.
    """

    @abstractmethod
    def compute_loss(self, model, batch: dict[str, torch.Tensor],
                     generator: Optional[torch.Generator] = None) -> LossOutput:
        """The loss of ``batch`` for ``model``."""

    @staticmethod
    def model_device(model) -> torch.device:
        return next(model.parameters()).device

    @staticmethod
    def to_model(model, tensor: torch.Tensor) -> torch.Tensor:
        """On the model's device; floating inputs (pixels) also in its dtype (a bf16 model takes bf16 pixels)."""
        weight = next(model.parameters())
        return tensor.to(weight.device, dtype=weight.dtype if tensor.is_floating_point() else None)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_coefficient: float) -> LossOutput:
    """Cross-entropy (+ z-loss) of (B, T, V) logits against (B, T) targets, with token count and perplexity."""
    loss = cross_entropy_loss(logits, targets, z_loss_coefficient=z_loss_coefficient)
    value = loss.item()
    return LossOutput(loss, num_samples=targets.shape[0],
                      metrics={"num_tokens": int((targets != IGNORE_INDEX).sum()),
                               "perplexity": math.exp(value) if value < 700 else None})  # None, not an overflow


@register_batch_handler("transformer")
@register_batch_handler("transformer_hf")
class LanguageModelBatchHandler(BatchHandler):
    """Next-token cross-entropy (+ z-loss): targets are the inputs shifted by one; padding is ignored.

    batch: ``input_ids`` (B, T) and optional ``attention_mask`` (B, T), right-padded.
    """

    def __init__(self, z_loss_coefficient: float = 0.0):
        self.z_loss_coefficient = z_loss_coefficient

    def compute_loss(self, model, batch, generator=None) -> LossOutput:
        (out,) = self.compute_loss_each(model, batch, [batch["input_ids"].shape[0]])
        if isinstance(out, Exception):
            raise out
        return out

    def compute_loss_each(self, model, batch, counts: list[int], generators=None) -> list:
        """Several evaluations in one forward pass: ``batch`` holds their rows back to back (``counts[i]`` of
        the i-th); each gets its loss over its own tokens only, what ``compute_loss`` of its rows alone gives (a
        causal model's logits at a row's tokens do not depend on the rows beside it or the padding after it, and a
        bidirectional one's padding is masked),
        or a ``ValueError`` when it has no token to score, an ``InvalidInputError`` when its mask pads on the left.
        No randomness: ``generators`` are not used."""
        device = self.model_device(model)
        input_ids = batch["input_ids"].to(device)  # (B, T)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise InvalidInputError(f"input_ids must be (batch, length >= 2); got {tuple(input_ids.shape)}",
                                    field="input_ids")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        left_padded = (mask[:, 1:] > mask[:, :-1]).any(dim=1)  # (B,) a token after padding: padding on the left
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # (B, T-1)
        # A causal model needs no mask: right padding follows every token. A bidirectional one (``is_causal:
        # false``) takes one, or a row's tokens would attend to its padding and to its own last token (an input
        # here only because padding follows it): an input counts where its next token is real, ``mask[:, 1:]``,
        # which is what the row alone gives.
        bidirectional = not getattr(getattr(model, "params", None), "is_causal", True)
        logits = model(input_ids[:, :-1], **({"attention_mask": mask[:, 1:]} if bidirectional else {})
                       ).logits  # (B, T-1, V)
        outs: list = []
        start = 0
        for count in counts:
            own = slice(start, start + count)
            start += count
            if bool(left_padded[own].any()):  # this evaluation's own fault: it fails alone
                outs.append(InvalidInputError(
                    "attention_mask must pad on the right (each row's 1s first, then its 0s): the model reads a row "
                    "from its first column, so padding before the tokens would change their loss; put the padding "
                    "after them", field="attention_mask"))
                continue
            try:
                outs.append(next_token_loss(logits[own], targets[own], self.z_loss_coefficient))
            except ValueError as e:  # every target of this evaluation masked
                outs.append(e)
        return outs


@register_batch_handler("vlm")
@register_batch_handler("vlm_hf")
class CaptionBatchHandler(BatchHandler):
    """Next-token cross-entropy over caption batches: targets are the inputs shifted by one, with padding and
    image placeholders ignored (an image embedding is an input, never a target).

    batch: ``input_ids`` (B, T) with the image placeholders in place, ``attention_mask`` (B, T), right-padded,
    and the image inputs the model takes (``pixel_values`` and, for HF models, e.g. ``pixel_attention_mask``).
    A prefix LM's batch (PaliGemma) also holds ``token_type_ids`` (B, T): 0 on the prefix (the image and prompt,
    which attend both ways, so their tokens are never targets: the prefix sees them), 1 on the caption; only the
    caption's tokens are targets, as the model's processor marks them for its training (``labels``).
    """

    def __init__(self, z_loss_coefficient: float = 0.0):
        self.z_loss_coefficient = z_loss_coefficient

    def compute_loss(self, model, batch, generator=None) -> LossOutput:
        batch = {k: self.to_model(model, v) for k, v in batch.items()}
        input_ids = batch.pop("input_ids")  # (B, T)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise InvalidInputError(f"input_ids must be (batch, length >= 2); got {tuple(input_ids.shape)}",
                                    field="input_ids")
        mask = batch.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        ignored = (mask[:, 1:] == 0) | (input_ids[:, 1:] == model.image_token_id)
        token_types = batch.get("token_type_ids")  # (B, T) (it goes in too: the model's mask reads it)
        if token_types is not None:
            ignored |= token_types[:, 1:] == 0
        targets = input_ids[:, 1:].masked_fill(ignored, IGNORE_INDEX)  # (B, T-1)
        if not bool((targets != IGNORE_INDEX).any()):
            raise InvalidInputError("the batch has no text token to predict (only padding and image placeholders)",
                                    field="input_ids")
        # The full sequence goes in (every placeholder must meet its image); the last logit predicts nothing.
        logits = model(input_ids, attention_mask=mask, **batch).logits[:, :-1]  # (B, T-1, V)
        return next_token_loss(logits, targets, self.z_loss_coefficient)


@register_batch_handler("stable_diffusion")
class DenoisingBatchHandler(BatchHandler):
    """The denoising loss: MSE between the UNet's prediction at a random timestep and the scheduler's target
    (ε for DDPM, ε − x0 for flow matching).

    batch: ``pixel_values`` (B, C, S, S) in [-1, 1] and, for text-conditioned models, ``input_ids`` (B, L)
    CLIP ids and their ``attention_mask`` (B, L), which the text tower takes as VLA Foundry's training forward
    gives it (with ``uncond_input_ids`` (1, L), the empty prompt, for caption dropout while training).
    Timesteps and noise come from ``generator``, so a seed fixes the loss.
    """

    def __init__(self, dropout_percent: float = 0.0):
        self.dropout_percent = dropout_percent

    def compute_loss(self, model, batch, generator=None) -> LossOutput:
        x0 = self.to_model(model, batch["pixel_values"])  # (B, C, S, S)
        B, device = x0.shape[0], x0.device
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, model.num_timesteps, (B,), generator=generator, device=gen_device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
        x_t = model.scheduler.add_noise(x0, noise, t)
        context = None
        if model.has_text and batch.get("input_ids") is not None:
            context = model.clip.text_hidden_states(batch["input_ids"].to(device),
                                                    batch.get("attention_mask")).to(x0.dtype)  # (B, L, Ht)
            if model.training and self.dropout_percent > 0 and batch.get("uncond_input_ids") is not None:
                # Classifier-free guidance needs the model to also learn the empty prompt.
                drop = torch.rand(B, generator=generator, device=gen_device).to(device) < self.dropout_percent
                uncond = model.clip.text_hidden_states(batch["uncond_input_ids"].to(device)).to(x0.dtype)
                context = torch.where(drop[:, None, None], uncond.expand_as(context), context)
        prediction = model.unet(x_t, t, context)
        target = model.scheduler.training_target(x0, noise)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        return LossOutput(loss, num_samples=B, metrics={"timesteps": t.tolist()})


@register_batch_handler("clip_hf")
@register_batch_handler("clip_openclip")
class ContrastiveBatchHandler(BatchHandler):
    """CLIP's symmetric contrastive loss over matching (text, image) pairs: row i's text belongs to row i's
    image. Embeddings are unit length and the logits are scaled by the model's ``logit_scale``.

    batch: ``input_ids`` (B, L) padded text ids and ``pixel_values`` (B, 3, h, w).
    """

    def compute_loss(self, model, batch, generator=None) -> LossOutput:
        from vla_foundry.models.clip_hf import l2normalize

        input_ids = self.to_model(model, batch["input_ids"])
        pixel_values = self.to_model(model, batch["pixel_values"])
        B = input_ids.shape[0]
        if pixel_values.shape[0] != B or B < 2:
            raise InvalidInputError(f"the contrastive loss needs matching pairs, at least 2; got {B} texts and "
                                    f"{pixel_values.shape[0]} images", field="texts")
        out = model(input_ids=input_ids, pixel_values=pixel_values)
        text, image = l2normalize(out["text_embeds"]), out["image_embeds"][:, 0]  # (B, Pd) each
        logits = model.model.logit_scale.exp() * text @ image.T  # (B, B): text i vs image j
        labels = torch.arange(B, device=logits.device)
        loss = (torch.nn.functional.cross_entropy(logits.float(), labels)
                + torch.nn.functional.cross_entropy(logits.T.float(), labels)) / 2
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return LossOutput(loss, num_samples=B, metrics={"text_to_image_accuracy": accuracy})


@register_batch_handler("diffusion_policy")
class PolicyBatchHandler(BatchHandler):
    """The policy's masked velocity loss (spec §9.5): MSE between the predicted and the true ε − x0 over the
    action rows the model must generate (``future_mask``); past rows enter clean and are not scored.

    batch: the model inputs ``input_ids``, ``attention_mask``, ``pixel_values`` (B·N, 3, h, w),
    ``attention_mask_images`` (B, N), ``actions`` (B, Ta, A) normalized, ``past_mask`` (B, Ta) and
    ``proprioception`` (B, P+1, Dp); optional ``future_mask`` (default: not past). The noise is drawn from
    ``generator`` first, then the timesteps (inside the model's forward), so a seed fixes the loss.

    With ``num_action_head_repeats`` R > 1 (spec §9.5) each observation's action side is tiled R times
    (repeat_interleave), so one backbone pass is scored under R noise draws and timesteps.
    """

    def compute_loss(self, model, batch, generator=None) -> LossOutput:
        (out,) = self.compute_loss_each(model, batch, [batch["actions"].shape[0]], [generator])
        if isinstance(out, Exception):
            raise out
        return out

    def compute_loss_each(self, model, batch, counts: list[int], generators: list[Optional[torch.Generator]]
                          ) -> list:
        """Several evaluations in one forward pass: ``batch`` holds their samples back to back (``counts[i]`` of
        the i-th), and each draws its noise, then its timesteps, from its own ``generators[i]``, as
        ``compute_loss`` of its samples alone does; one ``LossOutput`` each (an ``InvalidInputError`` for one
        with no row to score), its loss reduced over its own rows only."""
        batch = {k: (self.to_model(model, v) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        actions = batch["actions"]  # (B, Ta, A), B = sum(counts)
        past_mask = batch["past_mask"].bool()
        future_mask = batch.get("future_mask")
        future_mask = ~past_mask if future_mask is None else future_mask.bool()
        repeats = model.params.num_action_head_repeats or 1
        proprioception = batch.get("proprioception")
        if repeats > 1:
            actions, past_mask, future_mask = (t.repeat_interleave(repeats, dim=0)
                                               for t in (actions, past_mask, future_mask))
            if proprioception is not None:
                proprioception = proprioception.repeat_interleave(repeats, dim=0)
        rows = [n * repeats for n in counts]  # each evaluation's rows after tiling
        starts = [sum(rows[:i]) for i in range(len(rows))]
        noises, timesteps = [], []
        for n, generator in zip(rows, generators):
            gen_device = generator.device if generator is not None else actions.device
            noises.append(torch.randn((n, *actions.shape[1:]), generator=generator, device=gen_device,
                                      dtype=actions.dtype).to(actions.device))
            # as the model's forward draws them from the generator after the noise
            timesteps.append(torch.randint(0, model.num_timesteps, (n,), generator=generator, device=gen_device))
        # A VLM processor's other outputs for the backbone (spec §8.4), by name
        backbone_inputs = {k: self.to_model(model, v) for k, v in (batch.get("backbone_inputs") or {}).items()}
        out = model(batch["input_ids"], batch["pixel_values"], batch.get("attention_mask"),
                    batch.get("attention_mask_images"), actions, torch.cat(noises), past_mask, future_mask,
                    proprioception, timesteps=torch.cat([t.to(actions.device) for t in timesteps]), **backbone_inputs)
        error = (out.velocity.float() - out.target.float()) ** 2  # (B·R, Ta, A)
        results: list = []
        for start, n, count in zip(starts, rows, counts):
            own = slice(start, start + n)
            scored = future_mask[own][..., None].expand_as(error[own])
            if not bool(scored.any()):
                results.append(InvalidInputError("the batch has no action row to predict (every row is marked "
                                                 "past)", field="actions"))
                continue
            results.append(LossOutput(error[own][scored].mean(), num_samples=count,
                                      metrics={"timesteps": out.timesteps[own].tolist(),
                                               "num_action_rows": int(future_mask[own].sum())}))
        return results
