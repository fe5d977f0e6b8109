"""Raw observations → the policy's model inputs, and its outputs → per-field actions.

One sample is ``RawObservation``: frames by image name (``scene_left_t-1`` …), raw lowdim
windows by field, the instruction and optionally the executed past actions.
``PolicyInputs.build`` batches samples into exactly what ``generate_actions`` takes:
pixel values ordered by ``image_names``, the prompt with one ``<image>`` per frame, the
normalized proprioception (P+1 steps) and the normalized action window with its past
mask (spec §8.3, §12.2: anchor timestep P).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from vla_foundry.errors import CheckpointError, InvalidInputError
from vla_foundry.robotics.normalizer import RoboticsNormalizer
from vla_foundry.robotics.processor import InputProcessor, center_crop, prompt_for, resize_image
from vla_foundry.robotics.robot_io import RobotIO


@dataclass
class RawObservation:
    images: dict[str, np.ndarray]  # image name → (h, w, 3) uint8
    lowdim: dict[str, np.ndarray]  # proprioception field → (P+1, d) raw, oldest first
    instruction: str = ""
    past_actions: Optional[dict[str, np.ndarray]] = None  # action field → (P, d) raw, oldest first


@dataclass
class PolicyInputs:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (B·N, 3, h, w)
    attention_mask_images: torch.Tensor  # (B, N) bool
    actions: torch.Tensor  # (B, Ta, A) normalized; zeros where unknown
    past_mask: torch.Tensor  # (B, Ta) bool: rows given by the robot
    proprioception: Optional[torch.Tensor] = None  # (B, P+1, Dp) normalized
    # A VLM processor's other outputs for the backbone (``pixel_attention_mask``, ``image_grid_thw``, …)
    backbone_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device, dtype=None) -> "PolicyInputs":
        """On ``device``; pixels (and the backbone's other float inputs) in the model's ``dtype``. Actions and
        proprioception stay float32: the sampling state and the past rows must not be rounded to bf16 (the model
        casts at its layers)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        cast = lambda t: t.to(device, dtype=dtype) if dtype is not None and t.is_floating_point() else move(t)  # noqa: E731
        return PolicyInputs(move(self.input_ids), move(self.attention_mask), cast(self.pixel_values),
                            move(self.attention_mask_images), move(self.actions), move(self.past_mask),
                            move(self.proprioception), {k: cast(v) for k, v in self.backbone_inputs.items()})

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, pixel_values=self.pixel_values, actions=self.actions,
                    attention_mask=self.attention_mask, attention_mask_images=self.attention_mask_images,
                    past_mask=self.past_mask, proprioception=self.proprioception, **self.backbone_inputs)


def prepare_frame(image: np.ndarray, io: RobotIO) -> np.ndarray:
    """A raw camera frame as the training data had it: resized by the preprocessing, then centre-cropped
    where training cropped."""
    image = resize_image(image, io.resize_images_size, io.image_resizing_method)
    return center_crop(image, io.crop_shape) if io.crop_shape else image


def normalize_fields(values: list[dict[str, np.ndarray]], fields: list[str], normalizer: RoboticsNormalizer,
                     anchor: int, window: Optional[int] = None) -> torch.Tensor:
    """Per-field raw windows of each sample → (B, T, Σd) normalized, fields concatenated in order.

    ``window``: the full window length (P+1+F) the first T rows belong to. VLA Foundry normalizes whole
    windows before cutting them; a window as long as the statistics takes their rows as they are, not
    anchored (spec §12.2), so such rows are normalized inside a padded full window.
    """
    columns = []
    for name in fields:
        raw = np.stack([np.asarray(v[name], dtype=np.float32) for v in values])  # (B, T, d)
        T = raw.shape[1]
        if window is not None and window > T and normalizer.timesteps(name) == window:
            raw = np.concatenate([raw, np.zeros((raw.shape[0], window - T, raw.shape[2]), np.float32)], axis=1)
        columns.append(normalizer.normalize(torch.from_numpy(raw), name, anchor_timestep=anchor)[:, :T])
    return torch.cat(columns, dim=-1)


def build_inputs(samples: list[RawObservation], io: RobotIO, normalizer: RoboticsNormalizer,
                 processor: InputProcessor, uses_language: bool, device: Optional[torch.device] = None
                 ) -> PolicyInputs:
    """The model inputs of ``samples``, on the CPU, except a raw-pixel processor's pixel values, which are made on
    ``device`` when one is given (``InputProcessor.pixel_values``); ``PolicyInputs.to`` moves the rest."""
    B, P, Ta = len(samples), io.past_steps, io.action_steps
    backbone_inputs: dict[str, torch.Tensor] = {}
    if processor.joint_fn is not None:  # a VLM's processor: images and prompt together
        images = [[prepare_frame(s.images[name], io) for name in io.image_names] for s in samples]
        backbone_inputs = processor.joint_fn(images, [s.instruction for s in samples])
        input_ids, attention_mask = backbone_inputs.pop("input_ids"), backbone_inputs.pop("attention_mask")
        pixel_values = backbone_inputs.pop("pixel_values")  # as the processor made them, e.g. (B, N, 3, h, w)
    else:
        frames = [prepare_frame(s.images[name], io) for s in samples for name in io.image_names]
        pixel_values = processor.pixel_values(frames, device)  # (B·N, 3, h, w)
        prompts = [prompt_for(s.instruction if uses_language else "", len(io.image_names)) for s in samples]
        input_ids, attention_mask = processor.text(prompts, io.max_text_seq_len)
    proprio = None
    if io.proprioception_fields:
        proprio = normalize_fields([s.lowdim for s in samples], io.proprioception_fields, normalizer, P, Ta)[:, :P + 1]
    actions = torch.zeros(B, Ta, io.action_dim)
    past_mask = torch.zeros(B, Ta, dtype=torch.bool)
    given = [s.past_actions is not None for s in samples]
    if P > 0 and any(given):
        # The P past rows with anchor P take the stats rows of steps −P…−1, as inside the full window.
        windows = [s.past_actions for s in samples if s.past_actions is not None]
        normalized = normalize_fields(windows, io.action_fields, normalizer, P, Ta)
        rows = torch.tensor(given)
        actions[rows, :P] = normalized[:, :P]
        past_mask[rows, :P] = True
    return PolicyInputs(input_ids, attention_mask, pixel_values,
                        torch.ones(B, len(io.image_names), dtype=torch.bool), actions, past_mask, proprio,
                        backbone_inputs)


def _numbers(value, shape: tuple, name: str) -> np.ndarray:
    """A finite real array of exactly ``shape``; errors name the field and the expected shape."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be a {_shape_text(shape)} array of numbers; its rows differ in length",
                                field=name) from None
    if array.dtype.kind not in "fiu":  # bool, complex, object and strings are refused
        raise InvalidInputError(f"{name} must hold real numbers (float or int); got dtype {array.dtype}", field=name)
    if array.shape != shape:
        raise InvalidInputError(f"{name} must be a {_shape_text(shape)} array; got shape {list(array.shape)}",
                                field=name)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInputError(f"{name} contains NaN or infinity; send finite values", field=name)
    with np.errstate(over="ignore"):  # beyond float32's range becomes infinity, refused just below
        narrowed = array.astype(np.float32)
    if not np.isfinite(narrowed).all():  # finite as sent (float64, a big int), too large for the policy's float32
        biggest = float(np.abs(array.astype(np.float64)).max())
        raise InvalidInputError(f"{name} holds {biggest:g}, beyond float32's range (±{np.finfo(np.float32).max:g}) "
                                "in which the policy computes; send the robot's real values", field=name)
    return narrowed


def _shape_text(shape: tuple) -> str:
    return "[" + "][".join(str(n) for n in shape) + "]"


def _check_keys(given, expected: list[str], name: str, what: str) -> None:
    unknown = [k for k in given if k not in expected]
    if unknown:
        raise InvalidInputError(f"{name}: unknown {what} {unknown[0]!r}; this policy takes {', '.join(expected)}",
                                field=f"{name}.{unknown[0]}")
    missing = [k for k in expected if k not in given]
    if missing:
        raise InvalidInputError(f"{name}: missing {what} {missing[0]!r}; this policy needs {', '.join(expected)}",
                                field=f"{name}.{missing[0]}")


def parse_observation(images: dict, lowdim: dict, instruction: Optional[str], past_actions: Optional[dict],
                      io: RobotIO, uses_language: bool, prefix: str = "observation") -> RawObservation:
    """Checks a robot's observation against the policy's I/O and returns it keyed by image name.

    ``images``: camera → decoded (h, w, 3) uint8 frames, one per image index, oldest first;
    ``lowdim``: proprioception field → [P+1][d]; ``past_actions``: action field → [P][d].
    """
    P, frames_per_camera = io.past_steps, len(io.image_indices)
    _check_keys(images or {}, io.camera_names, f"{prefix}.images", "camera")
    by_name = {}
    for camera, frames in images.items():
        if len(frames) != frames_per_camera:
            raise InvalidInputError(
                f"{prefix}.images.{camera}: {len(frames)} frames, but this policy takes {frames_per_camera} per camera "
                f"(image indices {io.image_indices}, oldest first)", field=f"{prefix}.images.{camera}")
        for index, frame in zip(io.image_indices, frames):
            by_name[f"{camera}_t{index}"] = frame
    missing = [n for n in io.image_names if n not in by_name]
    if missing:
        raise CheckpointError(f"image names {missing} of config_processor.yaml do not follow <camera>_t<index>")
    _check_keys(lowdim or {}, io.proprioception_fields, f"{prefix}.lowdim", "proprioception field")
    state = {name: _numbers(lowdim[name], (P + 1, io.field_dims[name]), f"{prefix}.lowdim.{name}")
             for name in io.proprioception_fields}
    if uses_language and not (instruction or "").strip():
        raise InvalidInputError(f"{prefix}.language_instruction is required: this policy is conditioned on language",
                                field=f"{prefix}.language_instruction")
    past = None
    if past_actions is not None:
        if P == 0:
            raise InvalidInputError("past_actions: this policy has no past window (P = 0); omit it",
                                    field="past_actions")
        _check_keys(past_actions, io.action_fields, "past_actions", "action field")
        past = {name: _numbers(past_actions[name], (P, io.field_dims[name]), f"past_actions.{name}")
                for name in io.action_fields}
    return RawObservation(by_name, state, instruction or "", past)


def split_actions(actions: torch.Tensor, io: RobotIO, normalizer: RoboticsNormalizer) -> dict[str, torch.Tensor]:
    """(B, Ta, A) normalized → {action field: (B, Ta, d) denormalized} (anchor P)."""
    out, start = {}, 0
    for name in io.action_fields:
        d = io.field_dims[name]
        out[name] = normalizer.denormalize(actions[..., start:start + d].float(), name, anchor_timestep=io.past_steps)
        start += d
    return out


def parse_action_window(window: dict, io: RobotIO, name: str) -> dict[str, np.ndarray]:
    """Raw action rows of every action field, (P+1+F, d) each: what the robot did and will do."""
    _check_keys(window or {}, io.action_fields, name, "action field")
    return {f: _numbers(window[f], (io.action_steps, io.field_dims[f]), f"{name}.{f}") for f in io.action_fields}
