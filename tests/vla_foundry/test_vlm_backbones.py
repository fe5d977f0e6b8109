"""Policies conditioned by a whole VLM (format spec §8.4): ``vlm_foundry_backbone`` (our ``vlm``) and
``vlm_backbone`` (an HF image-text model), each saved as VLA Foundry saves them, loaded, and served.

The spec's read-out is recomputed here from the VLM itself (the action token after the prompt, the last k
hidden states at that position), and a batch of robots with prompts of different lengths must give each robot
what it gets alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.factories import (build_tiny_tokenizer, save_tiny_policy, tiny_policy_params, vlm_foundry_policy,
                             vlm_hf_policy)
from vla_foundry.checkpoint import load_model
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.vlm_backbones import by_prompt_length
from vla_foundry.pipelines.action import ActionPipeline, PolicyRequest
from vla_foundry.robotics.observations import RawObservation

POLICIES = {"vlm_foundry_backbone": vlm_foundry_policy, "vlm_backbone": vlm_hf_policy}
SHORT, LONG = "pick", "pick up the red block and place it in the bin"


@pytest.fixture(scope="module", params=list(POLICIES))
def policy(request, tmp_path_factory):
    """(backbone type, experiment dir, the model as built, its pipeline loaded from disk)."""
    path = tmp_path_factory.mktemp(request.param)
    built = POLICIES[request.param](path, build_tiny_tokenizer())
    return request.param, path, built, ActionPipeline.from_experiment(load_model(path), path)


def observation(pipeline, instruction: str, seed: int = 0) -> RawObservation:
    r, rng = pipeline.robot_io, np.random.default_rng(seed)
    return RawObservation({n: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for n in r.image_names},
                          {f: rng.normal(size=(r.past_steps + 1, r.field_dims[f])).astype(np.float32)
                           for f in r.proprioception_fields}, instruction)


def vocabulary_before_the_action_token(kind: str, path) -> int:
    """V, read from the saved configs (not from our model): the action token's id and the rows before it."""
    if kind == "vlm_foundry_backbone":
        return yaml.safe_load((path / "vlm_config_model.yaml").read_text())["transformer"]["vocab_size"]
    return json.loads((path / "vlm" / "config.json").read_text())["text_config"]["vocab_size"]


def backbone_inputs(pipeline, samples):
    inputs = pipeline.prepare(samples)
    return dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
                attention_mask_images=inputs.attention_mask_images, **inputs.backbone_inputs)


def test_the_checkpoint_has_vla_foundrys_layout(policy):
    kind, path, built, pipeline = policy
    V = vocabulary_before_the_action_token(kind, path)
    state = torch.load(path / "checkpoints" / "checkpoint_1.pt", weights_only=True)["state_dict"]
    if kind == "vlm_foundry_backbone":
        rows = ["vision_language_backbone._model.transformer.embeddings.weight",
                "vision_language_backbone._model.transformer.output.weight"]
        block = yaml.safe_load((path / "config_model.yaml").read_text())["vision_language_backbone"]
        assert "vlm" not in block and block["num_vlm_layers_to_use"] == 2  # the VLM's config is a side file
    else:
        rows = [k for k in state if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
        assert len(rows) == 2 and all(k.startswith("vision_language_backbone._model.model.") for k in rows)
    assert all(state[k].shape[0] == V + 1 for k in rows)  # the action row after the vocabulary, in both tables
    assert pipeline.model.vision_language_backbone.action_token_id == V
    assert pipeline.model.vision_language_backbone.output_dim == 2 * 32  # k · H
    samples = [observation(pipeline, LONG)]
    with torch.no_grad():
        np.testing.assert_array_equal(built.encode_observation(**backbone_inputs(pipeline, samples)).numpy(),
                                      pipeline.model.encode_observation(**backbone_inputs(pipeline, samples)).numpy())


def test_conditioning_is_the_action_token_in_the_last_layers(policy):
    """Spec §8.4 recomputed from the VLM: the prompt (images and text laid out by the processor's chat template),
    the action token V appended with mask 1, the last k = 2 hidden states at that position, concatenated."""
    kind, path, _, pipeline = policy
    V = vocabulary_before_the_action_token(kind, path)
    backbone = pipeline.model.vision_language_backbone
    inputs = backbone_inputs(pipeline, [observation(pipeline, LONG)])
    ids = inputs["input_ids"]
    image_id = backbone._model.image_token_id
    assert int((ids == image_id).sum()) == 4 * len(pipeline.robot_io.image_names)  # 4 tokens per image
    with_token = torch.cat([ids, torch.tensor([[V]])], dim=1)
    with torch.no_grad():
        if kind == "vlm_foundry_backbone":
            pixels = F.interpolate(inputs["pixel_values"].flatten(0, 1), size=(16, 16), mode="bilinear",
                                   align_corners=False)  # the processor's 32 px tiles, resized to the ViT's 16
            hidden = backbone._model(with_token, pixels, output_hidden_states=True).hidden_states
        else:
            hidden = backbone._model.model(input_ids=with_token, pixel_values=inputs["pixel_values"],
                                           pixel_attention_mask=inputs["pixel_attention_mask"],
                                           attention_mask=torch.ones_like(with_token),
                                           output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[-2][:, -1], hidden[-1][:, -1]], dim=-1)[:, None]
        got = pipeline.model.encode_observation(**inputs)
    assert got.shape == (1, 1, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_prompt_is_one_user_turn_images_first(policy):
    kind, _, _, pipeline = policy
    from transformers import AutoProcessor

    directory = {"vlm_foundry_backbone": "processor", "vlm_backbone": "vlm"}[kind]
    tokenizer = AutoProcessor.from_pretrained(policy[1] / directory).tokenizer
    ids = backbone_inputs(pipeline, [observation(pipeline, LONG)])["input_ids"][0]
    text = tokenizer.decode(ids)
    assert text.startswith("User:") and text.rstrip().endswith(LONG + "<end_of_utterance>")  # no generation prompt
    assert text.index("<image>") < text.index(LONG) and "Assistant" not in text


def test_a_batch_gives_each_robot_what_it_gets_alone(policy):
    """Prompts of different lengths in one batch: the processor pads them, which would move the action token; the
    backbone runs each length on its own, so every robot's chunk is its solo chunk."""
    _, _, _, pipeline = policy
    samples = [observation(pipeline, text, seed) for seed, text in enumerate([SHORT, LONG, SHORT, LONG + " now"])]
    batched = pipeline.predict_each([PolicyRequest(s, seed=10 + i) for i, s in enumerate(samples)],
                                    num_inference_steps=3)
    for i, (sample, chunk) in enumerate(zip(samples, batched)):
        alone = pipeline.predict([sample], seed=10 + i, num_inference_steps=3)
        np.testing.assert_allclose(chunk.action_chunk, alone["action_chunk"][0], atol=1e-5)
    # Appended after the padding (as the reference appends it to its unpadded prompts), the short prompts would
    # condition differently: why each row's action token goes after its own tokens.
    backbone = pipeline.model.vision_language_backbone
    inputs = backbone_inputs(pipeline, samples)
    with torch.no_grad():
        padded = backbone._encode_alike(inputs.pop("input_ids"), inputs.pop("attention_mask"), **{
            k: v for k, v in inputs.items() if k != "attention_mask_images"})
        alone = pipeline.model.encode_observation(**backbone_inputs(pipeline, samples[:1]))
    assert (padded[0] - alone[0]).abs().max() > 1e-3


def test_robots_with_different_instructions_share_one_vlm_call(policy):
    """Each row's action token after its own tokens: one forward for prompts of every length, equal to the
    groups of equally long prompts (the path a model whose prompt attends both ways takes)."""
    _, _, _, pipeline = policy
    backbone = pipeline.model.vision_language_backbone
    samples = [observation(pipeline, text, seed) for seed, text in enumerate([SHORT, LONG, SHORT, LONG + " now"])]
    inputs = backbone_inputs(pipeline, samples)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # three lengths in one batch
    calls, run = [], backbone._run
    backbone._run = lambda *args, **kwargs: (calls.append(args[0].shape), run(*args, **kwargs))[1]
    try:
        with torch.no_grad():
            together = pipeline.model.encode_observation(**inputs)
            assert len(calls) == 1
            ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            inputs.pop("attention_mask_images")
            grouped = by_prompt_length(backbone._encode_alike, ids, mask, inputs)
            assert len(calls) == 4  # (one more call per length)
    finally:
        del backbone._run
    torch.testing.assert_close(together, grouped, rtol=0, atol=1e-5)


def test_the_denoising_steps_replay_from_a_graph_after_the_eager_vlm(policy):
    """The VLM runs eagerly (it branches on its inputs' values); the steps after it replay from a trace that starts
    at its tokens, checked against eager sampling when captured, and serving that shape."""
    _, _, _, pipeline = policy
    assert pipeline.graphs.mode() == "traced"
    samples = [observation(pipeline, text, seed) for seed, text in enumerate([SHORT, LONG, SHORT])]
    inputs = pipeline.prepare(samples)
    noise = torch.randn(inputs.actions.shape, generator=torch.Generator().manual_seed(0))
    before = len(pipeline.graphs)
    with torch.inference_mode():
        replayed = pipeline.graphs.sample(pipeline._graph_inputs(inputs), 7, noise)  # (7 steps: a new graph)
        eager = pipeline.model.generate_actions(**inputs.model_kwargs(), num_inference_steps=7, initial_noise=noise)
    names = ("condition", "actions", "past_mask", "proprioception")
    captured = [key for key in pipeline.graphs._graphs if key[:2] == (names, 7)]
    assert len(pipeline.graphs) == before + 1 and not pipeline.graphs._refused  # it serves: not refused, not eager
    assert captured and captured[0][2][0] == ((3, 1, 64), torch.float32)  # the VLM's tokens, one per robot
    torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-5)


def test_warm_up_runs_the_vlm_once_whatever_the_batch_sizes(policy):
    """Graphs for batches of 1…3 from one robot's inputs: the VLM runs on that robot alone, its tokens repeated."""
    _, _, _, pipeline = policy
    backbone = pipeline.model.vision_language_backbone
    rows, forward = [], backbone.forward
    backbone.forward = lambda input_ids, *args, **kwargs: (rows.append(input_ids.shape[0]),
                                                           forward(input_ids, *args, **kwargs))[1]
    before = len(pipeline.graphs)
    try:
        with torch.inference_mode():
            pipeline.graphs.capture(pipeline._graph_inputs(pipeline.prepare([observation(pipeline, LONG)])), 5,
                                    [1, 2, 3])
    finally:
        del backbone.forward
    assert rows == [1] and len(pipeline.graphs) == before + 3


def test_evaluation_runs_through_the_backbone(policy):
    _, _, _, pipeline = policy
    r = pipeline.robot_io
    windows = [{f: np.random.default_rng(i).normal(size=(r.action_steps, r.field_dims[f])).astype(np.float32)
                for f in r.action_fields} for i in range(2)]
    samples = [observation(pipeline, SHORT, 0), observation(pipeline, LONG, 1)]
    together = pipeline.evaluate(samples, windows, seed=3)
    assert np.isfinite(together["loss"])
    from vla_foundry.pipelines.action import PolicyEvaluation

    each = pipeline.evaluate_each([PolicyEvaluation([s], [w], seed=4 + i) for i, (s, w) in
                                   enumerate(zip(samples, windows))])
    for i, (s, w) in enumerate(zip(samples, windows)):
        assert each[i]["loss"] == pytest.approx(pipeline.evaluate([s], [w], seed=4 + i)["loss"], abs=1e-6)


def test_a_prompt_beyond_the_vlms_context_is_refused_by_field(policy):
    _, _, _, pipeline = policy  # (both VLMs here take 128 positions)
    with pytest.raises(InvalidInputError) as error:
        pipeline.predict([observation(pipeline, " ".join(["block"] * 200))], seed=0)
    assert error.value.field == "observation.language_instruction" and "at most 127" in str(error.value)


def test_the_processors_other_outputs_reach_the_model(policy):
    """Idefics3 takes a ``pixel_attention_mask`` from its processor, through prediction and evaluation alike."""
    kind, _, _, pipeline = policy
    if kind != "vlm_backbone":
        pytest.skip("our vlm reads no other processor output")
    hf = pipeline.model.vision_language_backbone._model.model
    seen, forward = [], hf.forward
    hf.forward = lambda *args, **kwargs: (seen.append(set(kwargs)), forward(*args, **kwargs))[1]
    try:
        pipeline.predict([observation(pipeline, SHORT)], seed=0, num_inference_steps=2)
        r = pipeline.robot_io
        window = {f: np.zeros((r.action_steps, r.field_dims[f]), np.float32) for f in r.action_fields}
        pipeline.evaluate([observation(pipeline, SHORT)], [window], seed=0)
    finally:
        del hf.forward
    assert len(seen) == 2 and all("pixel_attention_mask" in kwargs for kwargs in seen), seen


def test_the_chat_template_is_the_processors_then_the_tokenizers(policy, monkeypatch):
    """VLA Foundry renders the prompt with the processor's chat template, else its tokenizer's, else
    ``"<image> " · N + instruction``. (The templates are set in memory: saved to one directory, a processor's and
    its tokenizer's template share one file.)"""
    kind, path, _, _ = policy
    if kind != "vlm_foundry_backbone":
        pytest.skip("one processor is enough")
    import transformers

    from vla_foundry.robotics.processor import hf_vlm_processor

    frames = [[np.zeros((32, 32, 3), np.uint8)] * 2]
    load = transformers.AutoProcessor.from_pretrained

    def rendered(processor_template, tokenizer_template) -> str:
        processor = load(path / "processor")
        processor.chat_template = processor_template
        processor.tokenizer.chat_template = tokenizer_template
        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *_, **__: processor)
        ids = hf_vlm_processor("in memory").joint_fn(frames, [SHORT])["input_ids"][0]
        return processor.tokenizer.decode(ids)

    template = "{{ '%s' }}{%% for part in messages[0]['content'] %%}{%% if part['type'] == 'image' %%}<image>" \
               "{%% else %%}{{ part['text'] }}{%% endif %%}{%% endfor %%}"
    assert rendered(template % "P:", template % "T:").startswith("P:")
    assert rendered(None, template % "T:").startswith("T:")
    plain = rendered(None, None)  # "<image> <image> pick", each <image> then expanded by the processor
    assert plain.startswith("<fake_token_around_image>") and plain.endswith("<fake_token_around_image> " + SHORT)
    assert plain.count("<global-img>") == 2


def test_the_action_token_goes_after_each_rows_own_tokens_left_or_right_padded():
    from vla_foundry.models.vlm_backbones import place_action_token

    A = 99
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4], [3, 2, 0, 0]])  # left-padded, full, right-padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    types = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    placed, new_mask, positions, inputs = place_action_token(ids, mask, A, {"mm_token_type_ids": types,
                                                                           "pixel_values": torch.ones(3, 2)})
    assert positions.tolist() == [2, 4, 2]
    assert [row[:p + 1] for row, p in zip(placed.tolist(), positions.tolist())] == [[5, 6, A], [7, 8, 9, 4, A],
                                                                                   [3, 2, A]]
    assert new_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    types = inputs["mm_token_type_ids"]
    assert [row[:p + 1] for row, p in zip(types.tolist(), positions.tolist())] == [[1, 0, 0], [1, 1, 0, 0, 0],
                                                                                  [1, 0, 0]]
    assert inputs["pixel_values"].shape == (3, 2)  # per-sample inputs untouched


# ----------------------------------------------------------------------------- configs

def test_a_reference_block_parses_with_vla_foundrys_defaults():
    from vla_foundry.params import parse_params

    params = parse_params({"type": "diffusion_policy", "transformer": {}, "action_dim": 3,
                           "vision_language_backbone": {"type": "vlm_foundry_backbone", "freeze": False,
                                                        "resume_from_checkpoint": None, "resume_weights_only": False}})
    assert params.vision_language_backbone.num_vlm_layers_to_use == 4 and params.vision_language_backbone.vlm is None
    params = parse_params({"type": "diffusion_policy", "transformer": {}, "action_dim": 3,
                           "vision_language_backbone": {"hf_pretrained": "x"}})  # no type: a vlm_backbone (§1.2)
    assert params.vision_language_backbone.type == "vlm_backbone"
    assert params.vision_language_backbone.num_vlm_layers_to_use == 4


def test_the_source_vlm_config_is_found_where_vla_foundry_looks(tmp_path):
    """In VLA Foundry's order: vlm_experiment_dir, the experiment of resume_from_checkpoint, then the copy
    published beside the policy; only places that exist count, and a pointer back at the policy is passed over."""
    path = tmp_path / "policy"
    vlm_foundry_policy(path, build_tiny_tokenizer())
    published = yaml.safe_load((path / "vlm_config_model.yaml").read_text())

    def source(name: str, ln_eps: float) -> None:  # a source VLM config told apart by a field no weight shows
        (tmp_path / name).mkdir(exist_ok=True)
        config = {**published, "vit": {**published["vit"], "ln_eps": ln_eps}}
        (tmp_path / name / "config_model.yaml").write_text(yaml.safe_dump(config))

    def backbone(**fields) -> float:
        config = yaml.safe_load((path / "config_model.yaml").read_text())
        config["vision_language_backbone"].update(fields)
        (path / "config_model.yaml").write_text(yaml.safe_dump(config))
        (path / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((path / "config.yaml").read_text()),
                                                          "model": config}))
        return load_model(path).vision_language_backbone.params.vlm.vit.ln_eps

    source("trained_vlm", 1e-3)
    source("resumed_vlm", 1e-4)
    assert backbone(vlm_experiment_dir="../trained_vlm",
                    resume_from_checkpoint="../resumed_vlm/checkpoints/checkpoint_9.pt") == 1e-3
    assert backbone(vlm_experiment_dir="/elsewhere/on/the/training/machine") == 1e-4
    assert backbone(resume_from_checkpoint="/elsewhere/checkpoints/checkpoint_9.pt") == published["vit"]["ln_eps"]
    # a pointer into the policy's own experiment is no VLM config: the published copy serves
    assert backbone(resume_from_checkpoint="checkpoints/checkpoint_1.pt") == published["vit"]["ln_eps"]
    (path / "vlm_config_model.yaml").unlink()
    with pytest.raises(ValueError, match="vlm_config_model.yaml"):
        load_model(path)


def test_bad_backbone_configs_name_the_key(tmp_path):
    from vla_foundry.models import create_model
    from vla_foundry.params.clip import VLMFoundryBackboneParams

    with pytest.raises(ValueError, match="vlm_config_model.yaml"):
        create_model(tiny_policy_params(VLMFoundryBackboneParams()), load_pretrained=False)
    built = vlm_foundry_policy(tmp_path / "p", build_tiny_tokenizer())
    too_deep = VLMFoundryBackboneParams(num_vlm_layers_to_use=3, vlm=built.params.vision_language_backbone.vlm)
    with pytest.raises(ValueError, match=r"num_vlm_layers_to_use must be 1…2"):
        create_model(tiny_policy_params(too_deep), load_pretrained=False)
    save_tiny_policy(built, tmp_path / "none", processor="none")
    with pytest.raises(ValueError, match="needs the HF processor it was trained with"):
        ActionPipeline.from_experiment(load_model(tmp_path / "none"), tmp_path / "none")
