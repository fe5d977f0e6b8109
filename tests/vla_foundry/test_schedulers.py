"""Noise scheduler math (format spec §10): the DDPM tables and step, flow matching, diffusers' DDPM (B10) and
per-image noise draws."""

import pytest
import torch

from vla_foundry.params.diffusion import NoiseSchedulerParams
from vla_foundry.schedulers import (FLOW_SCHEDULERS, FLOW_SIGMA_RESOLUTION, DiffusersDDPM, FlowMatchingScheduler,
                                    NoiseSchedulerDDPM, fast_scheduler, model_timesteps, randn_like)

T = 50


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


@pytest.fixture(scope="module")
def ddpm():
    return NoiseSchedulerDDPM(NoiseSchedulerParams(num_timesteps=T, beta_start=1e-4, beta_end=0.02, clamp_range=None))


@pytest.fixture(scope="module")
def ddpm_clamped():
    return NoiseSchedulerDDPM(NoiseSchedulerParams(num_timesteps=T, clamp_range=(-1.0, 1.0)))


# ----------------------------------------------------------------------------- custom DDPM (§10.1)

def ddpm_tables(dtype):
    betas = torch.linspace(1e-4, 0.02, T, dtype=dtype)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=dtype), ac[:-1]])
    return {"betas": betas, "alphas": alphas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "posterior_variance": betas * (1 - ac_prev) / (1 - ac)}


def test_ddpm_tables_match_the_formulas(ddpm):
    buffers = dict(ddpm.named_buffers())
    assert set(buffers) == set(ddpm_tables(torch.float32))  # exactly the §10.1 state-dict keys
    exact = ddpm_tables(torch.float64)
    for name, value in ddpm_tables(torch.float32).items():  # computed in float32 at construction
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (T,), name
        assert torch.allclose(buffers[name], value, rtol=1e-6, atol=0), name
        # float32 cancellation in 1 − ac (ac ≈ 1 at t = 0) keeps the agreement with exact math near 1e-4
        assert torch.allclose(buffers[name].double(), exact[name], rtol=2e-4, atol=1e-7), name
    assert buffers["alphas_cumprod_prev"][0] == 1 and buffers["posterior_variance"][0] == 0


def test_ddpm_uses_the_loaded_tables():
    s = NoiseSchedulerDDPM(NoiseSchedulerParams(num_timesteps=4))
    state = {k: torch.full((4,), 0.25) for k in s.state_dict()}
    s.load_state_dict(state)
    x0, eps = randn(1, 2, 3, 3, seed=1), randn(1, 2, 3, 3, seed=2)
    assert torch.allclose(s.add_noise(x0, eps, torch.tensor([2])), 0.25 * x0 + 0.25 * eps)


def test_ddpm_add_noise(ddpm):
    x0, eps = randn(3, 2, 4, 4, seed=1), randn(3, 2, 4, 4, seed=2)
    t = torch.tensor([0, 17, T - 1])
    y = ddpm.add_noise(x0, eps, t)
    for i in range(3):
        a, b = ddpm.sqrt_alphas_cumprod[t[i]], ddpm.sqrt_one_minus_alphas_cumprod[t[i]]
        assert torch.allclose(y[i], a * x0[i] + b * eps[i], atol=1e-6)


def test_ddpm_add_noise_with_mask(ddpm):
    x0, eps = randn(2, 1, 6, seed=1), randn(2, 1, 6, seed=2)
    t = torch.tensor([10, 40])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]).expand(2, 1, 6)
    noisy = ddpm.add_noise(x0, eps, t)
    y = ddpm.add_noise(x0, eps, t, mask=mask)
    assert torch.equal(y, mask * noisy + (1 - mask) * x0)
    assert torch.equal(y[..., 1], x0[..., 1]) and not torch.equal(y[..., 0], x0[..., 0])


def test_ddpm_add_noise_clamps(ddpm_clamped):
    x0, eps = 3 * randn(2, 3, 8, 8, seed=1), 3 * randn(2, 3, 8, 8, seed=2)
    t = torch.tensor([5, 45])
    y = ddpm_clamped.add_noise(x0, eps, t)
    raw = (ddpm_clamped.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0
           + ddpm_clamped.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * eps)
    assert raw.abs().max() > 1  # the clamp has something to do
    assert torch.allclose(y, raw.clamp(-1, 1), atol=1e-6)


def ddpm_step_formula(s, eps_hat, t, x, z=None):
    ac, ac_prev = s.alphas_cumprod[t].double(), s.alphas_cumprod_prev[t].double()
    x, eps_hat = x.double(), eps_hat.double()
    x0_hat = (x - (1 - ac).sqrt() * eps_hat) / ac.sqrt()  # not clamped
    mean = ac_prev.sqrt() * s.betas[t] / (1 - ac) * x0_hat + s.alphas[t].double().sqrt() * (1 - ac_prev) / (1 - ac) * x
    if z is not None:
        mean = mean + s.posterior_variance[t].double().sqrt() * z
    return mean


def test_ddpm_step_at_t0_adds_no_noise(ddpm):
    x, eps_hat = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    a = ddpm.step(eps_hat, 0, x, generator=gen(1))
    b = ddpm.step(eps_hat, 0, x, generator=gen(2))
    c = ddpm.step(eps_hat, 0, x, noise=torch.full_like(x, 100.0))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(a.double(), ddpm_step_formula(ddpm, eps_hat, 0, x), atol=1e-5)


@pytest.mark.parametrize("t", [1, 25, T - 1])
def test_ddpm_step_with_noise(ddpm, t):
    x, eps_hat, z = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2), randn(2, 3, 4, 4, seed=3)
    out = ddpm.step(eps_hat, t, x, noise=z)
    assert torch.allclose(out.double(), ddpm_step_formula(ddpm, eps_hat, t, x, z), atol=1e-5)
    # Without `noise`, z comes from the generator (never the global RNG).
    assert torch.equal(ddpm.step(eps_hat, t, x, generator=gen(7)),
                       ddpm.step(eps_hat, t, x, noise=randn(2, 3, 4, 4, seed=7)))


def test_ddpm_step_clamps_the_output_not_x0(ddpm_clamped):
    x, eps_hat = 2 * randn(2, 3, 4, 4, seed=1), 2 * randn(2, 3, 4, 4, seed=2)
    z = randn(2, 3, 4, 4, seed=3)
    raw = ddpm_step_formula(ddpm_clamped, eps_hat, 30, x, z)
    assert raw.abs().max() > 1
    out = ddpm_clamped.step(eps_hat, 30, x, noise=z)
    assert out.abs().max() <= 1
    assert torch.allclose(out.double(), raw.clamp(-1, 1), atol=1e-5)


# ----------------------------------------------------------------------------- flow matching (§10.2)

def test_flow_matching_formulas():
    s = FlowMatchingScheduler(NoiseSchedulerParams(num_timesteps=20, clamp_range=None))
    x0, eps = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    t = torch.tensor([4, 15])
    frac = (t.float() / 20).view(-1, 1, 1, 1)
    assert torch.allclose(s.add_noise(x0, eps, t), x0 + frac * (eps - x0), atol=1e-6)
    mask = (randn(2, 3, 4, 4, seed=3) > 0).float()
    assert torch.allclose(s.add_noise(x0, eps, t, mask=mask), mask * (x0 + frac * (eps - x0)) + (1 - mask) * x0,
                          atol=1e-6)
    assert torch.equal(s.training_target(x0, eps), eps - x0)
    v = randn(2, 3, 4, 4, seed=4)
    assert torch.allclose(s.step(v, 7, x0), x0 - v / 20, atol=1e-7)
    assert torch.allclose(s.step(v, 7, x0, step_size=4), x0 - v * (4 / 20), atol=1e-7)


def test_flow_matching_clamps():
    s = FlowMatchingScheduler(NoiseSchedulerParams(num_timesteps=10, clamp_range=(-0.5, 0.5)))
    x0, eps = randn(2, 8, seed=1), randn(2, 8, seed=2)
    t = torch.tensor([3, 9])
    raw = x0 + (t.float() / 10)[:, None] * (eps - x0)
    assert torch.allclose(s.add_noise(x0, eps, t), raw.clamp(-0.5, 0.5), atol=1e-6)
    assert torch.allclose(s.step(eps, 2, x0), (x0 - eps / 10).clamp(-0.5, 0.5), atol=1e-6)


# ----------------------------------------------------------------------------- randomness

def test_randn_like_draws_each_row_from_its_generator():
    x = torch.empty(3, 2, 5)
    out = randn_like(x, [gen(5), gen(6), gen(7)])
    for i, seed in enumerate([5, 6, 7]):
        assert torch.equal(out[i], torch.randn(2, 5, generator=gen(seed)))
    assert torch.equal(randn_like(x, gen(5)), torch.randn(3, 2, 5, generator=gen(5)))  # one generator: one draw
    with pytest.raises(ValueError):
        randn_like(x, [gen(5), gen(6)])


# ----------------------------------------------------------------------------- diffusers DDPM (§10.3, B10)

def test_diffusers_ddpm_ignores_the_config_betas():
    from diffusers import DDPMScheduler

    params = NoiseSchedulerParams(num_timesteps=100, beta_start=1e-3, beta_end=0.05, clamp_range=None)
    s = DiffusersDDPM(params)
    x0, eps = randn(3, 3, 4, 4, seed=1), randn(3, 3, 4, 4, seed=2)
    t = torch.tensor([0, 50, 99])
    reference = DDPMScheduler(num_train_timesteps=100)  # diffusers defaults: linear 1e-4 … 0.02
    assert torch.allclose(s.add_noise(x0, eps, t), reference.add_noise(x0, eps, t), atol=1e-6)
    custom = NoiseSchedulerDDPM(params)  # honours beta_start/beta_end: a different schedule
    assert not torch.allclose(s.add_noise(x0, eps, t), custom.add_noise(x0, eps, t), atol=1e-3)


def test_diffusers_ddpm_clamp():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError):
        DiffusersDDPM(NoiseSchedulerParams(num_timesteps=10, clamp_range=(-1.0, 2.0)))
    s = DiffusersDDPM(NoiseSchedulerParams(num_timesteps=10, clamp_range=(-1.0, 1.0)))
    x0, eps = 3 * randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    t = torch.tensor([2, 8])
    assert torch.allclose(s.add_noise(x0, eps, t), DDPMScheduler(num_train_timesteps=10).add_noise(x0, eps, t)
                          .clamp(-1, 1), atol=1e-6)
    with pytest.raises(ValueError):  # diffusers draws its own z
        s.step(eps, 5, x0, noise=eps)
    out = s.step(eps, 5, x0, generator=gen(0))
    assert out.abs().max() <= 1 and torch.equal(out, s.step(eps, 5, x0, generator=gen(0)))


def test_fast_scheduler_uses_the_trained_noise_levels(ddpm):
    """The fast sampler's alphas_cumprod is the loaded table (what the model trained with), to float32 precision."""
    s = fast_scheduler("ddim", ddpm)
    assert torch.allclose(s.alphas_cumprod.float(), ddpm.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.betas.float(), ddpm.betas, rtol=1e-2)
    with pytest.raises(ValueError, match="choose one of ddim, dpmsolver\\+\\+, euler, unipc"):
        fast_scheduler("plms", ddpm)
    with pytest.raises(ValueError, match="'flow_euler' and 'heun' sample flow-matching models"):
        fast_scheduler("heun", ddpm)
    flow = FlowMatchingScheduler(NoiseSchedulerParams(num_timesteps=10))
    with pytest.raises(ValueError, match="'ddim' and 'euler' sample ε-prediction"):
        fast_scheduler("ddim", flow)


def test_flow_samplers_are_new_instances_on_one_sigma_grid():
    """Each call builds its own scheduler (diffusers' keep step state); the model is called at σ·T."""
    flow = FlowMatchingScheduler(NoiseSchedulerParams(num_timesteps=10))
    for name in FLOW_SCHEDULERS:
        a, b = fast_scheduler(name, flow), fast_scheduler(name, flow)
        assert a is not b and a.config.num_train_timesteps == FLOW_SIGMA_RESOLUTION
        a.set_timesteps(5)
        t = model_timesteps(a, flow)
        assert len(t) == len(a.timesteps) and 9.9 < t[0] <= 10 and all(x > y for x, y in zip(t, t[1:]) if x != y)
        assert a.sigmas[-1] == 0  # every flow sampler ends at σ = 0
