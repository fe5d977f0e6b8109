"""Robotics side files (format spec §8.3, §12): the normalizer (fixture case and every rule by hand), raw
observations → model inputs (fixture case), image resizing, the robot I/O contract, observation checks and the
statistics writer."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vla_foundry.errors import CheckpointError, InvalidInputError
from vla_foundry.robotics.normalizer import NormalizerConfig, RoboticsNormalizer
from vla_foundry.robotics.observations import (RawObservation, build_inputs, normalize_fields, parse_action_window,
                                               parse_observation)
from vla_foundry.robotics.processor import (HFProcessorLoading, InputProcessor, RawPixels, center_crop,
                                             hf_processor, prompt_for, resize_image)
from vla_foundry.robotics.robot_io import RobotIO, image_names_for
from vla_foundry.robotics.stats import PERCENTILES, field_stats
from tests.factories import tiny_policy_io

ATOL = 1e-6
FIELDS = ["robot__action__grippers__right::panda_hand", "robot__action__poses__right::panda__xyz_relative",
          "robot__actual__poses__right::panda__xyz"]


@pytest.fixture(scope="module")
def normalizer(policy_fixture):
    return RoboticsNormalizer.from_experiment(policy_fixture)


@pytest.fixture(scope="module")
def fixture_io(policy_fixture, normalizer):
    return RobotIO.from_experiment(policy_fixture, normalizer.stats)


def expected(policy_fixture, case):
    return load_file(policy_fixture / "expected" / f"{case}.safetensors")


# ----------------------------------------------------------------------------- normalizer: fixture

@pytest.mark.parametrize("field", FIELDS)
def test_fixture_normalization(normalizer, policy_fixture, cases, field):
    e = expected(policy_fixture, "normalization")
    anchor = cases["normalization"]["anchor_timestep"]
    assert normalizer.config.lowdim_past_timesteps == cases["normalization"]["lowdim_past_timesteps_of_stats"]
    assert normalizer.applies_to(field)
    normalized = normalizer.normalize_tensor(e[f"input.raw.{field}"], field, anchor_timestep=anchor)
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, e[f"output.normalized.{field}"], atol=ATOL)
    denormalized = normalizer.denormalize_tensor(e[f"input.normalized_model_output.{field}"], field,
                                                 anchor_timestep=anchor)
    assert torch.allclose(denormalized, e[f"output.denormalized.{field}"], atol=ATOL)
    # The two directions are inverses.
    assert torch.allclose(normalizer.denormalize(normalized, field, anchor_timestep=anchor),
                          e[f"input.raw.{field}"], atol=1e-5)


# ----------------------------------------------------------------------------- normalizer: rules by hand

# One field "x" with D = 2 and a statistics window of Ts = 4 steps (Ps = 1 past, the current one, 2 future).
# Global and per-timestep statistics differ, so a wrong scope or a wrong row shows.
GLOBAL = {"mean": [1.0, -2.0], "std": [2.0, 0.5], "min": [-3.0, -4.0], "max": [5.0, 0.0],
          "percentile_1": [-2.0, -3.8], "percentile_99": [4.0, -0.2],
          "percentile_5": [-1.0, -3.0], "percentile_95": [3.0, -1.0]}


def per_timestep(values, Ts=4):
    """Row r of a per-timestep statistic is the global value shifted by 10·r (each row distinguishable)."""
    return [[v + 10 * r for v in values] for r in range(Ts)]


def synthetic_stats(names=("x",)):
    entry = {**GLOBAL, **{f"{k}_per_timestep": per_timestep(v) for k, v in GLOBAL.items()}, "count": 10}
    return {name: json.loads(json.dumps(entry)) for name in names}


def make_normalizer(names=("x",), stats=None, **config):
    raw = {"method": "std", "scope": "global", "epsilon": 1e-8, "include_fields": list(names),
           "lowdim_past_timesteps": 1, "lowdim_future_timesteps": 2, **config}
    return RoboticsNormalizer(stats or synthetic_stats(names), NormalizerConfig.from_dict(raw))


def center_scale(method, stats=GLOBAL):
    low, high = {"std": ("mean", "std"), "percentile_5_95": ("percentile_5", "percentile_95"),
                 "percentile_1_99": ("percentile_1", "percentile_99"), "min_max": ("min", "max")}[method]
    c, h = torch.tensor(stats[low]), torch.tensor(stats[high])
    return (c, h) if method == "std" else (c, h - c)


X = torch.tensor([[0.5, -1.0], [3.0, 2.0], [-4.0, 0.0]])  # (3, 2): three rows of one field


@pytest.mark.parametrize("method", ["std", "percentile_5_95", "percentile_1_99", "min_max"])
def test_each_method_uncentered(method):
    n = make_normalizer(method=method, centered_norm=False)
    c, s = center_scale(method)
    assert torch.allclose(n.normalize(X, "x"), (X - c) / s, atol=ATOL)
    assert torch.allclose(n.denormalize(X, "x"), X * s + c, atol=ATOL)
    if method != "std":  # the low statistic maps to 0, the high one to 1
        low_high = torch.stack([c, c + s])
        assert torch.allclose(n.normalize(low_high, "x"), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=ATOL)


@pytest.mark.parametrize("method", ["percentile_5_95", "percentile_1_99", "min_max"])
def test_centered_norm_maps_the_range_to_minus_one_one(method):
    n = make_normalizer(method=method, centered_norm=True)
    c, s = center_scale(method)
    low_high = torch.stack([c, c + s])
    assert torch.allclose(n.normalize(low_high, "x"), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=ATOL)
    assert torch.allclose(n.normalize(X, "x"), (X - (c + s / 2)) / (s / 2), atol=ATOL)


def test_centered_norm_does_not_change_std():
    c, s = center_scale("std")
    for centered in (True, False):
        n = make_normalizer(method="std", centered_norm=centered)
        assert torch.allclose(n.normalize(X, "x"), (X - c) / s, atol=ATOL)


def test_centered_norm_is_forced_by_method_std():
    """With global method std, centered_norm is forced True; it only shows for a field configured with a
    percentile or min_max method."""
    field_configs = {"x": {"method": "min_max"}}
    forced = make_normalizer(method="std", centered_norm=False, field_configs=field_configs)
    not_forced = make_normalizer(method="percentile_1_99", centered_norm=False, field_configs=field_configs)
    assert forced.config.centered_norm is True and not_forced.config.centered_norm is False
    mins_maxes = torch.tensor([GLOBAL["min"], GLOBAL["max"]])
    assert torch.allclose(forced.normalize(mins_maxes, "x"), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=ATOL)
    assert torch.allclose(not_forced.normalize(mins_maxes, "x"), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=ATOL)


def test_epsilon_floors_the_scale_per_field():
    stats = synthetic_stats()
    stats["x"]["std"] = [0.0, 1e-4]  # a constant dimension and a nearly constant one
    default = make_normalizer(stats=stats, epsilon=1e-2)
    c = torch.tensor(GLOBAL["mean"])
    assert torch.allclose(default.normalize(X, "x"), (X - c) / torch.tensor([1e-2, 1e-2]), atol=1e-4)
    # A field config's own epsilon wins over the normalizer's.
    own = make_normalizer(stats=stats, epsilon=1e-2, field_configs={"x": {"epsilon": 1e-3}})
    assert torch.allclose(own.normalize(X, "x"), (X - c) / torch.tensor([1e-3, 1e-3]), atol=1e-3)
    # Larger scales are untouched.
    tiny = make_normalizer(stats=stats, epsilon=1e-8)
    assert torch.allclose(tiny.denormalize(X, "x"), X * torch.tensor([0.0, 1e-4]) + c, atol=ATOL)


def test_global_scope_broadcasts_along_the_last_dim():
    n = make_normalizer(method="min_max", centered_norm=False)
    c, s = center_scale("min_max")
    x = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(0))  # any number of steps
    assert torch.allclose(n.normalize(x, "x"), (x - c) / s, atol=ATOL)


def test_per_timestep_scope_uses_one_row_per_step():
    n = make_normalizer(method="min_max", centered_norm=False, scope="per_timestep")
    stats = synthetic_stats()["x"]
    c = torch.tensor(stats["min_per_timestep"])
    s = torch.tensor(stats["max_per_timestep"]) - c
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))  # Tx == Ts: rows as is
    assert torch.allclose(n.normalize(x, "x"), (x - c) / s, atol=ATOL)
    assert torch.allclose(n.normalize(x, "x", anchor_timestep=1), (x - c) / s, atol=ATOL)  # anchor unused
    with pytest.raises(InvalidInputError) as error:  # Tx ≠ Ts without an anchor is ambiguous
        n.normalize(x[:, :3], "x")
    assert error.value.field == "x"


def per_timestep_rows(rows, method="min_max"):
    stats = synthetic_stats()["x"]
    low, high = {"min_max": ("min", "max"), "std": ("mean", "std")}[method]
    c = torch.tensor(stats[f"{low}_per_timestep"])[rows]
    h = torch.tensor(stats[f"{high}_per_timestep"])[rows]
    return c, h - c


@pytest.mark.parametrize("anchor, Tx, rows", [(1, 3, [0, 1, 2]), (0, 2, [1, 2]), (1, 2, [0, 1]), (0, 3, [1, 2, 3]),
                                              (1, 1, [0])])
def test_anchor_window_takes_rows_from_ps_minus_anchor(anchor, Tx, rows):
    """Tensor index ``anchor`` ↔ stats index Ps = 1: rows [Ps − a, Ps − a + Tx)."""
    n = make_normalizer(method="min_max", centered_norm=False, scope="per_timestep")
    x = torch.randn(2, Tx, 2, generator=torch.Generator().manual_seed(Tx))
    c, s = per_timestep_rows(rows)
    assert torch.allclose(n.normalize(x, "x", anchor_timestep=anchor), (x - c) / s, atol=ATOL)
    assert torch.allclose(n.denormalize(x, "x", anchor_timestep=anchor), x * s + c, atol=ATOL)


@pytest.mark.parametrize("anchor, Tx, clipped_rows", [(2, 3, [0, 0, 1]), (0, 5, [1, 2, 3, 3, 3]), (3, 2, [0, 0])])
def test_anchor_window_outside_the_stats(anchor, Tx, clipped_rows):
    """normalize refuses a window that leaves [0, Ts); denormalize reuses the edge rows instead."""
    n = make_normalizer(method="min_max", centered_norm=False, scope="per_timestep")
    x = torch.randn(2, Tx, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError) as error:
        n.normalize(x, "x", anchor_timestep=anchor)
    assert error.value.field == "x" and "rows" in str(error.value)
    c, s = per_timestep_rows(clipped_rows)
    assert torch.allclose(n.denormalize(x, "x", anchor_timestep=anchor), x * s + c, atol=ATOL)


def test_field_config_lookup_exact_then_first_substring_in_file_order_then_global(tmp_path):
    names = ("arm__pos", "arm__vel", "gripper")
    # Written by hand so the file order is not alphabetical: "vel" comes before "arm".
    (tmp_path / "config_normalizer.yaml").write_text(
        "enabled: true\nmethod: std\nscope: global\nepsilon: 1.0e-8\ncentered_norm: false\n"
        "include_fields: [arm__pos, arm__vel, gripper]\nlowdim_past_timesteps: 1\n"
        "field_configs:\n"
        "  vel: {method: min_max}\n"
        "  arm: {method: percentile_5_95}\n"
        "  arm__pos: {method: percentile_1_99}\n")
    (tmp_path / "stats.json").write_text(json.dumps(synthetic_stats(names)))
    n = RoboticsNormalizer.from_experiment(tmp_path)
    assert list(n.config.field_configs) == ["vel", "arm", "arm__pos"]
    assert n.config.for_field("arm__pos").method == "percentile_1_99"  # exact key, though "arm" comes first
    assert n.config.for_field("arm__vel").method == "min_max"  # "vel" and "arm" match; "vel" is first
    assert n.config.for_field("gripper").method == "std"  # no key: the global method
    assert n.config.for_field("gripper").scope == "global" and n.config.for_field("gripper").epsilon == 1e-8
    # The chosen configs are what normalize uses; global method std forces centered_norm for the others.
    assert n.config.centered_norm is True
    for name, method in [("arm__pos", "percentile_1_99"), ("arm__vel", "min_max"), ("gripper", "std")]:
        c, s = center_scale(method)
        if method != "std":
            c, s = c + s / 2, s / 2
        assert torch.allclose(n.normalize(X, name), (X - c) / s, atol=ATOL), name


def test_field_config_fills_missing_keys_from_the_globals():
    n = make_normalizer(method="min_max", scope="per_timestep", epsilon=0.5,
                        field_configs={"x": {"method": "std"}})
    fc = n.config.for_field("x")
    assert (fc.method, fc.scope, fc.epsilon, fc.enabled) == ("std", "per_timestep", 0.5, True)


@pytest.mark.parametrize("name", ["language_instruction", "Task_TEXT_embedding", "observation__instruction",
                                  "gripper_mask", "pose_valid", "Padding_Mask"])
def test_text_and_mask_fields_are_never_normalized(name):
    n = make_normalizer(names=(name,))
    assert not n.applies_to(name)
    assert torch.equal(n.normalize(X, name), X) and torch.equal(n.denormalize(X, name), X)


def test_fields_outside_include_fields_disabled_or_without_stats_are_identity():
    stats = synthetic_stats(("x", "y", "z"))
    for n, name in [(make_normalizer(names=("x",), stats=stats), "y"),  # not in include_fields
                    (make_normalizer(names=("x", "y"), stats=stats, field_configs={"y": {"enabled": False}}), "y"),
                    (make_normalizer(names=("x",), stats=stats, enabled=False), "x"),
                    (make_normalizer(names=("x", "w"), stats=stats), "w")]:  # included, but no stats
        assert not n.applies_to(name), name
        assert torch.equal(n.normalize(X, name), X) and torch.equal(n.denormalize(X, name), X)
    assert make_normalizer(names=("x", "y"), stats=stats, field_configs={"y": {"enabled": False}}).applies_to("x")
    # Integer input still comes back float32.
    assert make_normalizer(names=("x",), stats=stats).normalize(torch.ones(2, 2, dtype=torch.long), "y").dtype == \
        torch.float32


def test_bad_normalizer_configs_are_refused():
    with pytest.raises(CheckpointError, match="min_max"):
        NormalizerConfig.from_dict({"method": "zscore"})
    with pytest.raises(CheckpointError, match="per_timestep"):
        NormalizerConfig.from_dict({"scope": "per_episode"})
    stats = synthetic_stats()
    del stats["x"]["percentile_99_per_timestep"]
    n = make_normalizer(stats=stats, method="percentile_1_99", scope="per_timestep")
    with pytest.raises(CheckpointError, match="percentile_99_per_timestep"):
        n.normalize(torch.zeros(4, 2), "x")


def test_normalizer_falls_back_to_the_processor_config(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps(synthetic_stats()))
    block = {"method": "min_max", "scope": "global", "centered_norm": False, "include_fields": ["x"]}
    (tmp_path / "config_processor.yaml").write_text(yaml.safe_dump({"normalization": block}))
    n = RoboticsNormalizer.from_experiment(tmp_path)
    c, s = center_scale("min_max")
    assert torch.allclose(n.normalize(X, "x"), (X - c) / s, atol=ATOL)
    with pytest.raises(CheckpointError, match="stats.json"):
        RoboticsNormalizer.from_experiment(tmp_path / "missing")


# ----------------------------------------------------------------------------- preprocessing: fixture

def test_fixture_preprocess(policy_fixture, cases, normalizer, fixture_io):
    e = expected(policy_fixture, "preprocess")
    c = cases["preprocess"]
    io = fixture_io
    assert io.image_names == c["image_names"] and io.action_fields == c["action_fields"]
    assert io.proprioception_fields == c["proprioception_fields"] and io.past_steps == c["anchor_timestep"]
    samples = []
    for b, instruction in enumerate(c["language_instructions"]):
        images = {name: e[f"input.raw_image.{b}.{name}"].numpy() for name in io.image_names}
        proprio = {f: e[f"input.raw_lowdim.{b}.{f}"].numpy() for f in io.proprioception_fields}
        samples.append(RawObservation(images, proprio, instruction))
    assert [prompt_for(s.instruction, len(io.image_names)) for s in samples] == c["prompts"]
    inputs = build_inputs(samples, io, normalizer, hf_processor(str(policy_fixture / "clip_tiny")), True)
    assert torch.equal(inputs.input_ids, e["output.input_ids"])
    assert torch.equal(inputs.attention_mask, e["output.attention_mask"])
    assert torch.equal(inputs.attention_mask_images, e["output.attention_mask_images"])
    assert inputs.pixel_values.shape == e["output.pixel_values"].shape
    assert torch.allclose(inputs.pixel_values, e["output.pixel_values"], atol=1e-5)
    # Proprioception is normalized over its whole window with anchor P, then cut to the first P+1 steps.
    assert inputs.proprioception.shape == e["output.proprioception"].shape == (2, io.past_steps + 1, 3)
    assert torch.allclose(inputs.proprioception, e["output.proprioception"], atol=1e-5)
    # No past actions were given: the action window is all unknown.
    assert not inputs.past_mask.any() and not inputs.actions.any()
    windows = [{f: e[f"input.raw_lowdim.{b}.{f}"].numpy() for f in io.action_fields} for b in range(2)]
    actions = normalize_fields(windows, io.action_fields, normalizer, io.past_steps)
    assert torch.allclose(actions, e["output.actions"], atol=1e-5)


def test_build_inputs_places_normalized_past_actions(policy_fixture, normalizer, fixture_io):
    e = expected(policy_fixture, "preprocess")
    io = fixture_io
    P = io.past_steps
    samples = []
    for b in range(2):
        images = {name: e[f"input.raw_image.{b}.{name}"].numpy() for name in io.image_names}
        proprio = {f: e[f"input.raw_lowdim.{b}.{f}"].numpy()[:P + 1] for f in io.proprioception_fields}
        past = {f: e[f"input.raw_lowdim.{b}.{f}"].numpy()[:P] for f in io.action_fields} if b == 0 else None
        samples.append(RawObservation(images, proprio, "go", past))
    inputs = build_inputs(samples, io, normalizer, hf_processor(str(policy_fixture / "clip_tiny")), True)
    # Sample 0 gave its past rows: they are the fixture's normalized window rows; sample 1 did not.
    assert inputs.past_mask.tolist() == [[True] * P + [False] * (io.action_steps - P), [False] * io.action_steps]
    assert torch.allclose(inputs.actions[0, :P], e["output.actions"][0, :P], atol=1e-5)
    assert not inputs.actions[0, P:].any() and not inputs.actions[1].any()
    # Proprioception given as just P+1 steps normalizes the same as the full window cut afterwards.
    assert torch.allclose(inputs.proprioception, e["output.proprioception"], atol=1e-5)


# ----------------------------------------------------------------------------- images and the robot I/O

def striped(h, w):
    """Left quarter red, middle half green, right quarter blue."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 4, 0] = 255
    image[:, w // 4: 3 * w // 4, 1] = 255
    image[:, 3 * w // 4:, 2] = 255
    return image


def test_resize_center_crop_covers_then_crops():
    out = resize_image(striped(40, 80), (20, 20), "center_crop")  # scale 0.5 → 20×40, keep columns 10…29
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:, 2:18, 1] == 255).all() and (out[:, 2:18, [0, 2]] == 0).all()  # only the green middle is left
    # Upscaling: the short side reaches the target, then the long one is cropped.
    up = resize_image(striped(10, 20), (30, 30), "center_crop")
    assert up.shape == (30, 30, 3) and (up[:, 10:20, 1] == 255).all()


def test_resize_no_crop_squashes_to_the_exact_size():
    out = resize_image(striped(40, 80), (20, 20), "resize_no_crop")
    assert out.shape == (20, 20, 3)
    assert (out[:, :4, 0] == 255).all() and (out[:, -4:, 2] == 255).all()  # every stripe survives


def test_resize_fit_pads_with_black():
    out = resize_image(np.full((40, 80, 3), 200, dtype=np.uint8), (20, 20), "resize_fit")  # → 10×20, centred
    assert out.shape == (20, 20, 3)
    assert (out[:5] == 0).all() and (out[15:] == 0).all()
    assert (out[5:15] == 200).all()
    tall = resize_image(np.full((80, 40, 3), 200, dtype=np.uint8), (20, 20), "resize_fit")
    assert (tall[:, :5] == 0).all() and (tall[:, 15:] == 0).all() and (tall[:, 5:15] == 200).all()


@pytest.mark.parametrize("method", ["center_crop", "resize_no_crop", "resize_fit"])
def test_resize_is_identity_at_the_target_size(method):
    image = striped(20, 24)
    assert resize_image(image, (20, 24), method) is image
    assert resize_image(image, None, method) is image


def test_resize_unknown_method_and_center_crop():
    with pytest.raises(ValueError, match="resize_fit"):
        resize_image(striped(20, 24), (10, 10), "stretch")
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    assert np.array_equal(center_crop(image, (4, 4)), image[1:5, 2:6])
    assert center_crop(image, (10, 4)) is image  # a crop larger than the image leaves it


def test_prompt_and_image_name_order():
    assert prompt_for("open the drawer", 2) == "<image> <image> open the drawer"
    assert image_names_for(["a", "b"], [-1, 0]) == ["a_t-1", "b_t-1", "a_t0", "b_t0"]  # index outer


def test_robot_io_from_the_fixture(fixture_io):
    io = fixture_io
    assert io.camera_names == ["scene_left", "wrist_right"]
    assert io.image_indices == [-1, 0]
    assert io.image_names == ["scene_left_t-1", "wrist_right_t-1", "scene_left_t0", "wrist_right_t0"]
    assert io.image_names == image_names_for(io.camera_names, io.image_indices)
    assert (io.past_steps, io.future_steps, io.action_steps) == (1, 6, 8)
    assert io.field_dims == {"robot__actual__poses__right::panda__xyz": 3,
                             "robot__action__poses__right::panda__xyz_relative": 3,
                             "robot__action__grippers__right::panda_hand": 1}
    assert (io.action_dim, io.proprioception_dim) == (4, 3)
    assert io.resize_images_size == [40, 48] and io.image_resizing_method == "center_crop"
    assert io.crop_shape is None  # the augmentation crop is disabled
    assert (io.processor, io.image_size, io.max_text_seq_len) == ("clip_tiny", 32, 77)


def test_robot_io_side_file_errors(tmp_path):
    stats = synthetic_stats(("arm",))
    with pytest.raises(CheckpointError, match="config_processor.yaml"):
        RobotIO.from_experiment(tmp_path, stats)
    data = {"camera_names": ["front"], "action_fields": ["arm"], "proprioception_fields": []}
    (tmp_path / "config_processor.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "preprocessing_config.yaml").write_text(yaml.safe_dump({0: {"image_resizing_method": "zoom"}}))
    with pytest.raises(CheckpointError, match="zoom"):  # entry 0 of a per-dataset file is read
        RobotIO.from_experiment(tmp_path, stats)
    (tmp_path / "preprocessing_config.yaml").write_text(yaml.safe_dump({"image_resizing_method": "resize_fit"}))
    io = RobotIO.from_experiment(tmp_path, stats)
    assert io.image_names == ["front_t0"] and io.image_resizing_method == "resize_fit" and io.action_dim == 2
    with pytest.raises(CheckpointError, match="'arm'"):
        RobotIO.from_experiment(tmp_path, {})


# ----------------------------------------------------------------------------- observation checks

@pytest.fixture
def io():
    """Cameras front and wrist, two frames each; P = 1; arm__pos [2] proprioception; actions arm__delta [2],
    gripper [1]."""
    return tiny_policy_io("none")


def frames(n=2):
    return [np.zeros((24, 40, 3), dtype=np.uint8) for _ in range(n)]


def good_observation():
    return dict(images={"front": frames(), "wrist": frames()}, lowdim={"arm__pos": [[0.1, 0.2], [0.3, 0.4]]},
                instruction="pick up the block", past_actions={"arm__delta": [[0.5, -0.5]], "gripper": [[1]]})


def parse(io, uses_language=True, **changes):
    return parse_observation(**{**good_observation(), **changes}, io=io, uses_language=uses_language)


def field_of(io, **changes):
    with pytest.raises(InvalidInputError) as error:
        parse(io, **changes)
    return error.value.field


def test_a_good_observation_is_keyed_by_image_name(io):
    obs = parse(io)
    assert list(obs.images) == ["front_t-1", "front_t0", "wrist_t-1", "wrist_t0"]
    assert sorted(obs.images) == sorted(io.image_names)
    assert obs.lowdim["arm__pos"].dtype == np.float32 and obs.lowdim["arm__pos"].shape == (2, 2)
    assert obs.past_actions["gripper"].dtype == np.float32 and obs.past_actions["gripper"].shape == (1, 1)
    assert parse(io, past_actions=None).past_actions is None


def test_camera_errors_name_the_camera(io):
    assert field_of(io, images={"front": frames(), "wrist": frames(), "top": frames()}) == "observation.images.top"
    assert field_of(io, images={"front": frames()}) == "observation.images.wrist"
    assert field_of(io, images={"front": frames(3), "wrist": frames()}) == "observation.images.front"
    assert field_of(io, images={"front": frames(), "wrist": frames(1)}) == "observation.images.wrist"


@pytest.mark.parametrize("value", [
    [[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]],  # wrong width
    [[0.1, 0.2]],  # P+1 = 2 steps needed
    [0.1, 0.2],  # not 2-D
    [[0.1, float("nan")], [0.3, 0.4]],
    [[0.1, float("inf")], [0.3, 0.4]],
    [[True, False], [True, True]],
    np.ones((2, 2), dtype=complex),
    np.array([[0.1, None], [0.3, 0.4]], dtype=object),
    [["0.1", "0.2"], ["0.3", "0.4"]],
    [[0.1, 0.2], [0.3]],  # ragged
], ids=["width", "steps", "rank", "nan", "inf", "bool", "complex", "object", "strings", "ragged"])
def test_bad_proprioception_names_the_field(io, value):
    assert field_of(io, lowdim={"arm__pos": value}) == "observation.lowdim.arm__pos"


def test_values_beyond_float32_are_named_as_such(io):
    """1e39 is finite as sent (JSON numbers are float64) but infinite in the policy's float32: the message says so,
    rather than calling the robot's value NaN or infinite."""
    for value in (1e39, -1e39, 3.5e38):
        with pytest.raises(InvalidInputError) as error:
            parse(io, lowdim={"arm__pos": [[0.1, value], [0.3, 0.4]]})
        assert error.value.field == "observation.lowdim.arm__pos"
        assert "beyond float32's range" in str(error.value) and "NaN" not in str(error.value), str(error.value)
    with pytest.raises(InvalidInputError, match="NaN or infinity"):
        parse(io, lowdim={"arm__pos": [[0.1, float("inf")], [0.3, 0.4]]})


def test_proprioception_field_set_errors(io):
    assert field_of(io, lowdim={}) == "observation.lowdim.arm__pos"
    assert field_of(io, lowdim={"arm__pos": [[0, 0], [0, 0]], "extra": [[0]]}) == "observation.lowdim.extra"
    assert parse(io, lowdim={"arm__pos": np.zeros((2, 2), dtype=np.int64)}).lowdim["arm__pos"].dtype == np.float32


def test_instruction_is_required_only_with_language(io):
    for missing in (None, "", "   "):
        assert field_of(io, instruction=missing) == "observation.language_instruction"
        assert parse(io, uses_language=False, instruction=missing).instruction == (missing or "")


def test_past_action_errors(io):
    assert field_of(io, past_actions={"arm__delta": [[0.5, -0.5], [0, 0]], "gripper": [[1]]}) == \
        "past_actions.arm__delta"  # P = 1 row
    assert field_of(io, past_actions={"arm__delta": [[0.5]], "gripper": [[1]]}) == "past_actions.arm__delta"
    assert field_of(io, past_actions={"arm__delta": [[0.5, -0.5]]}) == "past_actions.gripper"
    assert field_of(io, past_actions={"arm__delta": [[0.5, -0.5]], "gripper": [[float("nan")]]}) == \
        "past_actions.gripper"
    no_past = dataclasses.replace(io, past_steps=0)
    with pytest.raises(InvalidInputError) as error:
        parse_observation(**{**good_observation(), "lowdim": {"arm__pos": [[0.1, 0.2]]}}, io=no_past,
                          uses_language=True)
    assert error.value.field == "past_actions" and "P = 0" in str(error.value)


def test_parse_action_window(io):
    window = {"arm__delta": np.zeros((4, 2)), "gripper": [[1], [0], [1], [0]]}  # Ta = P+1+F = 4
    parsed = parse_action_window(window, io, "samples[0].actions")
    assert {k: (v.shape, v.dtype) for k, v in parsed.items()} == {"arm__delta": ((4, 2), np.float32),
                                                                   "gripper": ((4, 1), np.float32)}
    for bad, field in [({**window, "gripper": [[1]] * 3}, "samples[0].actions.gripper"),
                       ({"arm__delta": window["arm__delta"]}, "samples[0].actions.gripper"),
                       ({**window, "elbow": [[0]] * 4}, "samples[0].actions.elbow"),
                       ({**window, "arm__delta": np.full((4, 2), np.inf)}, "samples[0].actions.arm__delta")]:
        with pytest.raises(InvalidInputError) as error:
            parse_action_window(bad, io, "samples[0].actions")
        assert error.value.field == field


# ----------------------------------------------------------------------------- statistics writer

def test_field_stats_matches_numpy():
    rng = np.random.default_rng(0)
    windows = {"a": rng.normal(1.0, 2.0, (30, 5, 3)), "b": rng.uniform(-1, 1, (30, 5, 1))}
    stats = field_stats(windows)
    assert set(stats) == {"a", "b"}
    for name, x in windows.items():
        entry, flat = stats[name], x.reshape(-1, x.shape[-1])
        assert entry["count"] == 30
        assert np.allclose(entry["mean"], flat.mean(0)) and np.allclose(entry["std"], flat.std(0))
        assert np.allclose(entry["min"], flat.min(0)) and np.allclose(entry["max"], flat.max(0))
        assert np.allclose(entry["mean_per_timestep"], x.mean(0)) and np.allclose(entry["std_per_timestep"], x.std(0))
        assert np.allclose(entry["max_per_timestep"], x.max(0))
        for q in PERCENTILES:
            assert np.allclose(entry[f"percentile_{q}"], np.percentile(flat, q, axis=0))
            assert np.allclose(entry[f"percentile_{q}_per_timestep"], np.percentile(x, q, axis=0))
        assert np.array(entry["mean"]).shape == (x.shape[-1],)
        assert np.array(entry["percentile_99_per_timestep"]).shape == (5, x.shape[-1])
    json.dumps(stats)  # plain floats and lists: writable as stats.json


def test_field_stats_feed_the_normalizer():
    """Statistics written by field_stats are read by the normalizer: min_max maps each step's extremes to ±1."""
    x = np.random.default_rng(1).normal(size=(20, 3, 2))
    stats = field_stats({"f": x})
    n = RoboticsNormalizer(stats, NormalizerConfig.from_dict(
        {"method": "min_max", "scope": "per_timestep", "centered_norm": True, "include_fields": ["f"],
         "lowdim_past_timesteps": 1}))
    extremes = torch.tensor(np.stack([x.min(0), x.max(0)]), dtype=torch.float32)  # (2, Ts, D)
    out = n.normalize(extremes, "f", anchor_timestep=1)
    assert torch.allclose(out[0], -torch.ones(3, 2), atol=1e-5) and torch.allclose(out[1], torch.ones(3, 2), atol=1e-5)


def test_windows_as_long_as_the_stats_are_normalized_whole():
    """Stats window Ps = 2, Ts = 8 and a model window P = 1, F = 6 (also 8 rows): VLA Foundry normalizes the
    whole window with the stats rows as they are, then cuts it; past actions and proprioception rows must use
    the same rows, so a past action comes back unchanged."""
    import numpy as np
    import torch

    from vla_foundry.robotics.normalizer import NormalizerConfig, RoboticsNormalizer
    from vla_foundry.robotics.observations import RawObservation, build_inputs, split_actions
    from vla_foundry.robotics.processor import InputProcessor
    from vla_foundry.robotics.robot_io import RobotIO
    from vla_foundry.robotics.stats import field_stats

    rng = np.random.default_rng(0)
    stats = field_stats({"act": rng.normal(np.arange(8)[None, :, None], 1.0 + np.arange(8)[None, :, None],
                                           (50, 8, 2)),
                         "pos": rng.normal(0, 1 + np.arange(8)[None, :, None], (50, 8, 2))})
    config = NormalizerConfig.from_dict({"method": "std", "scope": "per_timestep", "include_fields": ["act", "pos"],
                                         "lowdim_past_timesteps": 2, "lowdim_future_timesteps": 5})
    normalizer = RoboticsNormalizer(stats, config)
    io = RobotIO(camera_names=["cam"], image_indices=[0], image_names=["cam_t0"], proprioception_fields=["pos"],
                 action_fields=["act"], field_dims={"act": 2, "pos": 2}, past_steps=1, future_steps=6)
    processor = InputProcessor(lambda frames: torch.zeros(len(frames), 3, 4, 4), None)  # pixels do not matter here
    past = {"act": np.array([[0.3, -0.2]], np.float32)}
    sample = RawObservation({"cam_t0": np.zeros((4, 4, 3), np.uint8)}, {"pos": np.ones((2, 2), np.float32)},
                            "", past)
    inputs = build_inputs([sample], io, normalizer, processor, uses_language=False)
    np.testing.assert_allclose(split_actions(inputs.actions, io, normalizer)["act"][0, 0].numpy(), [0.3, -0.2],
                               atol=1e-5)
    entry = stats["pos"]  # rows 0 and 1 of the stats, as the whole 8-row window uses them
    expected = (np.ones((2, 2)) - np.array(entry["mean_per_timestep"][:2])) / np.array(entry["std_per_timestep"][:2])
    np.testing.assert_allclose(inputs.proprioception[0].numpy(), expected, atol=1e-5)


def test_prompt_lengths_are_counted_once_per_distinct_prompt_and_still_refused_when_too_long(monkeypatch):
    """A robot repeats its instruction every step: its length is checked from a cache, not by tokenizing it again;
    a long one is refused with its field whether it was cached or not, and the cache stays bounded."""
    from vla_foundry.errors import InvalidInputError
    from vla_foundry.robotics import processor as processor_module
    from vla_foundry.robotics.processor import InputProcessor, check_prompt_length

    calls = []

    def text_fn(prompts, max_length):
        calls.append(list(prompts))
        lengths = [len(p.split()) for p in prompts]
        mask = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        return mask.clone(), mask

    processor = InputProcessor(lambda frames: torch.zeros(len(frames), 3, 4, 4), text_fn)
    assert processor.token_counts(["a b", "a b c", "a b"]) == [2, 3, 2]
    assert calls == [["a b", "a b c"]]  # each distinct prompt once
    assert processor.token_counts(["a b c", "a b", "d"]) == [3, 2, 1] and calls[-1] == ["d"]  # only the new one
    check_prompt_length(processor, ["a b", "a b c"], 3, ["x", "y"])  # at the limit: fine
    for _ in range(2):  # counted, then cached: refused alike, naming the field
        with pytest.raises(InvalidInputError) as refused:
            check_prompt_length(processor, ["a b", "a b c d"], 3, ["x", "y"])
        assert refused.value.field == "y" and "4 tokens" in str(refused.value)
    monkeypatch.setattr(processor_module, "TOKEN_COUNT_CACHE_SIZE", 5)
    assert processor.token_counts(["e", "f e"]) == [1, 2]  # would pass 5 cached: cleared first, answer whole
    assert len(processor._token_counts) <= 5 and processor.token_counts(["a b c d"]) == [4]


def test_prompt_rows_are_tokenized_once_and_batches_equal_the_tokenizers(policy_fixture, monkeypatch):
    """A processor whose tokenizer pads on the right keeps each prompt's row: batches of any prompts, repeated,
    reordered, cut or not, are exactly the tokenizer's own batches, and each distinct prompt is tokenized once
    per cut."""
    import random
    from collections import Counter

    from vla_foundry.robotics import processor as processor_module

    processor = hf_processor(str(policy_fixture / "clip_tiny"))
    assert processor.text_pad_id is not None
    tokenize, calls = processor.text_fn, []

    def counted(prompts, max_length):
        calls.append(list(prompts))
        return tokenize(prompts, max_length)

    processor.text_fn = counted
    rng = random.Random(0)
    words = "move the red block to a blue plate then stop <image>".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(6)]
    for max_length in (None, 6):
        for batch in ([prompts[0]], prompts[:3], prompts, prompts[::-1] + prompts[:2], [prompts[1]] * 3):
            ids, mask = processor.text(batch, max_length)
            expected_ids, expected_mask = tokenize(batch, max_length)
            assert ids.dtype == expected_ids.dtype and mask.dtype == expected_mask.dtype
            assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert Counter(p for call in calls for p in call) == {p: 2 for p in prompts}  # once per cut
    assert len({len(p.split()) for p in prompts}) > 1  # rows of different lengths were padded
    monkeypatch.setattr(processor_module, "TOKEN_COUNT_CACHE_SIZE", len(prompts) * 2)  # full now
    batch = [prompts[0], "a new one", prompts[1]]  # cached rows beside a new one: cleared, all tokenized again
    ids, mask = processor.text(batch, None)
    assert torch.equal(ids, tokenize(batch, None)[0]) and torch.equal(mask, tokenize(batch, None)[1])
    assert len(processor._rows) <= len(prompts) * 2


def test_the_data_config_says_how_the_hf_processor_is_loaded():
    """``use_hf_fast_tokenizer`` (default true) and PaliGemma's ``img_num_tokens``, as VLA Foundry's get_processor
    reads them; another processor's ``img_num_tokens`` is not applied."""
    assert HFProcessorLoading.from_data_config({"processor": "clip"}) == HFProcessorLoading(True, None)
    assert HFProcessorLoading.from_data_config({"processor": "clip", "use_hf_fast_tokenizer": False,
                                                "img_num_tokens": 64}) == HFProcessorLoading(False, None)
    assert HFProcessorLoading.from_data_config({"processor": "google/PaliGemma-3b-pt-224",
                                                "img_num_tokens": 64}).image_seq_length == 64


def test_a_paligemma_processor_takes_img_num_tokens(monkeypatch):
    """VLA Foundry sets a PaliGemma processor's ``image_seq_length`` (image placeholders per image) to the config's
    ``img_num_tokens``; other processors keep their own."""
    from transformers import AutoProcessor

    from vla_foundry.robotics.processor import load_hf_processor

    class Loaded:
        image_seq_length = 256

    monkeypatch.setattr(AutoProcessor, "from_pretrained", staticmethod(lambda path, **kwargs: Loaded()))
    for name, expected in (("google/paligemma-3b-pt-224", 64), ("HuggingFaceTB/SmolVLM-256M-Instruct", 256)):
        loading = HFProcessorLoading.from_data_config({"processor": name, "img_num_tokens": 64})
        assert load_hf_processor(name, loading).image_seq_length == expected


def test_a_policy_trained_with_the_slow_processor_is_served_with_it(policy_fixture, tmp_path):
    """``use_hf_fast_tokenizer: false``: VLA Foundry loads its processor with ``use_fast=False``, i.e. PIL's image
    processor, whose pixels differ from the fast one's; the served policy gets exactly those pixels, and keeps the
    setting when saved again."""
    import shutil

    from transformers import AutoProcessor

    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.robotics.experiment import save_policy_experiment

    experiment = shutil.copytree(policy_fixture, tmp_path / "slow")
    config = yaml.safe_load((experiment / "config_processor.yaml").read_text())
    (experiment / "config_processor.yaml").write_text(yaml.safe_dump({**config, "use_hf_fast_tokenizer": False}))
    frames = [np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8) for i in range(2)]
    slow, fast = load_pipeline(experiment), load_pipeline(policy_fixture)
    assert slow.robot_io.processor_loading.use_fast is False and fast.robot_io.processor_loading.use_fast is True
    pil = AutoProcessor.from_pretrained(policy_fixture / "clip_tiny", use_fast=False).image_processor
    expected = pil(images=frames, return_tensors="pt")["pixel_values"]
    assert torch.equal(slow.processor.pixel_values(frames), expected)
    assert not torch.allclose(fast.processor.pixel_values(frames), expected, atol=1e-3)
    save_policy_experiment(slow.model, tmp_path / "again", slow.robot_io, slow.normalizer.stats,
                           yaml.safe_load((experiment / "config_normalizer.yaml").read_text()))
    assert yaml.safe_load((tmp_path / "again" / "config_processor.yaml").read_text())["use_hf_fast_tokenizer"] is False


def test_raw_pixels_cross_to_the_device_as_bytes_and_are_the_host_floats(monkeypatch):
    """Processor "none": float 0…255 pixels (n, 3, S, S), each frame resized as VLA Foundry's pass-through processor
    resizes it (``Image.resize`` with PIL's default filter); given a device, the uint8 frames are what is copied there
    (a quarter of float32's bytes, no conversion on the host), and the floats are the host's exactly."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    processor = InputProcessor(RawPixels(32), None)
    host = processor.pixel_values(frames)
    expected = torch.from_numpy(np.stack([np.asarray(Image.fromarray(f).resize((32, 32))) for f in frames]))
    assert torch.equal(host, expected.permute(0, 3, 1, 2).float())
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # already S x S: as it is
    assert torch.equal(processor.pixel_values([square]), torch.from_numpy(square[None]).permute(0, 3, 1, 2).float())
    assert torch.equal(processor.pixel_values(frames, torch.device("cpu")), host)
    # Frames torch cannot share (a flipped view, a read-only array) are copied first, to the same pixels, silently;
    # a cropped view is read where it lies.
    flipped, frozen = square[::-1, ::-1].copy()[::-1, ::-1], square.copy()
    frozen.flags.writeable = False
    cropped = np.pad(square, ((4, 4), (4, 4), (0, 0)))[4:36, 4:36]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for odd in (flipped, frozen, cropped):
            assert torch.equal(processor.pixel_values([odd]), processor.pixel_values([square]))
    moved, real_to = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        moved.append(self.dtype)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    on_meta = processor.pixel_values(frames, torch.device("meta"))  # a device other than the host's
    assert moved == [torch.uint8]
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.shape == host.shape


@pytest.mark.parametrize("height", [3, 24])
def test_an_hf_processors_frames_a_few_pixels_tall_are_read_channels_last(policy_fixture, height):
    """Frames are (H, W, 3): an HF image processor left to guess read a frame 3 pixels tall as channels first."""
    from PIL import Image
    from transformers import AutoImageProcessor

    frame = np.random.default_rng(height).integers(0, 256, (height, 40, 3), dtype=np.uint8)
    pixels = hf_processor(str(policy_fixture / "clip_tiny")).image_fn([frame])
    reference = AutoImageProcessor.from_pretrained(str(policy_fixture / "clip_tiny"))
    assert torch.equal(pixels, reference(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"])


def test_processor_kwargs_reach_the_part_of_the_processor_they_belong_to(policy_fixture):
    """Spec §8.3 calls the processor with ``**processor_kwargs``, which gives the tokenizer its own: a text kwarg went
    to the image processor only (every pixel call raised TypeError, and the prompt was tokenized without it)."""
    from transformers import AutoProcessor

    path = str(policy_fixture / "clip_tiny")
    kwargs = {"add_special_tokens": False}
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2)]
    prompts = [prompt_for("open the drawer", 1), prompt_for("put the cup on the plate", 1)]
    expected = AutoProcessor.from_pretrained(path)(images=frames, text=prompts, padding=True, truncation=True,
                                                   max_length=77, return_tensors="pt", **kwargs)
    processor = hf_processor(path, kwargs)
    ids, mask = processor.text(prompts, 77)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert torch.equal(processor.image_fn(frames), expected["pixel_values"])


def test_a_saved_policys_field_configs_keep_their_order_in_every_file_that_holds_them(tmp_path):
    """Spec §12.2 takes the first field_configs key (in file order) that is in a field's name: the files were written
    with sorted keys, so "arm" came before "arm__" and arm__pos got std instead of min_max once saved."""
    from tests.factories import (POLICY_ACTIONS, POLICY_PROPRIO, tiny_model, tiny_policy_io, tiny_policy_params,
                                 tiny_policy_stats)
    from vla_foundry.params.clip import ViTBackboneParams
    from vla_foundry.robotics.experiment import normalizer_block, save_policy_experiment

    block = normalizer_block(list(POLICY_PROPRIO) + list(POLICY_ACTIONS), past=1, future=2)
    block["field_configs"] = {"arm__": {"method": "min_max", "scope": "global"},
                              "arm": {"method": "std", "scope": "global"}}
    model = tiny_model(tiny_policy_params(ViTBackboneParams(img_size=32, patch_size=8, hidden_dim=32, inter_dim=64,
                                                            n_heads=2, n_layers=2)))
    save_policy_experiment(model, tmp_path, tiny_policy_io("none"), tiny_policy_stats(), block)
    assert RoboticsNormalizer.from_experiment(tmp_path).config.for_field("arm__pos").method == "min_max"
    for name, read in (("config_processor.yaml", lambda c: c["normalization"]),
                       ("config.yaml", lambda c: c["data"]["normalization"])):
        kept = read(yaml.safe_load((tmp_path / name).read_text()))["field_configs"]
        assert list(kept) == ["arm__", "arm"], name
