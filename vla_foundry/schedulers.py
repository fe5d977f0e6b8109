"""Noise schedulers: the math of adding noise and of one reverse step (format spec §10).

Kept apart from the sampling loops (diffusers style): a model owns its training scheduler
(``NoiseSchedulerDDPM`` with its tables in the state dict, ``FlowMatchingScheduler``, or
diffusers' DDPM), and ``fast_scheduler`` builds a fresh diffusers scheduler per request for
fast sampling from the same trained model — fresh because diffusers schedulers keep step
state, so two requests must never share one.

Randomness is explicit: a DDPM step takes its ``z`` as ``noise=`` or draws it from
``generator`` (one per image when a list is given), never from the global RNG.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from vla_foundry.models.precision import Float32Buffers
from vla_foundry.params.diffusion import NoiseSchedulerParams

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; a list of generators draws one batch row each, so an image's
    noise does not depend on which other images share its batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def _clamp(x: torch.Tensor, clamp_range) -> torch.Tensor:
    return x if clamp_range is None else x.clamp(clamp_range[0], clamp_range[1])


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast over the trailing dims of ``like``: (B,) → (B, 1, 1, …)."""
    v = values.to(like.device)[t.to(like.device).long()]
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class NoiseSchedulerDDPM(Float32Buffers):
    """VLA Foundry's DDPM (§10.1). The tables are float32 buffers and the loaded values are used as they are."""

    def __init__(self, params: NoiseSchedulerParams):
        super().__init__()
        self.num_timesteps = params.num_timesteps
        self.clamp_range = params.clamp_range
        betas = torch.linspace(params.beta_start, params.beta_end, params.num_timesteps, dtype=torch.float32)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        for name, value in {"betas": betas, "alphas": alphas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
                            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
                            "posterior_variance": betas * (1 - ac_prev) / (1 - ac)}.items():
            self.register_buffer(name, value)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = (_per_sample(self.sqrt_alphas_cumprod, timesteps, x0) * x0
             + _per_sample(self.sqrt_one_minus_alphas_cumprod, timesteps, x0) * noise)
        if mask is not None:
            y = mask * y + (1 - mask) * x0
        return _clamp(y, self.clamp_range)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise  # the model predicts ε

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
             generator: Generators = None) -> torch.Tensor:
        """x_{t-1} from x_t and the predicted ε. For t > 0 the posterior noise is ``noise`` if given, else drawn
        from ``generator``."""
        t = int(t)
        ac, ac_prev = self.alphas_cumprod[t], self.alphas_cumprod_prev[t]
        x, eps = sample.float(), model_output.float()  # the step in float32 whatever the model's dtype
        x0_hat = (x - (1 - ac).sqrt() * eps) / ac.sqrt()
        mean = ((ac_prev.sqrt() * self.betas[t] / (1 - ac)) * x0_hat
                + (self.alphas[t].sqrt() * (1 - ac_prev) / (1 - ac)) * x)
        if t > 0:
            z = noise if noise is not None else randn_like(sample, generator)
            mean = mean + self.posterior_variance[t].sqrt() * z.float()
        return _clamp(mean.to(sample.dtype), self.clamp_range)


class FlowMatchingScheduler(nn.Module):
    """Flow matching (§10.2): x_t = x0 + (t/T)·(ε − x0); the model predicts the velocity ε − x0. No state."""

    def __init__(self, params: NoiseSchedulerParams):
        super().__init__()
        self.num_timesteps = params.num_timesteps
        self.clamp_range = params.clamp_range

    def add_noise(self, x0, noise, timesteps, mask=None):
        s = timesteps.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1))) / self.num_timesteps
        y = x0 + s * (noise - x0)
        if mask is not None:
            y = mask * y + (1 - mask) * x0
        return _clamp(y, self.clamp_range)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def step(self, model_output, t, sample, step_size: float = 1, *, noise=None, generator=None):
        return _clamp(sample - model_output * (step_size / self.num_timesteps), self.clamp_range)


class DiffusersDDPM(nn.Module):
    """``use_diffusers_scheduler`` (§10.3): diffusers' DDPM at its defaults (the config's betas are ignored,
    as in VLA Foundry, bug B10); no state-dict keys."""

    def __init__(self, params: NoiseSchedulerParams):
        super().__init__()
        from diffusers import DDPMScheduler

        low, high = params.clamp_range if params.clamp_range is not None else (None, None)
        if params.clamp_range is not None and low != -high:
            raise ValueError(f"use_diffusers_scheduler needs a symmetric clamp_range; got {params.clamp_range}")
        self.num_timesteps = params.num_timesteps
        self.clamp_range = params.clamp_range
        self.config = dict(num_train_timesteps=params.num_timesteps, clip_sample=params.clamp_range is not None,
                           clip_sample_range=high if high is not None else 1.0)
        self._math = DDPMScheduler(**self.config)  # add_noise is stateless

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._math.alphas_cumprod

    def add_noise(self, x0, noise, timesteps, mask=None):
        y = self._math.add_noise(x0, noise, timesteps.long().cpu()).to(x0.dtype)
        if mask is not None:
            y = mask * y + (1 - mask) * x0
        return _clamp(y, self.clamp_range)

    def training_target(self, x0, noise):
        return noise

    def step(self, model_output, t, sample, *, noise=None, generator: Generators = None):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(**self.config)  # per call: its step reads set_timesteps state
        if noise is not None:  # diffusers draws its own z; give it ours through a generator-free path
            raise ValueError("diffusers' DDPM draws its own step noise; pass `generator` instead of `noise`")
        out = scheduler.step(model_output, int(t), sample, generator=_one_or_list(generator)).prev_sample
        return _clamp(out, self.clamp_range)


def _one_or_list(generator: Generators):
    return list(generator) if generator is not None and not isinstance(generator, torch.Generator) else generator


def build_training_scheduler(params: NoiseSchedulerParams, *, flow_matching: bool, diffusers: bool) -> nn.Module:
    """The scheduler a model trained with (spec §10 selection order)."""
    if diffusers:
        return DiffusersDDPM(params)
    if flow_matching:
        return FlowMatchingScheduler(params)
    return NoiseSchedulerDDPM(params)


# ----------------------------------------------------------------------------- fast sampling

# Fast samplers by request name, per way of training. diffusers implements each; the names mean the same
# method in both families where it exists in both (``dpmsolver++``: DPM-Solver++ 2M, ``unipc``: UniPC-BH2).
FAST_SCHEDULERS = ("ddim", "dpmsolver++", "euler", "unipc")  # ε-prediction (DDPM-trained) models
FLOW_SCHEDULERS = ("flow_euler", "dpmsolver++", "unipc", "heun")  # flow-matching (velocity) models
# diffusers' flow samplers lay their σ grid out in steps of 1/num_train_timesteps (the last σ before 0, the
# first σ of DPM-Solver++, the integer timesteps they index by). They get this fixed resolution rather than
# the model's T (often 100, or 10 in tests): the model is called at σ·T whatever the grid (``model_timesteps``).
FLOW_SIGMA_RESOLUTION = 1000


def fast_scheduler(name: str, training: nn.Module):
    """A new diffusers scheduler named ``name`` that samples a model trained with ``training``.

    ε-prediction models (``FAST_SCHEDULERS``): the betas are the trained ones (the loaded
    ``betas`` table for VLA Foundry's DDPM), so the fast sampler walks the same noise levels
    the model learned; trailing timestep spacing reaches the noisiest trained level even with
    few steps. Flow-matching models: ``FLOW_SCHEDULERS``, see ``_flow_scheduler``.
    """
    if isinstance(training, FlowMatchingScheduler):
        return _flow_scheduler(name, training)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    if isinstance(training, NoiseSchedulerDDPM):
        # Betas that reproduce the loaded alphas_cumprod exactly (the table the model trained with).
        ac = training.alphas_cumprod.detach().double().cpu()
        betas = dict(trained_betas=(1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist())
    else:
        betas = {}  # diffusers DDPM defaults (linear 1e-4 … 0.02)
    common = dict(num_train_timesteps=training.num_timesteps, prediction_type="epsilon",
                  timestep_spacing="trailing", **betas)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    if name == "unipc":
        return UniPCMultistepScheduler(solver_order=2, **common)
    hint = "; 'flow_euler' and 'heun' sample flow-matching models" if name in FLOW_SCHEDULERS else ""
    raise ValueError(f"unknown fast scheduler {name!r} for an ε-prediction (DDPM-trained) model; choose one of "
                     f"{', '.join(FAST_SCHEDULERS)}{hint}")


def _flow_scheduler(name: str, training: FlowMatchingScheduler):
    """diffusers' flow samplers over VLA Foundry's convention: x_σ = x0 + σ·(ε − x0) with σ = t/T, and the
    model predicts the velocity ε − x0 — diffusers' ``flow_prediction`` with unshifted flow sigmas
    (``shift``/``flow_shift`` 1), walking σ from 1 to 0.

    ``flow_euler`` and ``heun`` start at σ = 1, UniPC at 1 − 1e-6 and DPM-Solver++ at 1 − 1/1000: the
    last two work in log-SNR, which is infinite at σ = 1 (diffusers' own choice).
    """
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)

    T = FLOW_SIGMA_RESOLUTION
    flow = dict(num_train_timesteps=T, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                final_sigmas_type="zero")
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    if name == "heun":  # second order, two model calls per step but the last
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    if name == "unipc":
        return UniPCMultistepScheduler(solver_order=2, **flow)
    hint = "; 'ddim' and 'euler' sample ε-prediction (DDPM-trained) models" if name in FAST_SCHEDULERS else ""
    raise ValueError(f"unknown fast scheduler {name!r} for a flow-matching model; choose one of "
                     f"{', '.join(FLOW_SCHEDULERS)}{hint}")


def model_timesteps(sampler, training: nn.Module) -> list:
    """The timestep to call the model with at each of ``sampler.timesteps`` (after ``set_timesteps``).

    ε-prediction samplers step through the trained timesteps themselves. A flow sampler's step ``i``
    is at ``sampler.sigmas[i]`` (its timesteps are σ on its own grid, integer-rounded by some): the
    model, trained at t = σ·T, is called at exactly that σ.
    """
    if isinstance(training, FlowMatchingScheduler):
        steps = len(sampler.timesteps)
        return (sampler.sigmas[:steps].double() * training.num_timesteps).tolist()
    return [t.item() for t in sampler.timesteps]
