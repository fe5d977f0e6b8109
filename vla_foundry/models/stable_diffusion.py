"""``stable_diffusion``: pixel-space UNet + noise scheduler (+ CLIP text encoder), format spec §10–§11.

The model holds the UNet, its training scheduler and (when configured) the ``clip_hf`` text
encoder; ``generate`` is the sampling loop. The scheduler math lives in ``schedulers.py``.
Shapes: B images, C channels, S×S pixels, T training timesteps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from vla_foundry.models.registry import create_model, register_model
from vla_foundry.models.unet import DiffusersUNet, UNet
from vla_foundry.params.diffusion import StableDiffusionParams
from vla_foundry.schedulers import (FAST_SCHEDULERS, FLOW_SCHEDULERS, FlowMatchingScheduler, Generators,
                                    build_training_scheduler, fast_scheduler, model_timesteps, randn_like)

TRAINING = "training"  # the scheduler the model trained with, over all its steps (t = T−1 … 1)


@dataclass
class DiffusionOutput:
    images: torch.Tensor  # (B, S, S, C) uint8
    sample: torch.Tensor  # (B, C, S, S) the last scheduler output, in [-1, 1] units


def to_uint8(sample: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] → (B, S, S, C) uint8, as VLA Foundry maps its samples."""
    return torch.round((sample.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)


@register_model("stable_diffusion")
class StableDiffusion(nn.Module):
    modality = "image"

    def __init__(self, params: StableDiffusionParams, load_pretrained: bool = True):
        super().__init__()
        self.params = params
        self.scheduler = build_training_scheduler(params.noise_scheduler,
                                                  flow_matching=params.use_flow_matching_scheduler,
                                                  diffusers=params.use_diffusers_scheduler)
        clip = params.clip
        if clip is not None and getattr(clip, "hf_pretrained", None):
            self.clip = create_model(clip, load_pretrained=load_pretrained)
        # use_diffusers_unet: the reference's UNet2DModel, which takes no text even with a CLIP configured
        # (spec §11.2); its checkpoints hold clip.model.* and unet.model.* only.
        self.unet = DiffusersUNet(params.unet) if params.use_diffusers_unet else UNet(params.unet)
        if hasattr(self, "clip"):
            if not params.use_diffusers_unet and params.unet.text_emb_dim != self.clip.text_hidden_size:
                raise ValueError(f"unet.text_emb_dim ({params.unet.text_emb_dim}) must equal the CLIP text hidden "
                                 f"size ({self.clip.text_hidden_size})")

    def adapt_to_checkpoint_keys(self, keys) -> None:
        """Called by the checkpoint loader before its strict load: a diffusers-UNet checkpoint saved by earlier
        versions of this server with a CLIP carries our ``unet.text_proj.*``; build it so those load (and take
        prompts). Reference checkpoints lack it and keep the reference module."""
        if isinstance(self.unet, DiffusersUNet) and hasattr(self, "clip") and not self.unet.takes_text \
                and "unet.text_proj.weight" in keys:
            self.unet.add_text_proj(self.clip.text_hidden_size)

    # ------------------------------------------------------------------ what a client needs

    @property
    def has_text(self) -> bool:
        """Prompts are taken: a CLIP, and a UNet with text inputs (the reference's diffusers UNet has none)."""
        return hasattr(self, "clip") and (not isinstance(self.unet, DiffusersUNet) or self.unet.takes_text)

    @property
    def image_size(self) -> int:
        return self.params.unet.image_size

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.num_timesteps

    @property
    def is_flow_matching(self) -> bool:
        return isinstance(self.scheduler, FlowMatchingScheduler)

    @property
    def schedulers(self) -> tuple[str, ...]:
        return (TRAINING, *FLOW_SCHEDULERS) if self.is_flow_matching else (TRAINING, *FAST_SCHEDULERS)

    @property
    def default_scheduler(self) -> str:
        # DPM-Solver++ for both ways of training: for flow models it comes about twice as close to the exact
        # solution as Euler at the same 10-20 model calls (README: Flow-matching samplers).
        return "dpmsolver++"

    # ------------------------------------------------------------------ text

    def encode_text(self, prompts: Sequence[str], max_text_seq_len: int = 64, field: str = "prompt") -> torch.Tensor:
        """CLIP text ``last_hidden_state`` (B, max_len, Ht) on ids padded to ``max_text_seq_len`` (spec §11.3)."""
        ids = self.clip.tokenize(list(prompts), max_text_seq_len, field=field)
        return self.clip.text_hidden_states(ids)

    # ------------------------------------------------------------------ sampling

    def _denoise(self, x, t, context, guidance_scale: Optional[float]) -> torch.Tensor:
        """The UNet's prediction at timestep ``t``, in float32 (the UNet runs in its weights' dtype); with guidance,
        uncond + g·(cond − uncond)."""
        B = x.shape[0]
        timesteps = torch.full((B,), float(t), device=x.device) if not isinstance(t, int) else \
            torch.full((B,), t, dtype=torch.long, device=x.device)
        x = x.to(next(self.unet.parameters()).dtype)
        if context is None or guidance_scale is None:
            return self.unet(x, timesteps, context).float()
        out_u, out_c = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), context).float().chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    @torch.no_grad()
    def generate(self, batch_size: int, device: Union[str, torch.device] = "cpu",
                 prompt: Union[None, str, Sequence[str]] = None,
                 uncond_prompt: Union[str, Sequence[str]] = "", max_text_seq_len: int = 64, *,
                 guidance_scale: Optional[float] = None, generator: Generators = None,
                 initial_noise: Optional[torch.Tensor] = None, step_noises: Optional[torch.Tensor] = None,
                 scheduler: str = TRAINING, num_inference_steps: Optional[int] = None) -> DiffusionOutput:
        """Sample ``batch_size`` images (spec §11.3).

        ``generator``: one, or one per image (then each image depends on its own seed only).
        ``initial_noise`` (B, C, S, S) and ``step_noises`` (T−1, B, C, S, S) replace the draws (the
        fixtures record them). ``guidance_scale``: None ⇒ the config's when it enables classifier-free
        guidance, else none. ``scheduler``: ``training`` (T−1 steps, as VLA Foundry samples) or a fast
        one (``dpmsolver++``, ``ddim``, ``euler``, ``unipc``; for flow matching ``flow_euler``,
        ``dpmsolver++``, ``unipc``, ``heun``) with ``num_inference_steps`` solver steps (Heun calls the
        model twice per step but the last).
        """
        device = torch.device(device)
        dtype = next(self.unet.parameters()).dtype
        shape = (batch_size, self.params.unet.in_channels, self.image_size, self.image_size)
        # The sample and the sampler's steps stay in float32 whatever the UNet's dtype, as the reference's fp32
        # parameters under bf16 autocast keep them (spec §2.4): in bfloat16 a training step of T = 1000 moves a
        # sample by less than its rounding, and most of the denoising was lost.
        if initial_noise is not None:
            x = initial_noise.to(device=device, dtype=torch.float32)
        else:
            x = randn_like(torch.empty(shape, device=device, dtype=torch.float32), generator)
        context = None
        prompt = prompt or None  # an empty prompt samples unconditionally, as in VLA Foundry (`if prompt`)
        if prompt is not None and self.has_text:
            prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
            context = self.encode_text(prompts, max_text_seq_len).to(dtype)
            if guidance_scale is None and self.params.do_classifier_free_guidance:
                guidance_scale = self.params.guidance_scale
            if guidance_scale is not None:
                uncond = [uncond_prompt] * batch_size if isinstance(uncond_prompt, str) else list(uncond_prompt)
                context = torch.cat([self.encode_text(uncond, max_text_seq_len, "negative_prompt").to(dtype), context])
        elif prompt is not None and hasattr(self, "clip"):
            raise ValueError("this model is unconditional: use_diffusers_unet builds VLA Foundry's diffusers UNet, "
                             "which takes no text (its CLIP is unused); generate without a prompt")
        elif prompt is not None:
            raise ValueError("this model has no text encoder (unconditional); generate without a prompt")
        if scheduler == TRAINING:
            if num_inference_steps not in (None, self.num_timesteps - 1):
                raise ValueError(f"the training scheduler runs all {self.num_timesteps - 1} steps; got "
                                 f"num_inference_steps={num_inference_steps}")
            for i, t in enumerate(range(self.num_timesteps - 1, 0, -1)):  # t = 0 is never run (B13)
                out = self._denoise(x, t, context, guidance_scale)
                noise = step_noises[i].to(device=device, dtype=torch.float32) if step_noises is not None else None
                x = self.scheduler.step(out, t, x, noise=noise, generator=generator)
            return DiffusionOutput(to_uint8(x), x)
        if scheduler not in self.schedulers:
            raise ValueError(f"unknown scheduler {scheduler!r} for this model; choose one of "
                             f"{', '.join(self.schedulers)}")
        sampler = fast_scheduler(scheduler, self.scheduler)  # a new one per call: diffusers' keep step state
        sampler.set_timesteps(num_inference_steps or 20, device=device)
        # Flow-matching schedulers have no input scaling (their noise is unit variance).
        x = x * getattr(sampler, "init_noise_sigma", 1.0)
        scale_input = getattr(sampler, "scale_model_input", lambda sample, t: sample)
        # Stochastic steps draw from the request's generators; deterministic samplers (UniPC) take none.
        step_kwargs = {}
        if "generator" in inspect.signature(sampler.step).parameters:
            step_kwargs["generator"] = list(generator) if isinstance(generator, (list, tuple)) else generator
        for t, model_t in zip(sampler.timesteps, model_timesteps(sampler, self.scheduler)):
            out = self._denoise(scale_input(x, t), model_t, context, guidance_scale)
            x = sampler.step(out, t, x, **step_kwargs).prev_sample
        return DiffusionOutput(to_uint8(x), x)
