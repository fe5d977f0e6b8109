"""A policy conditioned by a whole Qwen2-VL (``vlm_backbone``, format spec §8.4), saved as VLA Foundry saves it,
loaded, and served.

Qwen-VL processors differ from SmolVLM's in two ways that broke these policies: they mark every token as text (0)
or image (1) in ``mm_token_type_ids`` (B, L), which must grow with the action token to (B, L+1) and be laid out as
the ids are; and they flatten every image's patches into one (Σ patches, D) ``pixel_values`` with the grids in
``image_grid_thw``, which a batch grouped by prompt length (the path of models whose prompt attends both ways) must
split per sample. The read-out is recomputed here from the HF model itself.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.factories import build_tiny_tokenizer, vlm_hf_policy
from vla_foundry.checkpoint import load_model
from vla_foundry.demo.hf_models import QWEN2_VL_IMAGE_SEQ_LEN
from vla_foundry.pipelines.action import ActionPipeline, PolicyRequest
from vla_foundry.robotics.observations import RawObservation

SHORT, LONG = "pick", "pick up the red block and place it in the bin"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(experiment dir, its pipeline loaded from disk)."""
    path = tmp_path_factory.mktemp("qwen2_vl_policy")
    vlm_hf_policy(path, build_tiny_tokenizer(), family="qwen2_vl")
    return path, ActionPipeline.from_experiment(load_model(path), path)


@pytest.fixture(scope="module")
def unresized_policy(policy, tmp_path_factory):
    """The same policy trained on frames it never resized (``resize_images_size: null``): each robot's frames reach
    Qwen's processor at their own size, so robots' images can have different patch grids."""
    path = tmp_path_factory.mktemp("qwen2_vl_unresized") / "policy"
    shutil.copytree(policy[0], path)
    preprocessing = yaml.safe_load((path / "preprocessing_config.yaml").read_text())
    (path / "preprocessing_config.yaml").write_text(yaml.safe_dump({**preprocessing, "resize_images_size": None}))
    pipeline = ActionPipeline.from_experiment(load_model(path), path)
    assert pipeline.robot_io.resize_images_size is None
    return path, pipeline


def observation(pipeline, instruction: str, seed: int = 0, size: tuple[int, int] = (24, 40)) -> RawObservation:
    r, rng = pipeline.robot_io, np.random.default_rng(seed)
    return RawObservation({n: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for n in r.image_names},
                          {f: rng.normal(size=(r.past_steps + 1, r.field_dims[f])).astype(np.float32)
                           for f in r.proprioception_fields}, instruction)


def backbone_inputs(pipeline, samples):
    inputs = pipeline.prepare(samples)
    return dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
                attention_mask_images=inputs.attention_mask_images, **inputs.backbone_inputs)


def test_a_qwen2_vl_policy_predicts(policy):
    """The processor's token types and patch grids reach the backbone, and a prediction runs through them."""
    _, pipeline = policy
    r = pipeline.robot_io
    n_images = len(r.image_names)
    inputs = backbone_inputs(pipeline, [observation(pipeline, LONG)])
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape  # (1, L): the action token is not in it
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * n_images  # 32 px frames in 8 px patches
    assert inputs["pixel_values"].shape[0] == 16 * n_images  # flattened patches, not one tensor per image
    assert int(inputs["mm_token_type_ids"].sum()) == QWEN2_VL_IMAGE_SEQ_LEN * n_images
    out = pipeline.predict([observation(pipeline, LONG)], seed=0, num_inference_steps=3)
    assert out["action_chunk"].shape == (1, r.action_steps, r.action_dim)
    assert np.isfinite(out["action_chunk"]).all()


def test_conditioning_is_the_action_token_in_qwens_last_layers(policy):
    """Spec §8.4 recomputed from the HF model: the prompt the processor laid out, the action token V appended (mask 1,
    a text token in mm_token_type_ids), the last k = 2 hidden states at that position, concatenated."""
    path, pipeline = policy
    V = json.loads((path / "vlm" / "config.json").read_text())["text_config"]["vocab_size"]
    backbone = pipeline.model.vision_language_backbone
    assert backbone.action_token_id == V
    inputs = backbone_inputs(pipeline, [observation(pipeline, LONG)])
    ids = inputs["input_ids"]
    with_token = torch.cat([ids, torch.tensor([[V]])], dim=1)
    token_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], dim=1)
    with torch.no_grad():
        hidden = backbone._model.model(input_ids=with_token, pixel_values=inputs["pixel_values"],
                                       image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=token_types,
                                       attention_mask=torch.ones_like(with_token),
                                       output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[-2][:, -1], hidden[-1][:, -1]], dim=-1)[:, None]
        got = pipeline.model.encode_observation(**inputs)
    assert got.shape == (1, 1, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_batch_of_qwen_prompts_gives_each_robot_what_it_gets_alone(policy):
    """Instructions of different lengths: the processor pads them, and each robot's action token goes right after its
    own tokens (its token types laid out alike), so one call gives every robot its solo chunk."""
    _, pipeline = policy
    samples = [observation(pipeline, text, seed) for seed, text in enumerate([SHORT, LONG, SHORT, LONG + " now"])]
    assert not bool(backbone_inputs(pipeline, samples)["attention_mask"].all())  # the batch is padded
    batched = pipeline.predict_each([PolicyRequest(s, seed=10 + i) for i, s in enumerate(samples)],
                                    num_inference_steps=3)
    for i, (sample, chunk) in enumerate(zip(samples, batched)):
        alone = pipeline.predict([sample], seed=10 + i, num_inference_steps=3)
        np.testing.assert_allclose(chunk.action_chunk, alone["action_chunk"][0], atol=1e-5)


def test_robots_with_different_frame_sizes_each_get_their_own_patches(unresized_policy):
    """Frames of different sizes make different patch grids (32 x 32 px: 4 x 4 patches; 16 x 48 and 48 x 16: 2 x 6
    and 6 x 2), so the flattened pixel values hold 64 rows for some robots and 48 for others. In one call each robot
    keeps its own; grouped by prompt length, each group must take its own robots' rows, found from
    ``image_grid_thw``, not an equal share of the batch."""
    _, pipeline = unresized_policy
    n_images = len(pipeline.robot_io.image_names)
    sizes = [(32, 32), (16, 48), (32, 32), (48, 16)]
    samples = [observation(pipeline, LONG, seed, size) for seed, size in enumerate(sizes)]
    inputs = backbone_inputs(pipeline, samples)
    patches = inputs["image_grid_thw"].prod(-1).view(len(samples), n_images).sum(-1)
    assert patches.tolist() == [16 * n_images, 12 * n_images, 16 * n_images, 12 * n_images]
    assert inputs["pixel_values"].shape[0] == int(patches.sum())
    assert not bool(inputs["attention_mask"].all())  # fewer image tokens: shorter prompts, padded
    batched = pipeline.predict_each([PolicyRequest(s, seed=20 + i) for i, s in enumerate(samples)],
                                    num_inference_steps=3)
    for i, (sample, chunk) in enumerate(zip(samples, batched)):
        alone = pipeline.predict([sample], seed=20 + i, num_inference_steps=3)
        np.testing.assert_allclose(chunk.action_chunk, alone["action_chunk"][0], atol=1e-5)
    from vla_foundry.models.vlm_backbones import by_prompt_length

    backbone = pipeline.model.vision_language_backbone
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    inputs.pop("attention_mask_images")
    with torch.no_grad():
        grouped = by_prompt_length(backbone._encode_alike, ids, mask, inputs)
        for i, sample in enumerate(samples):
            alone = pipeline.model.encode_observation(**backbone_inputs(pipeline, [sample]))
            torch.testing.assert_close(grouped[i:i + 1], alone, rtol=0, atol=1e-5)


def test_a_left_padding_processor_batches_as_alone(policy, tmp_path):
    """Where the processor pads on the left, each robot's own tokens (and token types) move to the front before its
    action token."""
    path = tmp_path / "policy"
    shutil.copytree(policy[0], path)
    config = json.loads((path / "vlm" / "tokenizer_config.json").read_text())
    (path / "vlm" / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    pipeline = ActionPipeline.from_experiment(load_model(path), path)
    samples = [observation(pipeline, text, seed) for seed, text in enumerate([SHORT, LONG, SHORT])]
    assert not bool(backbone_inputs(pipeline, samples)["attention_mask"][:, 0].all())  # padded on the left
    batched = pipeline.predict_each([PolicyRequest(s, seed=30 + i) for i, s in enumerate(samples)],
                                    num_inference_steps=3)
    for i, (sample, chunk) in enumerate(zip(samples, batched)):
        alone = pipeline.predict([sample], seed=30 + i, num_inference_steps=3)
        np.testing.assert_allclose(chunk.action_chunk, alone["action_chunk"][0], atol=1e-5)


def test_trained_with_the_slow_processor_it_is_served_with_it(policy, tmp_path):
    """``use_hf_fast_tokenizer: false`` gives Qwen2-VL's PIL image processor (VLA Foundry's ``use_fast=False``; the
    ``backend="pil"`` that transformers 5 suggests instead fails on its video part), and the policy samples."""
    from transformers import AutoProcessor

    path = tmp_path / "slow"
    shutil.copytree(policy[0], path)
    config = yaml.safe_load((path / "config_processor.yaml").read_text())
    (path / "config_processor.yaml").write_text(yaml.safe_dump({**config, "use_hf_fast_tokenizer": False}))
    pipeline = ActionPipeline.from_experiment(load_model(path), path)
    sample = observation(pipeline, SHORT, size=tuple(pipeline.robot_io.resize_images_size))  # (none resized here)
    pil = AutoProcessor.from_pretrained(policy[0] / config["processor"], use_fast=False)
    fast = AutoProcessor.from_pretrained(policy[0] / config["processor"], use_fast=True)
    assert type(pil.image_processor) is not type(fast.image_processor)
    frames = [sample.images[n] for n in pipeline.robot_io.image_names]
    expected = pil(images=[frames], text=["x " + "<|vision_start|><|image_pad|><|vision_end|>" * len(frames)],
                   return_tensors="pt")["pixel_values"]
    assert torch.equal(backbone_inputs(pipeline, [sample])["pixel_values"], expected)
    assert not torch.equal(backbone_inputs(policy[1], [sample])["pixel_values"], expected)  # the fast kind's differ
    chunk = pipeline.predict_each([PolicyRequest(sample, seed=0)])[0]
    assert np.isfinite(chunk.action_chunk).all()
