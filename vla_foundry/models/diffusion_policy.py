"""``diffusion_policy``: a backbone, a transformer denoiser and a noise scheduler (format spec §9–§10).

Shapes: B batch, C conditioning tokens of width Dc, H the denoiser width, Ta = P+1+F
action steps (P past, the current one, F future) of width A, Tp = P+1 proprioception steps
of width Dp, T the scheduler's timesteps.

The denoiser predicts a velocity ε − x0 (the training target of every scheduler, §9.5).
Flow matching samples as VLA Foundry does, including its extra steps when the step count
does not divide T (B12). DDPM-scheduled policies, which the reference cannot sample (B1),
sample here deliberately: the velocity is turned into (x0, ε) at the current noise level,
then one DDPM step (all T steps) or one deterministic DDIM step (fewer) is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vla_foundry.models.backbones import create_backbone
from vla_foundry.models.registry import create_model, register_model
from vla_foundry.models.unet import SinusoidalEmbedding
from vla_foundry.params.diffusion import DiffusionPolicyParams
from vla_foundry.schedulers import FlowMatchingScheduler, build_training_scheduler, randn_like

CONDITIONING_MODES = ("concat", "add")


@dataclass
class PolicyForwardOutput:
    velocity: torch.Tensor  # (B, Ta, A) predicted ε − x0
    target: torch.Tensor  # (B, Ta, A) noise − actions
    noisy_actions: torch.Tensor  # (B, Ta, A) what entered action_encode
    timesteps: torch.Tensor  # (B,) int64
    future_mask: torch.Tensor  # (B, Ta) bool: the rows the loss counts


@register_model("diffusion_policy")
class DiffusionPolicy(nn.Module):
    modality = "action"

    def __init__(self, params: DiffusionPolicyParams, load_pretrained: bool = True):
        super().__init__()
        if params.action_dim is None or params.action_dim <= 0:
            raise ValueError("diffusion_policy needs `action_dim` (config_model.yaml); got "
                             f"{params.action_dim!r}")
        if params.diffusion_step_conditioning not in CONDITIONING_MODES:
            raise ValueError(f"diffusion_step_conditioning {params.diffusion_step_conditioning!r} is unknown; one of "
                             f"{', '.join(CONDITIONING_MODES)}")
        self.params = params
        self.vision_language_backbone = create_backbone(params.vision_language_backbone, load_pretrained)
        self.transformer = create_model(params.transformer, load_pretrained=load_pretrained)
        Dc, H = self.vision_language_backbone.output_dim, self.transformer.hidden_size
        A, Dp = params.action_dim, params.proprioception_dim or 0
        T = params.noise_scheduler.num_timesteps
        self.sinusoidal_position_embeddings = SinusoidalEmbedding(Dc)  # only initialises time_encoding
        self.time_encoding = nn.Embedding(T, Dc)
        with torch.no_grad():
            self.time_encoding.weight.copy_(self.sinusoidal_position_embeddings(torch.arange(T)))
        self.condition_encode = nn.Linear(Dc, H)
        self.action_encode = nn.Linear(A, H)
        if Dp > 0:
            self.proprioception_encode = nn.Linear(Dp, H)
        self.output_layer = nn.Linear(H, A)
        self.scheduler = build_training_scheduler(params.noise_scheduler,
                                                  flow_matching=params.use_flow_matching_scheduler,
                                                  diffusers=params.use_diffusers_scheduler)

    @property
    def num_timesteps(self) -> int:
        return self.params.noise_scheduler.num_timesteps

    # ------------------------------------------------------------------ one velocity prediction (§9.3)

    def encode_observation(self, input_ids, pixel_values, attention_mask=None, attention_mask_images=None,
                           **backbone_inputs):
        """Backbone tokens (B, C, Dc); computed once per sampling call. ``backbone_inputs``: a VLM processor's
        other outputs (§8.4), which VLA Foundry passes on to the backbone by name."""
        return self.vision_language_backbone(input_ids, pixel_values, attention_mask, attention_mask_images,
                                             **backbone_inputs)

    def denoise(self, condition: torch.Tensor, timesteps: torch.Tensor, noisy_actions: torch.Tensor,
                proprioception: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity (B, Ta, A) for tokens (B, C, Dc), integer timesteps (B,) and actions (B, Ta, A)."""
        dtype = self.action_encode.weight.dtype  # the action state stays float32; only the layers run in dtype
        te = self.time_encoding(timesteps.long())[:, None, :]  # (B, 1, Dc)
        if self.params.diffusion_step_conditioning == "concat":
            cond = self.condition_encode(torch.cat([te, condition], dim=1))  # (B, 1+C, H), time token first
        else:
            cond = self.condition_encode(condition + te)  # (B, C, H)
        parts = [cond]
        if proprioception is not None and hasattr(self, "proprioception_encode"):
            parts.append(self.proprioception_encode(proprioception.to(dtype)))  # (B, Tp, H)
        parts.append(self.action_encode(noisy_actions.to(dtype)))  # (B, Ta, H)
        seq = torch.cat([p.to(dtype) for p in parts], dim=1)
        hidden = self.transformer(inputs_embeds=seq, use_cache=False, output_hidden_states=True).hidden_states[-1]
        velocity = self.output_layer(hidden[:, -noisy_actions.shape[1]:])  # (B, Ta, A)
        return velocity.to(noisy_actions.dtype)

    # ------------------------------------------------------------------ sampling (§9.4)

    def timesteps_visited(self, num_inference_steps: Optional[int] = None) -> list[int]:
        """``range(T−1, 0, −max(1, T // S))``: S steps when S divides T, more otherwise (B12)."""
        T = self.num_timesteps
        S = num_inference_steps or T
        if S <= 0:
            raise ValueError(f"num_inference_steps must be > 0; got {S}")
        return list(range(T - 1, 0, -max(1, T // S)))

    @torch.no_grad()
    def generate_actions(self, input_ids=None, pixel_values=None, actions=None, attention_mask=None,
                         attention_mask_images=None, num_inference_steps=None, past_mask=None, proprioception=None, *,
                         generator: Optional[torch.Generator] = None, initial_noise: Optional[torch.Tensor] = None,
                         condition: Optional[torch.Tensor] = None, **backbone_inputs) -> torch.Tensor:
        """Normalized actions (B, Ta, A). Rows where ``past_mask`` is True are the given ``actions``, exactly.

        The only random draw is the initial noise: ``initial_noise`` when given, else drawn
        from ``generator`` (the global RNG when None, as in the reference). ``condition``: the backbone's
        tokens (B, C, Dc) when already computed (``encode_observation``); the observation's inputs are then unused.
        """
        if actions is None:
            raise TypeError("generate_actions needs actions (B, Ta, A): the known past rows, zeros elsewhere")
        if condition is None and input_ids is None and pixel_values is None:
            raise TypeError("generate_actions needs the observation (input_ids, pixel_values, …) or the backbone's "
                            "tokens (condition)")
        visited = self.timesteps_visited(num_inference_steps)
        if condition is None:
            condition = self.encode_observation(input_ids, pixel_values, attention_mask, attention_mask_images,
                                                **backbone_inputs)
        z = randn_like(actions, generator) if initial_noise is None else initial_noise.to(actions)
        if past_mask is not None:
            keep = past_mask[..., None].to(actions.dtype)  # (B, Ta, 1)
            past = actions * keep
            x = past + z * (1 - keep)
        else:
            keep, past, x = None, None, z
        step_size = max(1, self.num_timesteps // (num_inference_steps or self.num_timesteps))
        for i, t in enumerate(visited):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            velocity = self.denoise(condition, t_batch, x, proprioception)
            if isinstance(self.scheduler, FlowMatchingScheduler):
                x_new = self.scheduler.step(velocity, t, x, step_size)
            else:
                t_next = visited[i + 1] if i + 1 < len(visited) else 0
                x_new = self._ddpm_step(velocity, t, t_next, x, generator)
            x = x_new if keep is None else past + x_new * (1 - keep)
        return x

    def _ddpm_step(self, velocity, t: int, t_next: int, x, generator) -> torch.Tensor:
        """One reverse step of a DDPM-scheduled policy (the B1 fix), from velocity v = ε − x0.

        With x_t = a·x0 + b·ε (a = √ᾱ_t, b = √(1−ᾱ_t)) and v = ε − x0: x0 = (x_t − b·v)/(a + b),
        ε = v + x0. Consecutive steps take the model's own DDPM step (posterior noise from
        ``generator``); strided ones the deterministic DDIM update to ᾱ at ``t_next``. The
        sampling loop never visits t = 0 (§9.4), so the last step (``t_next`` = 0) lands on the
        clean estimate x0 either way.
        """
        ac = self.scheduler.alphas_cumprod.to(x.device, torch.float32)
        a, b = ac[t].sqrt(), (1 - ac[t]).sqrt()
        v, xf = velocity.float(), x.float()
        x0 = (xf - b * v) / (a + b)
        eps = v + x0
        if t - t_next == 1 and t_next > 0:
            return self.scheduler.step(eps.to(x.dtype), t, x, generator=generator)
        ac_next = ac[t_next] if t_next > 0 else ac.new_tensor(1.0)
        out = ac_next.sqrt() * x0 + (1 - ac_next).sqrt() * eps
        clamp = self.params.noise_scheduler.clamp_range
        return (out if clamp is None else out.clamp(*clamp)).to(x.dtype)

    # ------------------------------------------------------------------ training forward (§9.5)

    def forward(self, input_ids, pixel_values, attention_mask, attention_mask_images, actions, noise, past_mask,
                future_mask, proprioception=None, *, timesteps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, **backbone_inputs) -> PolicyForwardOutput:
        """The velocity for noised ``actions`` at ``timesteps`` (drawn from ``generator`` when absent)."""
        B = actions.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.num_timesteps, (B,), generator=generator,
                                      device=generator.device if generator is not None else "cpu")
        timesteps = timesteps.to(actions.device).long()
        future = future_mask[..., None]  # (B, Ta, 1)
        noised = self.scheduler.add_noise(actions, noise, timesteps, mask=future.to(actions.dtype))
        x = torch.where(future, noised, actions)
        if self.training and self.params.input_noise_std > 0:
            x = x + self.params.input_noise_std * randn_like(x, generator)
        condition = self.encode_observation(input_ids, pixel_values, attention_mask, attention_mask_images,
                                            **backbone_inputs)
        repeats = condition.shape[0] and B // condition.shape[0]
        if repeats > 1:  # num_action_head_repeats: action rows arrive tiled (repeat_interleave)
            condition = condition.repeat_interleave(repeats, dim=0)
            if proprioception is not None and proprioception.shape[0] != B:
                proprioception = proprioception.repeat_interleave(repeats, dim=0)
        velocity = self.denoise(condition, timesteps, x, proprioception)
        return PolicyForwardOutput(velocity, noise - actions, x, timesteps, future_mask.bool())
