"""``stable_diffusion`` (format spec §10–§11): the conformance fixture, fast-scheduler parity with diffusers,
per-image seeds, text conditioning, bf16, the denoising loss and the image pipeline."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_foundry import load_model
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.batch_handlers import DenoisingBatchHandler
from vla_foundry.schedulers import FAST_SCHEDULERS, FLOW_SCHEDULERS, fast_scheduler
from tests.factories import tiny_model, tiny_stable_diffusion_params

ATOL = 1e-5
PROMPT = "a red block"


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_fixture(fixtures_dir):
    return fixtures_dir / "stable_diffusion_basic"


@pytest.fixture(scope="module")
def model(sd_fixture):
    """The fixture's unconditional model (T = 10, clamp ±1.5)."""
    return load_model(sd_fixture)


@pytest.fixture(scope="module")
def text_model(tiny_checkpoints):
    """A tiny text-conditioned model (CLIP text tower, 32 hidden, at most 32 tokens)."""
    return load_model(tiny_checkpoints["stable_diffusion"])


@pytest.fixture(scope="module")
def flow_model():
    return tiny_model(tiny_stable_diffusion_params(use_flow_matching_scheduler=True))


def expected(sd_fixture, case):
    return load_file(sd_fixture / "expected" / f"{case}.safetensors")


# ----------------------------------------------------------------------------- conformance fixture

def test_fixture_cases_listed(sd_fixture):
    cases = json.loads((sd_fixture / "expected" / "cases.json").read_text())
    assert {"unet_forward", "scheduler_add_noise", "scheduler_step_t0", "scheduler_step_t5", "scheduler_step_t9",
            "generate"} <= set(cases)
    assert cases["generate"]["num_unet_calls"] == 9  # T − 1 steps (B13)


def test_fixture_unet_forward(model, sd_fixture):
    e = expected(sd_fixture, "unet_forward")
    with torch.no_grad():
        out = model.unet(e["input.x_t"], e["input.timesteps"])
    assert torch.allclose(out, e["output.unet_output"], atol=ATOL)


def test_fixture_scheduler_add_noise(model, sd_fixture):
    e = expected(sd_fixture, "scheduler_add_noise")
    out = model.scheduler.add_noise(e["input.x0"], e["input.noise"], e["input.timesteps"])
    assert torch.allclose(out, e["output.x_t"], atol=ATOL)


@pytest.mark.parametrize("t", [0, 5, 9])
def test_fixture_scheduler_step(model, sd_fixture, t):
    e = expected(sd_fixture, f"scheduler_step_t{t}")
    step_noise = e.get("input.step_noise")
    assert (step_noise is None) == (t == 0)
    out = model.scheduler.step(e["input.model_output"], t, e["input.sample"], noise=step_noise)
    assert torch.allclose(out, e["output.prev_sample"], atol=ATOL)


def test_fixture_generate_with_recorded_noise(model, sd_fixture):
    e = expected(sd_fixture, "generate")
    out = model.generate(2, "cpu", initial_noise=e["input.initial_noise"], step_noises=e["input.step_noises"])
    assert torch.allclose(out.sample, e["output.final_sample"], atol=ATOL)
    assert out.images.dtype == torch.uint8 and torch.equal(out.images, e["output.images_uint8"])


def test_fixture_generate_global_rng(model, sd_fixture):
    """The reference call (global RNG, initial randn then one draw per DDPM step) is reproduced exactly."""
    e = expected(sd_fixture, "generate")
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = model.generate(batch_size=2, device="cpu")
    assert torch.equal(out.images, e["output.images_uint8"])
    assert torch.allclose(out.sample, e["output.final_sample"], atol=ATOL)


# ----------------------------------------------------------------------------- fast schedulers vs diffusers

def by_hand(model, name, x, steps, seeds, prompt=None, guidance_scale=None):
    """The standard diffusers loop over ``model.unet``, with classifier-free guidance when asked. A flow
    model is called at σ·T for each step's σ (its trained timestep for that noise level)."""
    sampler = fast_scheduler(name, model.scheduler)
    sampler.set_timesteps(steps)
    flow = model.is_flow_matching
    generators = gens(*seeds)
    context = None
    if prompt is not None:
        B = x.shape[0]
        context = torch.cat([model.encode_text([""] * B), model.encode_text([prompt] * B)])
    if not flow:
        x = x * sampler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            x_in = x if flow else sampler.scale_model_input(x, t)
            model_t = torch.tensor(sampler.sigmas[i].item() * model.num_timesteps) if flow else t
            if context is None:
                out = model.unet(x_in, model_t)
            else:
                out_u, out_c = model.unet(torch.cat([x_in, x_in]), model_t, context).chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            stochastic = {} if name == "unipc" else {"generator": generators}  # UniPC's step takes none
            x = sampler.step(out, t, x, **stochastic).prev_sample
    return x


@pytest.mark.parametrize("name", FAST_SCHEDULERS)
def test_fast_scheduler_matches_diffusers_unconditional(model, name):
    x = noise(2, 3, 16, 16, seed=11)
    out = model.generate(2, scheduler=name, num_inference_steps=6, initial_noise=x, generator=gens(1, 2))
    assert torch.allclose(out.sample, by_hand(model, name, x, 6, [1, 2]), atol=1e-6)


@pytest.mark.parametrize("name", FAST_SCHEDULERS)
def test_fast_scheduler_matches_diffusers_with_guidance(text_model, name):
    x = noise(2, 3, 16, 16, seed=12)
    out = text_model.generate(2, prompt=PROMPT, guidance_scale=3.0, scheduler=name, num_inference_steps=6,
                              initial_noise=x, generator=gens(1, 2))
    reference = by_hand(text_model, name, x, 6, [1, 2], prompt=PROMPT, guidance_scale=3.0)
    assert torch.allclose(out.sample, reference, atol=1e-6)


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_flow_schedulers_match_diffusers(flow_model, name):
    assert flow_model.default_scheduler == "dpmsolver++" and name in flow_model.schedulers
    x = noise(2, 3, 16, 16, seed=13)
    out = flow_model.generate(2, scheduler=name, num_inference_steps=4, initial_noise=x, generator=gens(1, 2))
    assert torch.allclose(out.sample, by_hand(flow_model, name, x, 4, [1, 2]), atol=1e-5)


def test_higher_order_flow_samplers_come_closer_to_the_ode_solution(flow_model):
    """From the same noise, each sampler's 10-step image against a 1000-step Euler solution: DPM-Solver++,
    UniPC and Heun (second order) must beat Euler's first order at the same step count, and every sampler
    must come closer with more steps. (The README's table measures the trained demo model.)"""
    x = noise(4, 3, 16, 16, seed=15)
    reference = flow_model.generate(4, scheduler="flow_euler", num_inference_steps=1000, initial_noise=x).sample

    def distance(name: str, steps: int) -> float:
        out = flow_model.generate(4, scheduler=name, num_inference_steps=steps, initial_noise=x).sample
        return (out - reference).pow(2).mean().sqrt().item()

    distances = {(name, steps): distance(name, steps) for name in FLOW_SCHEDULERS for steps in (5, 10, 20)}
    for name in ("dpmsolver++", "unipc", "heun"):
        assert distances[name, 10] < distances["flow_euler", 10] / 2, distances
    for name in FLOW_SCHEDULERS:
        assert distances[name, 5] > distances[name, 10] > distances[name, 20], distances


def test_flow_training_scheduler_is_euler_over_all_steps(flow_model):
    x = noise(1, 3, 16, 16, seed=14)
    out = flow_model.generate(1, initial_noise=x)
    with torch.no_grad():
        for t in range(9, 0, -1):
            x = (x - flow_model.unet(x, t) / 10).clamp(-1.5, 1.5)
    assert torch.allclose(out.sample, x, atol=1e-6)


# ----------------------------------------------------------------------------- per-image generators

@pytest.mark.parametrize("scheduler", ["training", "dpmsolver++"])
def test_images_depend_on_their_own_seed_only(model, scheduler):
    steps = None if scheduler == "training" else 6
    batch = model.generate(3, scheduler=scheduler, num_inference_steps=steps, generator=gens(5, 6, 7))
    for i, seed in enumerate([5, 6, 7]):
        alone = model.generate(1, scheduler=scheduler, num_inference_steps=steps, generator=gens(seed))
        assert torch.equal(batch.images[i], alone.images[0]), seed
    assert not torch.equal(batch.images[0], batch.images[1])


# ----------------------------------------------------------------------------- text conditioning

def text_sample(text_model, **kwargs):
    kwargs.setdefault("scheduler", "dpmsolver++")
    kwargs.setdefault("num_inference_steps", 4)
    return text_model.generate(2, generator=gens(0, 1), **kwargs)


def test_prompts_condition_the_images(text_model):
    a = text_sample(text_model, prompt="a red block")
    b = text_sample(text_model, prompt="the quick brown fox")
    assert not torch.allclose(a.sample, b.sample, atol=1e-3)
    assert not torch.allclose(a.sample, text_sample(text_model).sample, atol=1e-3)  # no prompt: unconditional pass


def test_guidance_scale_one_equals_no_guidance(text_model):
    plain = text_sample(text_model, prompt=PROMPT)
    guided = text_sample(text_model, prompt=PROMPT, guidance_scale=1.0)
    assert torch.allclose(plain.sample, guided.sample, atol=1e-5)


def test_negative_prompt_acts_under_guidance(text_model):
    empty = text_sample(text_model, prompt=PROMPT, guidance_scale=4.0)
    negative = text_sample(text_model, prompt=PROMPT, guidance_scale=4.0, uncond_prompt="the quick brown fox")
    assert not torch.allclose(empty.sample, negative.sample, atol=1e-3)
    unguided = text_sample(text_model, prompt=PROMPT)
    assert not torch.allclose(empty.sample, unguided.sample, atol=1e-3)


def test_unconditional_model_refuses_a_prompt(model):
    with pytest.raises(ValueError):
        model.generate(1, prompt=PROMPT, generator=gens(0))


def test_training_scheduler_runs_all_steps(model):
    with pytest.raises(ValueError):
        model.generate(1, scheduler="training", num_inference_steps=5, generator=gens(0))
    a = model.generate(1, scheduler="training", num_inference_steps=9, generator=gens(0))
    assert torch.equal(a.images, model.generate(1, generator=gens(0)).images)


def test_unknown_scheduler(model, flow_model):
    with pytest.raises(ValueError):
        model.generate(1, scheduler="plms", num_inference_steps=4, generator=gens(0))
    with pytest.raises(ValueError):  # ε-prediction samplers do not apply to flow matching
        flow_model.generate(1, scheduler="ddim", num_inference_steps=4, generator=gens(0))
    with pytest.raises(ValueError):
        model.generate(1, scheduler="flow_euler", num_inference_steps=4, generator=gens(0))


def test_over_long_prompt(text_model):
    long = " ".join(["the quick brown fox"] * 20)  # far more than the 32 tokens the tiny CLIP takes
    with pytest.raises(InvalidInputError) as info:
        text_model.generate(1, prompt=long, generator=gens(0))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidInputError) as info:
        text_model.generate(1, prompt=PROMPT, uncond_prompt=long, guidance_scale=2.0, generator=gens(0))
    assert info.value.field == "negative_prompt"


# ----------------------------------------------------------------------------- bf16

def test_bf16_generates_with_float32_tables(tiny_checkpoints, text_model):
    bf16 = load_model(tiny_checkpoints["stable_diffusion"], dtype="bfloat16")
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    for name, table in bf16.scheduler.named_buffers():
        assert table.dtype == torch.float32, name
        assert torch.equal(table, getattr(text_model.scheduler, name)), name
    assert bf16.scheduler.betas.dtype == torch.float32
    out = bf16.generate(2, prompt=PROMPT, guidance_scale=2.0, generator=gens(0, 1))
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == torch.uint8
    assert out.sample.dtype == torch.float32 and torch.isfinite(out.sample).all()  # (the sample stays float32)


def test_a_bf16_unets_sampler_keeps_every_step_of_its_float32_sample(tmp_path):
    """The training sampler of a flow model of T = 1000 moves the sample by v/T a step: the sample was kept in the
    UNet's bfloat16, whose rounding near 1 (2^-7) swallowed each step, and the image was barely denoised. A UNet
    that predicts a constant velocity shows the steps that remain: all of them, as in float32."""
    from vla_foundry.checkpoint import save_experiment
    from vla_foundry.params.diffusion import NoiseSchedulerParams, UNetParams

    params = tiny_stable_diffusion_params(unet=UNetParams(channels=[8, 16], time_emb_dim=16, text_emb_dim=0,
                                                          image_size=8),
                                          use_flow_matching_scheduler=True,
                                          noise_scheduler=NoiseSchedulerParams(num_timesteps=1000, clamp_range=None))
    save_experiment(tiny_model(params), tmp_path / "flow")
    model = load_model(tmp_path / "flow", dtype="bfloat16")

    class ConstantVelocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.bfloat16))

        def forward(self, x, t, context=None):
            assert x.dtype == torch.bfloat16  # the UNet still runs in its own dtype
            return torch.full_like(x, 0.5) + self.weight

    model.unet = ConstantVelocity()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1.0
    out = model.generate(1, initial_noise=x).sample
    error = (out - (x - 0.5 * 999 / 1000)).abs().max()
    assert error < 1e-3, error  # (float32's own rounding over 999 steps; bfloat16's lost about 0.5)


# ----------------------------------------------------------------------------- denoising loss

def hand_loss(model, x0, seed, input_ids=None, attention_mask=None):
    """The training forward's loss (VLA Foundry's: the text tower takes the tokenizer's attention mask)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, model.num_timesteps, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = model.scheduler.add_noise(x0, eps, t)
    context = None if input_ids is None else \
        model.clip.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    with torch.no_grad():
        prediction = model.unet(x_t, t, context)
    target = eps - x0 if model.is_flow_matching else eps
    return ((prediction - target) ** 2).mean(), t


@pytest.mark.parametrize("which", ["model", "text_model", "flow_model"])
def test_denoising_loss(request, which):
    m = request.getfixturevalue(which)
    handler = DenoisingBatchHandler()
    x0 = noise(3, 3, 16, 16, seed=20).clamp(-1, 1)
    batch = {"pixel_values": x0}
    ids = mask = None
    if m.has_text:
        ids, mask = m.clip.tokenize(["a red block", "a blue square", "the fox"], 16, with_mask=True)
        batch.update(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        first = handler.compute_loss(m, batch, generator=torch.Generator().manual_seed(9))
        second = handler.compute_loss(m, batch, generator=torch.Generator().manual_seed(9))
        other = handler.compute_loss(m, batch, generator=torch.Generator().manual_seed(10))
        expected_loss, t = hand_loss(m, x0, 9, ids, mask)
    assert first.loss.item() == second.loss.item() and first.loss.item() != other.loss.item()
    assert first.metrics["timesteps"] == t.tolist() and first.num_samples == 3
    assert torch.allclose(first.loss, expected_loss, rtol=1e-5, atol=1e-7)


def test_an_evaluation_gives_the_text_tower_its_attention_mask_as_training_does(text_model):
    """The pipeline's evaluate scored captions without the tokenizer's mask, which VLA Foundry's training forward
    gives the text tower (its padding's hidden states, which the UNet attends to, then differ): not the loss trained."""
    from vla_foundry.pipelines.image import ImagePipeline

    pipeline = ImagePipeline(text_model)
    images = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(2)]
    texts = ["a red block", "the quick brown fox"]
    x0 = torch.stack([pipeline.pixels(im) for im in images])
    ids, mask = text_model.clip.tokenize(texts, pipeline.max_text_seq_len, with_mask=True)
    assert not bool(mask.all())  # (padding there is)
    with torch.no_grad():
        trained, _ = hand_loss(text_model, x0, 4, ids, mask)
        unmasked, _ = hand_loss(text_model, x0, 4, ids)
    served = pipeline.evaluate(images, texts, seed=4)["loss"]
    assert served == pytest.approx(trained.item(), rel=1e-5) and served != pytest.approx(unmasked.item(), rel=1e-5)


# ----------------------------------------------------------------------------- image pipeline

@pytest.fixture(scope="module")
def pipeline(tiny_checkpoints):
    from vla_foundry.pipelines import load_pipeline

    return load_pipeline(tiny_checkpoints["stable_diffusion"])


def test_pipeline_seeds(pipeline):
    a = pipeline.generate(prompt=PROMPT, num_images=2, seed=3)
    b = pipeline.generate(prompt=PROMPT, num_images=2, seed=3)
    assert a.seeds == [3, 4] and b.seeds == [3, 4]
    assert len(a.images) == 2 and a.images[0].shape == (16, 16, 3) and a.images[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    c = pipeline.generate(prompt=PROMPT, num_images=2, seed=4)
    assert c.seeds == [4, 5]
    assert np.array_equal(a.images[1], c.images[0])
    assert not np.array_equal(a.images[0], a.images[1])


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt=" ".join(["the quick brown fox"] * 20)), "prompt"),
    (dict(prompt=PROMPT, guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt=PROMPT, scheduler="plms"), "scheduler"),
    (dict(prompt=PROMPT, scheduler="dpmsolver++", num_inference_steps=11), "num_inference_steps"),
    (dict(prompt=PROMPT, scheduler="dpmsolver++", num_inference_steps=-1), "num_inference_steps"),
    (dict(prompt=PROMPT, scheduler="training", num_inference_steps=5), "num_inference_steps"),
])
def test_pipeline_validation(pipeline, kwargs, field):
    with pytest.raises(InvalidInputError) as info:
        pipeline.generate(num_images=1, seed=0, **kwargs)
    assert info.value.field == field


