"""``diffusion_policy`` (format spec §8–§10): the conformance fixture, past rows, seeds, the DDPM reverse process
(the B1 fix), the velocity loss, the ``vit_backbone`` and ``openclip_backbone`` policies, bad configs and strict
loading."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_foundry.checkpoint import load_model, load_state_dict_strict, read_checkpoint_file, state_dict_from_payload
from vla_foundry.errors import CheckpointError
from vla_foundry.models.backbones import create_backbone, list_backbones
from vla_foundry.models.batch_handlers import PolicyBatchHandler
from vla_foundry.models.diffusion_policy import DiffusionPolicy
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.params import parse_params
from vla_foundry.params.clip import OpenClipBackboneParams, ViTBackboneParams
from vla_foundry.params.diffusion import NoiseSchedulerParams
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.action import ActionPipeline
from vla_foundry.robotics.experiment import normalizer_block
from vla_foundry.robotics.normalizer import NormalizerConfig, RoboticsNormalizer
from vla_foundry.robotics.observations import RawObservation, split_actions
from vla_foundry.robotics.robot_io import RobotIO
from tests.factories import (POLICY_ACTIONS, POLICY_PROPRIO, TINY_OPENCLIP, save_tiny_policy, tiny_model,
                             tiny_policy_io, tiny_policy_params, tiny_policy_stats)

ATOL = 1e-5
GENERATE_CASES = ["generate_actions_steps10", "generate_actions_steps7"]
FIXTURE_SEEDS = {"generate_actions_steps10": 2034, "generate_actions_steps7": 2031}  # from cases.json "call"
TINY_VIT = dict(img_size=32, patch_size=8, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=2)


@pytest.fixture(scope="module")
def model(policy_fixture, cases):
    """The fixture's CLIP-backbone flow-matching policy (T = 100, clamp ±3), loaded once."""
    weights = {c["weights"] for c in cases.values() if "weights" in c}
    assert weights == {"checkpoints/checkpoint_2.pt"}  # every model case was recorded with checkpoint 2
    return load_model(policy_fixture, checkpoint=2)


@pytest.fixture(scope="module")
def fixture_io(policy_fixture):
    normalizer = RoboticsNormalizer.from_experiment(policy_fixture)
    return RobotIO.from_experiment(policy_fixture, normalizer.stats), normalizer


@pytest.fixture(scope="module")
def vit_policy():
    """A tiny flow-matching policy on a 32 px ViT (4 cameras-frames × 16 patches of width 32), T = 10."""
    return tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT)))


def expected(policy_fixture, case):
    return load_file(policy_fixture / "expected" / f"{case}.safetensors")


def generate_kwargs(e, steps):
    """The recorded reference call's arguments (spec §9.4 order)."""
    return dict(input_ids=e["input.input_ids"], pixel_values=e["input.pixel_values"], actions=e["input.actions"],
                attention_mask=e["input.attention_mask"], attention_mask_images=e["input.attention_mask_images"],
                num_inference_steps=steps, past_mask=e["input.past_mask"], proprioception=e["input.proprioception"])


def training_batch(e):
    """The denoiser_forward inputs as a batch-handler batch."""
    return {k: e[f"input.{k}"] for k in ("input_ids", "attention_mask", "pixel_values", "attention_mask_images",
                                         "actions", "past_mask", "future_mask", "proprioception")}


def vit_batch(B=2, seed=0):
    """A synthetic batch for the tiny ViT policy: 4 frames per sample, Ta = 4 with the first row past."""
    g = torch.Generator().manual_seed(seed)
    past_mask = torch.zeros(B, 4, dtype=torch.bool)
    past_mask[:, 0] = True
    return {"input_ids": torch.zeros(B, 1, dtype=torch.long), "attention_mask": torch.ones(B, 1, dtype=torch.long),
            "pixel_values": torch.randn(B * 4, 3, 32, 32, generator=g),
            "attention_mask_images": torch.ones(B, 4, dtype=torch.bool),
            "actions": torch.rand(B, 4, 3, generator=g) * 2 - 1, "past_mask": past_mask,
            "proprioception": torch.randn(B, 2, 2, generator=g)}


def observation(io, seed=0, instruction="go", size=(24, 40)):
    rng = np.random.default_rng(seed)
    return RawObservation({n: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for n in io.image_names},
                          {f: rng.normal(size=(io.past_steps + 1, d)).astype(np.float32)
                           for f, d in POLICY_PROPRIO.items()}, instruction)


def action_window(seed=0):
    rng = np.random.default_rng(seed)
    return {f: rng.uniform(-1, 3, (4, d)).astype(np.float32) for f, d in POLICY_ACTIONS.items()}


def in_memory_pipeline(policy, processor, **options):
    """An ActionPipeline over an unsaved model, with the tiny policy's robot I/O and statistics."""
    io = tiny_policy_io(processor)
    normalizer = RoboticsNormalizer(tiny_policy_stats(), NormalizerConfig.from_dict(
        normalizer_block(list(POLICY_PROPRIO) + list(POLICY_ACTIONS), past=1, future=2)))
    backbone = policy.vision_language_backbone
    return ActionPipeline(policy, io, normalizer, backbone.input_processor(processor, io.image_size), **options)


# ----------------------------------------------------------------------------- conformance fixture

def test_fixture_denoiser_forward(model, policy_fixture, cases):
    e = expected(policy_fixture, "denoiser_forward")
    assert cases["denoiser_forward"]["num_action_head_repeats"] == 1
    with torch.no_grad():
        out = model(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                    e["input.attention_mask_images"], e["input.actions"], e["input.noise"], e["input.past_mask"],
                    e["input.future_mask"], e["input.proprioception"], timesteps=e["input.timesteps"])
        tokens = model.encode_observation(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                                          e["input.attention_mask_images"])
    assert torch.allclose(tokens, e["debug.backbone_embeddings"], atol=ATOL)
    assert torch.allclose(out.noisy_actions, e["input.noisy_actions"], atol=ATOL)
    assert out.velocity.shape == e["output.velocity"].shape
    assert torch.allclose(out.velocity, e["output.velocity"], atol=ATOL)
    assert torch.equal(out.timesteps, e["input.timesteps"])
    # Past rows enter clean, and the target is the velocity ε − x0.
    past = e["input.past_mask"]
    assert torch.equal(out.noisy_actions[past], e["input.actions"][past])
    assert torch.equal(out.target, e["input.noise"] - e["input.actions"])


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_fixture_timesteps_visited(model, cases, case):
    c = cases[case]
    visited = model.timesteps_visited(c["num_inference_steps"])
    assert visited == c["timesteps_visited"]
    assert visited[0] - visited[1] == c["step_size"]
    if case.endswith("steps7"):  # 7 does not divide 100: 8 steps run (B12)
        assert len(visited) == 8


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_fixture_generate_actions_with_recorded_noise(model, policy_fixture, cases, case):
    e = expected(policy_fixture, case)
    out = model.generate_actions(**generate_kwargs(e, cases[case]["num_inference_steps"]),
                                 initial_noise=e["input.initial_noise"])
    assert out.shape == e["output.actions"].shape
    assert torch.allclose(out, e["output.actions"], atol=ATOL)


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_fixture_every_sampling_step(model, policy_fixture, cases, case):
    """Each recorded step input gives the recorded velocity, and one flow-matching step of it gives the next input
    (the last one the output), so a mismatch would be localised to a step."""
    e = expected(policy_fixture, case)
    c = cases[case]
    visited, step_size = c["timesteps_visited"], c["step_size"]
    inputs, velocities = e["debug.step_inputs"], e["debug.step_velocities"]
    assert inputs.shape[0] == velocities.shape[0] == len(visited)
    keep = e["input.past_mask"][..., None].float()
    past = e["input.actions"] * keep
    assert torch.allclose(inputs[0], past + e["input.initial_noise"] * (1 - keep), atol=ATOL)
    with torch.no_grad():
        tokens = model.encode_observation(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                                          e["input.attention_mask_images"])
        for i, t in enumerate(visited):
            t_batch = torch.full((inputs.shape[1],), t, dtype=torch.long)
            velocity = model.denoise(tokens, t_batch, inputs[i], e["input.proprioception"])
            assert torch.allclose(velocity, velocities[i], atol=ATOL), f"step {i} (t={t})"
            x_next = past + model.scheduler.step(velocities[i], t, inputs[i], step_size) * (1 - keep)
            target = inputs[i + 1] if i + 1 < len(visited) else e["output.actions"]
            assert torch.allclose(x_next, target, atol=ATOL), f"step {i} (t={t})"


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_fixture_denormalized_actions(policy_fixture, fixture_io, cases, case):
    io, normalizer = fixture_io
    e = expected(policy_fixture, case)
    per_field = split_actions(e["output.actions"], io, normalizer)
    fields = sorted(k[len("output.denormalized."):] for k in e if k.startswith("output.denormalized."))
    assert sorted(per_field) == fields
    for name in fields:
        assert torch.allclose(per_field[name], e[f"output.denormalized.{name}"], atol=ATOL)
    # split_actions is the normalizer with anchor P, field by field in action_fields order.
    first = io.action_fields[0]
    assert torch.equal(per_field[first], normalizer.denormalize(e["output.actions"][..., :io.field_dims[first]],
                                                                first, anchor_timestep=io.past_steps))


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_fixture_global_rng_call_is_reproduced(model, policy_fixture, cases, case):
    """The reference drew its noise with randn_like from the global RNG after ``torch.manual_seed``; without
    ``initial_noise`` or a generator the same draw is made."""
    e = expected(policy_fixture, case)
    with torch.random.fork_rng():
        torch.manual_seed(FIXTURE_SEEDS[case])
        out = model.generate_actions(**generate_kwargs(e, cases[case]["num_inference_steps"]))
    assert str(FIXTURE_SEEDS[case]) in cases[case]["call"]
    assert torch.allclose(out, e["output.actions"], atol=ATOL)


def test_non_positive_step_count_is_refused(model):
    with pytest.raises(ValueError, match="num_inference_steps"):
        model.timesteps_visited(-1)


# ----------------------------------------------------------------------------- past rows and seeds

def test_past_rows_are_the_given_actions_exactly(model, policy_fixture):
    e = expected(policy_fixture, "generate_actions_steps10")
    # Past values outside the clamp range (±3) show they are copied, never clamped or stepped.
    actions = torch.randn(e["input.actions"].shape, generator=torch.Generator().manual_seed(3)) * 4
    past_mask = torch.zeros(actions.shape[:2], dtype=torch.bool)
    past_mask[0, :3] = True
    past_mask[1, 0] = True
    kwargs = {**generate_kwargs(e, 5), "actions": actions, "past_mask": past_mask}
    out = model.generate_actions(**kwargs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[past_mask], actions[past_mask])
    assert not torch.allclose(out[~past_mask], actions[~past_mask])
    assert out[~past_mask].abs().max() <= 3.0  # generated rows are clamped


def test_same_seed_same_actions_different_seed_different(model, policy_fixture):
    e = expected(policy_fixture, "generate_actions_steps10")
    kwargs = generate_kwargs(e, 5)
    state = torch.get_rng_state()
    a = model.generate_actions(**kwargs, generator=torch.Generator().manual_seed(11))
    b = model.generate_actions(**kwargs, generator=torch.Generator().manual_seed(11))
    c = model.generate_actions(**kwargs, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone
    assert torch.equal(a, b)
    future = ~e["input.past_mask"]
    assert not torch.allclose(a[future], c[future])


# ----------------------------------------------------------------------------- DDPM-scheduled policies (B1 fix)

def ddpm_policy_with_oracle(monkeypatch, x0):
    """A DDPM policy (T = 1000, no clamp) whose denoiser returns the exact velocity ε − x0 for the current x_t,
    found by inverting x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. Its sampler must then land on x0."""
    policy = tiny_model(tiny_policy_params(
        ViTBackboneParams(**TINY_VIT), use_flow_matching_scheduler=False,
        noise_scheduler=NoiseSchedulerParams(num_timesteps=1000, clamp_range=None)))
    ac = policy.scheduler.alphas_cumprod

    def oracle(condition, timesteps, noisy_actions, proprioception=None):
        a = ac[timesteps].sqrt().view(-1, 1, 1)
        b = (1 - ac[timesteps]).sqrt().view(-1, 1, 1)
        return (noisy_actions - a * x0) / b - x0

    monkeypatch.setattr(policy, "denoise", oracle)
    return policy


def clean_actions(B=2):
    return torch.rand(B, 4, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1


def sample(policy, steps, seed=0):
    batch = vit_batch()
    return policy.generate_actions(batch["input_ids"], batch["pixel_values"], torch.zeros(2, 4, 3),
                                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [10, 7, 1])
def test_ddpm_strided_sampling_with_an_oracle_recovers_x0(monkeypatch, steps):
    """Fewer steps than T take deterministic DDIM updates; with the exact velocity they land on x0."""
    x0 = clean_actions()
    policy = ddpm_policy_with_oracle(monkeypatch, x0)
    assert policy.timesteps_visited(steps)[-1] > 1  # the last step jumps straight to the clean sample
    out = sample(policy, steps)
    assert torch.allclose(out, x0, atol=1e-5)
    assert torch.allclose(out, sample(policy, steps, seed=1), atol=1e-5)  # any start: no posterior noise


@pytest.mark.parametrize("steps", [None, 500])
def test_ddpm_consecutive_steps_with_an_oracle_recover_x0(monkeypatch, steps):
    """Consecutive steps are the model's DDPM posterior steps (noise from the generator); the loop never visits
    t = 0 (§9.4), so its last step, from t = 1, lands on the clean estimate, which the oracle makes exact."""
    x0 = clean_actions()
    policy = ddpm_policy_with_oracle(monkeypatch, x0)
    assert len(policy.timesteps_visited(None)) == 999
    assert policy.timesteps_visited(None)[-2:] == [2, 1] and policy.timesteps_visited(500)[-2:] == [3, 1]
    draws = []
    step = policy.scheduler.step
    monkeypatch.setattr(policy.scheduler, "step", lambda *a, **k: draws.append(k["generator"]) or step(*a, **k))
    assert torch.allclose(sample(policy, steps, seed=0), x0, atol=1e-4)
    assert torch.allclose(sample(policy, steps, seed=1), x0, atol=1e-4)
    if steps is None:  # 998 posterior steps, their noise from the request's generator (S = 500 strides by 2)
        assert len(draws) == 2 * 998 and all(isinstance(g, torch.Generator) for g in draws)


# ----------------------------------------------------------------------------- the velocity loss

def test_policy_batch_handler_is_registered():
    assert isinstance(create_batch_handler("diffusion_policy"), PolicyBatchHandler)


def test_loss_equals_masked_velocity_mse_by_hand(model, policy_fixture):
    e = expected(policy_fixture, "denoiser_forward")
    batch = training_batch(e)
    batch.pop("future_mask")  # default: every row that is not past
    with torch.no_grad():
        out = PolicyBatchHandler().compute_loss(model, batch, generator=torch.Generator().manual_seed(5))

        g = torch.Generator().manual_seed(5)
        x0 = e["input.actions"]
        noise = torch.randn(x0.shape, generator=g)  # the noise first …
        t = torch.randint(0, model.num_timesteps, (x0.shape[0],), generator=g)  # … then the timesteps
        future = ~e["input.past_mask"]
        s = (t.float() / model.num_timesteps).view(-1, 1, 1)
        x_t = torch.where(future[..., None], (x0 + s * (noise - x0)).clamp(-3, 3), x0)  # flow matching, clamp ±3
        tokens = model.encode_observation(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                                          e["input.attention_mask_images"])
        velocity = model.denoise(tokens, t, x_t, e["input.proprioception"])
        error = (velocity - (noise - x0)) ** 2  # (B, Ta, A)
        by_hand = error[future].mean()
    assert out.metrics["timesteps"] == t.tolist()
    assert out.metrics["num_action_rows"] == int(future.sum()) == 15
    assert out.num_samples == 2
    assert torch.allclose(out.loss, by_hand, atol=1e-6)


def test_loss_uses_the_given_future_mask(model, policy_fixture):
    e = expected(policy_fixture, "denoiser_forward")
    batch = training_batch(e)
    only_last = torch.zeros_like(batch["future_mask"])
    only_last[:, -1] = True
    with torch.no_grad():
        out = PolicyBatchHandler().compute_loss(model, {**batch, "future_mask": only_last},
                                                generator=torch.Generator().manual_seed(5))
    assert out.metrics["num_action_rows"] == 2


def test_loss_same_seed_same_value_and_gradients_flow(vit_policy):
    handler = PolicyBatchHandler()
    batch = vit_batch()
    with torch.no_grad():
        a = handler.compute_loss(vit_policy, batch, generator=torch.Generator().manual_seed(3))
        b = handler.compute_loss(vit_policy, batch, generator=torch.Generator().manual_seed(3))
        c = handler.compute_loss(vit_policy, batch, generator=torch.Generator().manual_seed(4))
    assert a.loss.item() == b.loss.item() and a.metrics == b.metrics
    assert a.loss.item() != c.loss.item()

    vit_policy.zero_grad()
    loss = handler.compute_loss(vit_policy, batch, generator=torch.Generator().manual_seed(3)).loss
    assert loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    for name in ("output_layer.weight", "action_encode.weight", "condition_encode.weight", "time_encoding.weight",
                 "proprioception_encode.weight", "vision_language_backbone._model.patch_embedding.conv.weight",
                 "transformer.layers.0.attention.in_proj.weight"):
        param = dict(vit_policy.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The unused LM head and embeddings (§9.2) get no gradient.
    assert dict(vit_policy.named_parameters())["transformer.output.weight"].grad is None
    vit_policy.zero_grad()


def test_loss_refuses_a_batch_with_nothing_to_predict(vit_policy):
    from vla_foundry.errors import InvalidInputError

    batch = vit_batch()
    batch["past_mask"] = torch.ones_like(batch["past_mask"])
    with pytest.raises(InvalidInputError) as error:
        PolicyBatchHandler().compute_loss(vit_policy, batch)
    assert error.value.field == "actions"


# ----------------------------------------------------------------------------- vit_backbone

def test_vit_backbone_tokens_are_camera_major_patches(vit_policy):
    batch = vit_batch()
    pixels = batch["pixel_values"]  # (B·N, 3, 32, 32), N = 4
    backbone = vit_policy.vision_language_backbone
    assert backbone.output_dim == 32 and backbone.uses_language is False
    with torch.no_grad():
        tokens = vit_policy.encode_observation(batch["input_ids"], pixels)
        five_d = vit_policy.encode_observation(batch["input_ids"], pixels.view(2, 4, 3, 32, 32))
        per_image = backbone._model(pixels)  # (B·N, P, D)
    assert tokens.shape == (2, 4 * 16, 32)
    assert torch.equal(tokens, five_d)
    # Sample 1's camera-frame 2 occupies tokens 32…47 of row 1.
    assert torch.allclose(tokens[1, 32:48], per_image[4 + 2], atol=1e-6)
    with pytest.raises(ValueError, match="split evenly"):
        vit_policy.encode_observation(batch["input_ids"], pixels[:7])
    with pytest.raises(ValueError, match="input_ids"):
        vit_policy.encode_observation(None, pixels)


def test_vit_backbone_keys(vit_policy):
    keys = list(vit_policy.state_dict())
    backbone_keys = [k for k in keys if k.startswith("vision_language_backbone.")]
    assert backbone_keys and all(k.startswith("vision_language_backbone._model.") for k in backbone_keys)
    for key in ("patch_embedding.conv.weight", "patch_embedding.position_embedding", "blocks.1.attn.qkv_proj.weight",
                "blocks.0.mlp.fc2.bias", "layer_norm.weight"):
        assert f"vision_language_backbone._model.{key}" in keys
    assert vit_policy.state_dict()["vision_language_backbone._model.patch_embedding.position_embedding"].shape == \
        (1, 16, 32)


def test_vit_backbone_policy_saves_and_serves(vit_policy, tmp_path):
    save_tiny_policy(vit_policy, tmp_path / "vit-policy", processor="none")
    pipeline = load_pipeline(tmp_path / "vit-policy")
    for key, value in vit_policy.state_dict().items():
        assert torch.equal(pipeline.model.state_dict()[key], value), key
    io = pipeline.robot_io
    samples = [observation(io, 0, instruction=""), observation(io, 1, instruction="")]
    inputs = pipeline.prepare(samples)
    assert inputs.pixel_values.shape == (8, 3, 32, 32) and inputs.pixel_values.max() > 1  # raw 0…255 pixels
    out = pipeline.predict(samples, num_inference_steps=4, seed=0)
    assert out["action_chunk"].shape == (2, 4, 3) and out["normalized_actions"].shape == (2, 4, 3)
    assert {k: v.shape for k, v in out["actions"].items()} == {"arm__delta": (2, 4, 2), "gripper": (2, 4, 1)}
    assert np.isfinite(out["action_chunk"]).all()
    again = pipeline.predict(samples, num_inference_steps=4, seed=0)
    assert np.array_equal(out["action_chunk"], again["action_chunk"])


# ----------------------------------------------------------------------------- openclip_backbone

def openclip_policy(architecture):
    return tiny_model(tiny_policy_params(OpenClipBackboneParams(architecture=str(architecture))))


def train(policy, batch, steps, lr=1e-2):
    handler = PolicyBatchHandler()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    policy.train()
    losses = []
    for step in range(steps):
        loss = handler.compute_loss(policy, batch, generator=torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    policy.eval()
    return losses


def test_openclip_backbone_policy_trains_and_serves(tmp_path):
    experiment = tmp_path / "openclip-policy"
    experiment.mkdir()
    (experiment / "tiny-openclip.json").write_text(json.dumps(TINY_OPENCLIP))
    policy = openclip_policy(experiment / "tiny-openclip.json")
    backbone = policy.vision_language_backbone
    assert backbone.output_dim == TINY_OPENCLIP["embed_dim"] and backbone.uses_language
    assert all(k.startswith("vision_language_backbone._model.model.")
               for k in policy.state_dict() if k.startswith("vision_language_backbone."))

    pipeline = in_memory_pipeline(policy, "open_clip")
    # "<image>" is 3 open_clip tokens: 4 placeholders leave room for a 2-token instruction in a 16-token context.
    samples = [observation(pipeline.robot_io, s) for s in (0, 1)]
    batch = pipeline.loss_batch(samples, [action_window(0), action_window(1)])
    assert batch["input_ids"].shape == (2, 16) and batch["pixel_values"].shape == (8, 3, 32, 32)
    with torch.no_grad():
        tokens = policy.encode_observation(batch["input_ids"], batch["pixel_values"])
    assert tokens.shape == (2, 1 + 4, 32)
    assert torch.allclose(tokens[:, 1:].norm(dim=-1), torch.ones(2, 4), atol=1e-5)  # unit image embeddings

    before = {k: v.clone() for k, v in policy.state_dict().items()}
    losses = train(policy, batch, steps=3)
    assert all(np.isfinite(losses))
    after = policy.state_dict()
    for key in ("output_layer.weight", "vision_language_backbone._model.model.visual.conv1.weight",
                "vision_language_backbone._model.model.token_embedding.weight"):
        assert not torch.equal(before[key], after[key]), key

    # Saved with its architecture file named relative to the experiment, as a published experiment would be.
    policy.params = tiny_policy_params(OpenClipBackboneParams(architecture="tiny-openclip.json"))
    save_tiny_policy(policy, experiment, processor="open_clip")
    served = load_pipeline(experiment)
    assert served.model.params.vision_language_backbone.architecture == \
        str((experiment / "tiny-openclip.json").resolve())
    for key, value in after.items():
        assert torch.equal(served.model.state_dict()[key], value), key
    out = served.predict(samples, num_inference_steps=3, seed=2)
    assert out["action_chunk"].shape == (2, 4, 3) and np.isfinite(out["action_chunk"]).all()
    # The served policy computes what the trained one in memory does.
    expected_out = pipeline.predict(samples, num_inference_steps=3, seed=2)
    assert np.allclose(out["action_chunk"], expected_out["action_chunk"], atol=1e-5)


@pytest.mark.slow
def test_openclip_vit_b_32_policy_trains_one_step_and_serves():
    """Issue acceptance: a policy with the OpenCLIP ViT-B-32 backbone (random weights) trains and serves.
    Batch 1, one step, one prediction, to stay cheap on CPU (about 10 s)."""
    started = time.perf_counter()
    policy = openclip_policy("ViT-B-32")
    assert policy.vision_language_backbone.output_dim == 512
    pipeline = in_memory_pipeline(policy, "open_clip")
    samples = [observation(pipeline.robot_io, 0, instruction="pick up the red block")]
    batch = pipeline.loss_batch(samples, [action_window(0)])
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["input_ids"].shape == (1, 77)
    head_before = policy.output_layer.weight.detach().clone()
    losses = train(policy, batch, steps=1, lr=1e-4)
    assert np.isfinite(losses[0])
    assert not torch.equal(head_before, policy.output_layer.weight)
    out = pipeline.predict(samples, num_inference_steps=2, seed=0)
    assert out["action_chunk"].shape == (1, 4, 3) and np.isfinite(out["action_chunk"]).all()
    assert time.perf_counter() - started < 120  # a hang, not a slow machine, should fail this


# ----------------------------------------------------------------------------- bad configs

def test_unknown_backbone_type_names_the_allowed_ones():
    allowed = list_backbones()
    assert {"clip_backbone", "vit_backbone", "openclip_backbone"} <= set(allowed)
    assert {"vlm_backbone", "vlm_foundry_backbone"} <= set(allowed)  # spec §8.4: test_vlm_backbones.py
    with pytest.raises(ValueError) as error:
        create_backbone(ViTBackboneParams(type="resnet_backbone"))
    assert "'resnet_backbone'" in str(error.value) and all(name in str(error.value) for name in allowed)


def test_unknown_backbone_type_in_a_config_is_refused_at_parse_time():
    with pytest.raises(ValueError) as error:
        parse_params({"type": "diffusion_policy", "transformer": {},
                      "vision_language_backbone": {"type": "resnet_backbone"}})
    assert "'resnet_backbone'" in str(error.value) and "vit_backbone" in str(error.value)


@pytest.mark.parametrize("action_dim", [None, 0])
def test_missing_action_dim_is_a_clear_error(action_dim):
    with pytest.raises(ValueError, match="action_dim"):
        tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT), action_dim=action_dim))


def test_vit_backbone_with_cls_flag_is_refused():
    with pytest.raises(ValueError, match="cls_flag"):
        tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT, cls_flag=True)))


def test_unknown_step_conditioning_is_refused():
    with pytest.raises(ValueError, match="concat, add"):
        tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT), diffusion_step_conditioning="film"))


# ----------------------------------------------------------------------------- strict loading

def fixture_state_dict(policy_fixture):
    file = policy_fixture / "checkpoints" / "checkpoint_2.pt"
    return state_dict_from_payload(read_checkpoint_file(file), file, ema=False)


def test_fixture_checkpoint_keys_are_exactly_the_models(model, policy_fixture):
    state_dict = fixture_state_dict(policy_fixture)
    assert set(state_dict) == set(model.state_dict())
    for key, value in state_dict.items():
        assert value.shape == model.state_dict()[key].shape, key
    # The §9.2 keys, including the unused LM head and the flow-matching (stateless) scheduler.
    for key in ("time_encoding.weight", "sinusoidal_position_embeddings.emb", "condition_encode.weight",
                "action_encode.weight", "proprioception_encode.weight", "output_layer.bias"):
        assert key in state_dict
    assert not any(k.startswith("scheduler.") for k in state_dict)
    assert state_dict["time_encoding.weight"].shape == (100, 24)
    assert all(k.startswith("vision_language_backbone._model.model.")
               for k in state_dict if k.startswith("vision_language_backbone."))


@pytest.mark.parametrize("tamper", ["missing", "unexpected", "shape"])
def test_tampered_state_dict_raises_checkpoint_error_naming_the_key(model, policy_fixture, tamper):
    state_dict = dict(fixture_state_dict(policy_fixture))
    if tamper == "missing":
        key = "action_encode.bias"
        del state_dict[key]
    elif tamper == "unexpected":
        key = "action_encode.extra"
        state_dict[key] = torch.zeros(1)
    else:
        key = "output_layer.weight"
        state_dict[key] = torch.zeros(5, 32)
    fresh = DiffusionPolicy(model.params, load_pretrained=False)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(fresh, state_dict, "tampered.pt")
    assert key in str(error.value) and tamper.replace("shape", "shape mismatch") in str(error.value)


def test_load_model_refuses_a_tampered_checkpoint(policy_fixture, tmp_path):
    experiment = tmp_path / "tampered"
    for path in policy_fixture.rglob("*"):  # copyfile: the fixture files are read-only
        if path.is_file() and "expected" not in path.parts:
            target = experiment / path.relative_to(policy_fixture)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    state_dict = dict(fixture_state_dict(policy_fixture))
    state_dict["output_layer.weights"] = state_dict.pop("output_layer.weight")  # a renamed key
    torch.save({"state_dict": state_dict, "checkpoint_num": 2}, experiment / "checkpoints" / "checkpoint_2.pt")
    with pytest.raises(CheckpointError) as error:
        load_model(experiment, checkpoint=2)
    assert "output_layer.weight" in str(error.value) and "output_layer.weights" in str(error.value)
    assert load_model(experiment, checkpoint=1).params.type == "diffusion_policy"  # the untouched file loads


def test_generate_actions_without_actions_or_an_observation_says_what_it_needs(vit_policy):
    model = vit_policy
    with pytest.raises(TypeError, match="needs actions"):
        model.generate_actions(condition=torch.zeros(1, 1, model.vision_language_backbone.output_dim))
    with pytest.raises(TypeError, match="needs the observation"):
        model.generate_actions(actions=torch.zeros(1, 4, 3))
