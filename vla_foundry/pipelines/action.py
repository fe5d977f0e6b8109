"""Robot actions for the ``action`` modality: ``diffusion_policy``.

``ActionPipeline.from_experiment`` reads the robotics side files (``stats.json``, the
normalizer, processor and preprocessing configs); ``predict`` takes checked raw
observations and returns denormalized action chunks; ``evaluate`` the policy's loss on
observations paired with raw action windows. ``io()`` is the robot's contract, shown in
``GET /models``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from vla_foundry.errors import InvalidInputError, StaleObservationError
from vla_foundry.models.policy_graphs import PolicyGraphs
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.pipelines.base import Pipeline, register_pipeline
from vla_foundry.pipelines.text import make_generator, new_seed
from vla_foundry.robotics.normalizer import RoboticsNormalizer
from vla_foundry.robotics.observations import (PolicyInputs, RawObservation, build_inputs, normalize_fields,
                                               split_actions)
from vla_foundry.robotics.processor import InputProcessor, check_prompt_length, prompt_for
from vla_foundry.robotics.robot_io import RobotIO
from vla_foundry.schedulers import FlowMatchingScheduler, randn_like

DEFAULT_INFERENCE_STEPS = 10  # flow matching is accurate in few steps; a deployment may choose others


@dataclass
class PolicyRequest:
    """One robot's request in a batched ``predict_each`` call."""

    sample: RawObservation
    seed: Optional[int] = None  # None: a fresh one (reported back)
    noise: Optional[np.ndarray] = None  # (Ta, A) initial noise; overrides the seed's draw
    timestamp: Optional[float] = None  # the observation's time (Unix seconds, server clock); None: now
    step: Optional[int] = None  # the robot's control step, echoed in the chunk
    # When the server received it (Unix seconds): without a timestamp, its chunk is anchored there (None: when its
    # model call runs), so the time it waited counts against its valid_until.
    received_at: Optional[float] = None


def observed_at(timestamp: Optional[float], received_at: Optional[float], now: float) -> float:
    """When an observation was made, as far as the server can tell (what its actions' ``valid_until`` counts from):
    its timestamp, else when the server received it, else ``now``."""
    return timestamp if timestamp is not None else received_at if received_at is not None else now


@dataclass
class ActionChunk:
    """One robot's answer: a denormalized action chunk, and until when it may be executed.

    Ta = P+1+F rows (P past, the current one, F future), A = the action fields' widths added up.
    """

    actions: dict[str, np.ndarray]  # action field → (Ta, d) denormalized
    action_chunk: np.ndarray  # (Ta, A): the fields concatenated in ``action_fields`` order
    normalized_actions: np.ndarray  # (Ta, A): what the model sampled
    first_action_index: int  # P: the row to execute now (rows before it are the past)
    n_action_steps: int  # actions to execute from ``first_action_index`` before asking again
    action_fields: list[str]
    num_inference_steps: int
    seed: int
    checkpoint_step: Optional[int]  # the training step of the weights that made it
    valid_until: float  # the anchor (timestamp, else when sampling began) + n_action_steps control periods
    timestamp: Optional[float] = None  # the observation's, echoed
    step: Optional[int] = None  # the robot's control step, echoed (sessions fill it in)
    timing_ms: dict[str, float] = field(default_factory=dict)  # preprocess, infer


def resolve_processor(processor: Optional[str], experiment_dir: Path) -> Optional[str]:
    """A processor directory named relative to the experiment (as the fixtures do) resolves there."""
    if processor and processor != "none" and not Path(processor).is_absolute():
        candidate = experiment_dir / processor
        if candidate.exists():
            return str(candidate.resolve())
    return processor


@dataclass
class PolicyEvaluation:
    """One client's evaluation in a batched ``evaluate_each`` call: observations and their action windows."""

    samples: list[RawObservation]
    action_windows: list[dict[str, np.ndarray]]
    seed: Optional[int] = None  # None: a fresh one (reported back)
    condition_on_past: bool = True


def _scores(scores: dict[str, Any], seed: int) -> Union[dict[str, Any], InvalidInputError]:
    if not all(math.isfinite(v) for v in scores.values() if isinstance(v, float)):
        return InvalidInputError(f"the loss came out NaN or infinite ({scores}): the samples' numbers are far "
                                 "outside the range the policy was trained on; send the robot's real values",
                                 field="samples")
    return {**scores, "seed": seed}


FUTURE_TIMESTAMP_TOLERANCE_S = 5.0  # an observation's timestamp may be this far ahead of the server's clock

# How large a normalized proprioception or past-action value a session may record. Finite values far outside the
# statistics overflow inside the model, and the model call then refuses them (its actions come out NaN or
# infinite): the tiny test policy in float32 or bfloat16 overflowed between 2.5e19 and 2.5e24 (normalized), in
# float16 between 2.5e4 and 2.5e5. Checked without the model, values are refused past 1e12 (no robot reads 1e12
# times its training data's spread), and past the model dtype's largest value (float16: 65504, where the cast
# itself overflows; a float16 model may still overflow below it, and its model call then refuses the plan). A
# field the statistics leave as it is (not normalized) is bounded the same way, raw.
MAX_NORMALIZED_INPUT = 1e12


def overflowed(noise_given: bool = False) -> InvalidInputError:
    if noise_given:  # either may be at fault
        return InvalidInputError("the policy's actions came out NaN or infinite: the observation's or the noise's "
                                 "numbers are far outside the range the policy was trained on; send the robot's "
                                 "real values and standard normal noise", field="observation")
    return InvalidInputError("the policy's actions came out NaN or infinite: the observation's numbers are far outside "
                             "the range the policy was trained on; send the robot's real values", field="observation")


@register_pipeline("action")
class ActionPipeline(Pipeline):
    def __init__(self, model, robot_io: RobotIO, normalizer: RoboticsNormalizer, processor: InputProcessor, *,
                 num_inference_steps: Optional[int] = None, n_action_steps: Optional[int] = None,
                 open_loop_steps: Optional[int] = None, control_period_s: float = 0.1,
                 max_observation_age_s: Optional[float] = None, cuda_graphs: bool = True,
                 traced_sampling: bool = True):
        super().__init__(model)
        # A flow-matching policy samples from captured graphs (policy_graphs.py): one call without Python
        # between the ops, so the model does not wait for the interpreter lock at every op.
        self.graphs = PolicyGraphs(model, cuda_graphs=cuda_graphs, trace_on_cpu=traced_sampling)
        self.robot_io = robot_io
        self.normalizer = normalizer
        self.processor = processor
        self.batch_handler = create_batch_handler(model.params.type)
        if robot_io.action_dim != model.params.action_dim:
            raise ValueError(f"the action fields {robot_io.action_fields} add up to {robot_io.action_dim} values, but "
                             f"the model's action_dim is {model.params.action_dim}; the side files do not belong "
                             "to this checkpoint")
        if robot_io.proprioception_fields and robot_io.proprioception_dim != (model.params.proprioception_dim or 0):
            raise ValueError(f"the proprioception fields add up to {robot_io.proprioception_dim} values, but the "
                             f"model's proprioception_dim is {model.params.proprioception_dim}")
        if num_inference_steps is not None and not 1 <= num_inference_steps <= model.num_timesteps:
            raise ValueError(f"num_inference_steps must be 1…{model.num_timesteps} (the model's T); got "
                             f"{num_inference_steps}")
        self.num_inference_steps = num_inference_steps or min(DEFAULT_INFERENCE_STEPS, model.num_timesteps)
        # What a robot should execute before asking again: half the chunk from now on, by default.
        self.n_action_steps = n_action_steps or max(1, (robot_io.future_steps + 1) // 2)
        self.open_loop_steps = open_loop_steps or self.n_action_steps
        for name in ("n_action_steps", "open_loop_steps"):
            if not 1 <= getattr(self, name) <= robot_io.future_steps + 1:
                raise ValueError(f"{name} must be 1…{robot_io.future_steps + 1} (the current and future steps); "
                                 f"got {getattr(self, name)}")
        # Serving settings a robot must know (the server checks and echoes them; the model ignores them).
        self.control_period_s = control_period_s
        self.max_observation_age_s = max_observation_age_s

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, training_config: Optional[dict] = None,
                        num_inference_steps: Optional[int] = None, n_action_steps: Optional[int] = None,
                        open_loop_steps: Optional[int] = None, control_period_s: float = 0.1,
                        max_observation_age_s: Optional[float] = None, cuda_graphs: bool = True,
                        traced_sampling: bool = True, **_: Any) -> "ActionPipeline":
        normalizer = RoboticsNormalizer.from_experiment(experiment_dir)
        robot_io = RobotIO.from_experiment(experiment_dir, normalizer.stats)
        backbone = model.vision_language_backbone
        processor = backbone.input_processor(resolve_processor(robot_io.processor, Path(experiment_dir)),
                                             robot_io.image_size, robot_io.processor_kwargs,
                                             robot_io.processor_loading)
        return cls(model, robot_io, normalizer, processor, num_inference_steps=num_inference_steps,
                   n_action_steps=n_action_steps, open_loop_steps=open_loop_steps, control_period_s=control_period_s,
                   max_observation_age_s=max_observation_age_s, cuda_graphs=cuda_graphs,
                   traced_sampling=traced_sampling)

    @property
    def uses_language(self) -> bool:
        return bool(self.model.vision_language_backbone.uses_language)

    # ------------------------------------------------------------------ discovery

    def io(self) -> dict[str, Any]:
        r = self.robot_io
        return {
            "cameras": r.camera_names, "image_indices": r.image_indices, "image_names": r.image_names,
            "frames_per_camera": len(r.image_indices),
            "image": {"resize_to": r.resize_images_size, "resize_method": r.image_resizing_method,
                      "crop": r.crop_shape, "model_size": r.image_size, "format": "uint8 HxWx3 RGB, any size"},
            "proprioception": [{"field": f, "dim": r.field_dims[f], "steps": r.past_steps + 1}
                               for f in r.proprioception_fields],
            "actions": [{"field": f, "dim": r.field_dims[f]} for f in r.action_fields],
            "action_dim": r.action_dim, "past_steps": r.past_steps, "future_steps": r.future_steps,
            "action_steps": r.action_steps, "first_action_index": r.past_steps,
            "num_timesteps": self.model.num_timesteps, "default_inference_steps": self.num_inference_steps,
            "n_action_steps": self.n_action_steps, "open_loop_steps": self.open_loop_steps,
            "control_period_s": self.control_period_s, "max_observation_age_s": self.max_observation_age_s,
            # openpi's names: the actions a robot executes from each reply (an ActionChunkBroker built from it stays in
            # step with a session), and the rows a reply has
            "action_horizon": self.n_action_steps, "chunk_length": r.future_steps + 1,
            "uses_language": self.uses_language,
            "max_prompt_tokens": self.max_prompt_tokens if self.uses_language else None,
            "sampler": "flow_matching" if isinstance(self.model.scheduler, FlowMatchingScheduler) else "ddpm",
            "sampling_graphs": self.graphs.mode(),
        }

    # ------------------------------------------------------------------ serving contract

    @property
    def checkpoint_step(self) -> Optional[int]:
        """The training step of the loaded weights (echoed with every chunk); None for a model built in memory."""
        checkpoint = getattr(self.model, "checkpoint", None)
        return None if checkpoint is None else checkpoint.step

    def anchor(self, timestamp: Optional[float], now: Optional[float] = None) -> float:
        """The time a chunk is anchored at: the observation's timestamp, else now (Unix seconds, server clock).
        An observation older than ``max_observation_age_s`` is refused (``StaleObservationError``), not acted on."""
        now = time.time() if now is None else now
        if timestamp is None:
            return now
        if timestamp - now > FUTURE_TIMESTAMP_TOLERANCE_S:  # a clock far off: its valid_until would mean nothing
            raise InvalidInputError(
                f"the observation's timestamp {timestamp:.3f} is {timestamp - now:.3f} s ahead of the server's clock "
                f"(at most {FUTURE_TIMESTAMP_TOLERANCE_S:g} s is taken as clock skew); timestamps are Unix seconds on "
                "the server's clock: synchronize the robot's clock (NTP, PTP)", field="timestamp")
        limit = self.max_observation_age_s
        if limit is not None and now - timestamp > limit:
            raise StaleObservationError(
                f"the observation (timestamp {timestamp:.3f}) is {now - timestamp:.3f} s old, over this deployment's "
                f"freshness limit of {limit:g} s (max_observation_age_s); acting on it would be unsafe: send a "
                "fresh observation (timestamps are read on the server's clock)", field="timestamp")
        return timestamp

    def valid_until(self, anchor: float, steps: int) -> float:
        """Until when ``steps`` actions from ``anchor`` may be executed: one control period each."""
        return anchor + steps * self.control_period_s

    def chunk_expiry(self, timestamp: Optional[float], now: Optional[float] = None, *,
                     steps: Optional[int] = None) -> Optional[float]:
        """Until when the actions for an observation taken at ``timestamp`` could still be executed (their
        ``valid_until``: a chunk's ``n_action_steps`` control periods, or ``steps`` of them, 1 for a session's
        step): a server drops a request it could not start by then. None without a timestamp (the actions are
        anchored when they are made). An observation over ``max_observation_age_s``, or whose actions would
        already be past their ``valid_until``, is refused now (``StaleObservationError``)."""
        if timestamp is None:
            return None
        now = time.time() if now is None else now
        self.anchor(timestamp, now)
        steps = self.n_action_steps if steps is None else steps
        expiry = self.valid_until(timestamp, steps)
        if expiry <= now:
            raise StaleObservationError(
                f"the observation (timestamp {timestamp:.3f}) is {now - timestamp:.3f} s old: its actions would be "
                f"valid until {expiry:.3f} ({steps} control period{'s' if steps != 1 else ''} of "
                f"{self.control_period_s:g} s), already past; send a fresh observation (timestamps are read on the "
                "server's clock)", field="timestamp")
        return expiry

    @torch.inference_mode()
    def warmup(self, max_batch_size: int = 1) -> None:
        """One call at the default step count, then the sampling graph of every batch size up to
        ``max_batch_size`` (on CUDA, every bucket), so no robot's request waits for a capture (about a
        second each on CPU). The policy is serving from then on: a later shape at the default step count is
        captured without a call waiting for it, and other step counts sample eagerly (``PolicyGraphs``)."""
        r = self.robot_io
        size = r.resize_images_size or [r.image_size or 32] * 2
        frame = np.zeros((*size, 3), dtype=np.uint8)
        sample = RawObservation({n: frame for n in r.image_names},
                                {f: np.zeros((r.past_steps + 1, r.field_dims[f]), np.float32)
                                 for f in r.proprioception_fields}, "warm up")
        self.predict([sample], seed=0)
        self.graphs.capture(self._graph_inputs(self.prepare([sample])), self.num_inference_steps,
                            list(range(1, max_batch_size + 1)))

    def serving(self) -> None:
        """Requests come from now on, warmed up or not: a shape without a graph at the default step count is
        captured in the background, and other step counts sample eagerly (``PolicyGraphs.serve``)."""
        self.graphs.serve(self.num_inference_steps)

    def close(self) -> None:
        self.graphs.close()

    # ------------------------------------------------------------------ inference

    @property
    def max_prompt_tokens(self) -> Optional[int]:
        """The longest prompt (placeholders included): the data config's cut, within the text tower's reach."""
        if self.processor.joint_fn is not None:  # a VLM's prompt is its images' tokens too: the backbone checks it
            return None
        limits = [n for n in (self.robot_io.max_text_seq_len, self.model.vision_language_backbone.max_text_length)
                  if n]
        return min(limits) if limits else None

    def check_instructions(self, samples: Sequence[RawObservation], fields: Optional[Sequence[str]] = None) -> None:
        """Refuse an instruction the tokenizer would cut (the reference truncates silently)."""
        if self.uses_language:
            prompts = [prompt_for(s.instruction, len(self.robot_io.image_names)) for s in samples]
            fields = fields or ["observation.language_instruction"] * len(prompts)
            check_prompt_length(self.processor, prompts, self.max_prompt_tokens, fields)

    @functools.cached_property
    def max_normalized_input(self) -> float:
        """The largest normalized proprioception or past-action value a session may record (``MAX_NORMALIZED_INPUT``,
        or a float16 model's largest value: beyond it the row is infinite once cast)."""
        dtype = next(self.model.parameters()).dtype
        return min(MAX_NORMALIZED_INPUT, torch.finfo(dtype).max)

    def check_magnitudes(self, name: str, rows: np.ndarray, where: str) -> None:
        """Refuse raw rows (n, d) of proprioception or action field ``name`` whose values the model would overflow
        on, without the model: each row is normalized as the model call normalizes it, at every place of the
        window it may take (a session's row moves through the past rows step by step), and must stay finite and
        within ``max_normalized_input``. A session checks every row it records, including a step's that only
        hands out its plan (about 0.2 ms per field on a 2-core CPU, measured by a review: sessions only; a batch's
        requests are checked as the model reads them, ``beyond_range``)."""
        r = self.robot_io
        places = r.past_steps + 1 if name in r.proprioception_fields else r.past_steps  # its rows in a window
        rows = np.asarray(rows, np.float32).reshape(-1, r.field_dims[name])
        if places == 0 or not len(rows):
            return
        windows = [{name: np.repeat(row[None], places, axis=0)} for row in rows]
        normalized = normalize_fields(windows, [name], self.normalizer, r.past_steps, r.action_steps)  # (n, places, d)
        bad = self._out_of_range(normalized).flatten(1).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise self._far_outside(where, normalized[i].abs().max().item(), f"the row {rows[i].tolist()}")

    def _out_of_range(self, normalized: torch.Tensor) -> torch.Tensor:
        """Where normalized values are not finite or beyond ``max_normalized_input`` (same shape, bool)."""
        return ~torch.isfinite(normalized) | (normalized.abs() > self.max_normalized_input)

    def _far_outside(self, where: str, size: float, what: str = "a row") -> InvalidInputError:
        return InvalidInputError(
            f"{where}: {what} is far outside the range the policy was trained on: normalized with the checkpoint's "
            f"statistics it reaches {size:.3g}, beyond the {self.max_normalized_input:g} this policy takes (its "
            "actions would come out NaN or infinite, or saturated); send the robot's real values, in the units of the "
            "checkpoint's stats.json", field=where)

    def beyond_range(self, inputs: PolicyInputs) -> list[Optional[InvalidInputError]]:
        """Per request of a prepared batch, the refusal of a proprioception row or a past action the robot sent that
        is beyond ``max_normalized_input`` once normalized (or not finite), as a session refuses such a row when it
        records it; else None. Its answer would be the model's saturated output for numbers it was never trained
        near (1e13 in a joint position gave the same actions as 1e6). A comparison over the batch's normalized
        rows, on the model thread."""
        r = self.robot_io
        out: list[Optional[InvalidInputError]] = [None] * inputs.actions.shape[0]
        given = inputs.past_mask[..., None] if inputs.past_mask is not None else torch.zeros_like(inputs.actions,
                                                                                                   dtype=torch.bool)
        parts = [("past_actions", inputs.actions.float(), given, r.action_fields)]
        if inputs.proprioception is not None:
            parts.insert(0, ("observation.lowdim", inputs.proprioception.float(), True, r.proprioception_fields))
        for prefix, rows, sent, fields in parts:  # rows (B, T, D)
            bad = self._out_of_range(rows) & sent
            if not bool(bad.any()):
                continue
            ends = np.cumsum([r.field_dims[f] for f in fields])
            for i, column in bad.any(1).nonzero().tolist():
                if out[i] is None:
                    where = f"{prefix}.{fields[int(np.searchsorted(ends, column, side='right'))]}"
                    out[i] = self._far_outside(where, rows[i][bad[i]].abs().max().item())
        return out

    def check_request(self, request: PolicyRequest) -> None:
        """What ``predict_each`` would refuse in ``request`` alone (a stale observation, an instruction the tokenizer
        would cut, noise of the wrong shape), checked before it joins a batch, so a bad request never fails its
        neighbours. (Values the model overflows on, or would take beyond ``max_normalized_input``, are found in the
        batched call itself, which fails only that request, ``beyond_range``; a session checks its rows as it
        records them, ``check_magnitudes``.)"""
        self.anchor(request.timestamp)
        self.check_instructions([request.sample])
        if request.noise is not None:
            r = self.robot_io
            shape = tuple(np.shape(request.noise))
            if shape != (r.action_steps, r.action_dim):
                raise InvalidInputError(f"noise must be [{r.action_steps}][{r.action_dim}] (P+1+F steps × action "
                                        f"dim); got {list(shape)}", field="noise")

    def prepare(self, samples: Sequence[RawObservation]) -> PolicyInputs:
        self.check_instructions(samples)
        weight = next(self.model.parameters())
        inputs = build_inputs(list(samples), self.robot_io, self.normalizer, self.processor, self.uses_language,
                              device=weight.device)
        return inputs.to(weight.device, weight.dtype)

    def _steps(self, num_inference_steps: Optional[int]) -> int:
        steps = num_inference_steps or self.num_inference_steps
        if steps > self.model.num_timesteps:
            raise InvalidInputError(f"num_inference_steps must be <= {self.model.num_timesteps}, this policy's "
                                    f"diffusion steps T; got {steps}", field="num_inference_steps")
        return steps

    def _initial_noise(self, noise: np.ndarray, actions: torch.Tensor) -> torch.Tensor:
        """A request's noise, (Ta, A) or (B, Ta, A), checked against ``actions`` (B, Ta, A)."""
        r = self.robot_io
        initial_noise = torch.as_tensor(np.asarray(noise, dtype=np.float32))
        if initial_noise.dim() == 2:
            initial_noise = initial_noise[None].expand(actions.shape[0], -1, -1)
        if tuple(initial_noise.shape) != tuple(actions.shape):
            raise InvalidInputError(f"noise must be [{r.action_steps}][{r.action_dim}] (P+1+F steps × action "
                                    f"dim); got {list(initial_noise.shape[1:])}", field="noise")
        return initial_noise.to(actions)

    def _chunks(self, normalized: torch.Tensor, steps: int, seed: Any, started: float, prepared: float
                ) -> dict[str, Any]:
        r = self.robot_io
        per_field = split_actions(normalized.float().cpu(), r, self.normalizer)
        chunk = torch.cat(list(per_field.values()), dim=-1)  # (B, Ta, A)
        # Finite inputs far outside the statistics (3e38 for a joint position) overflow inside the model: such a
        # row is that request's failure (OVERFLOWED), never a reply with infinities.
        finite = (torch.isfinite(chunk).flatten(1).all(1) & torch.isfinite(normalized.float().cpu()).flatten(1).all(1))
        done = time.perf_counter()
        return {
            "finite": finite.tolist(),  # (B,) per row
            "actions": {name: values.numpy() for name, values in per_field.items()},  # (B, Ta, d)
            "action_chunk": chunk.numpy(),  # (B, Ta, A)
            "normalized_actions": normalized.float().cpu().numpy(),
            "first_action_index": r.past_steps, "n_action_steps": self.n_action_steps,
            "action_fields": list(r.action_fields), "num_inference_steps": steps, "seed": seed,
            "timing_ms": {"preprocess": (prepared - started) * 1000, "infer": (done - prepared) * 1000},
        }

    def _graph_inputs(self, inputs: PolicyInputs) -> dict[str, Optional[torch.Tensor]]:
        """``generate_actions``' inputs for a graph, every prompt padded to the longest allowed: one graph per
        batch size then serves any instruction (the model reads the padding as it reads the shorter prompts of
        a batch)."""
        kwargs = inputs.model_kwargs()
        if self.uses_language and self.max_prompt_tokens:
            kwargs["input_ids"], kwargs["attention_mask"] = self.processor.pad_text(
                kwargs["input_ids"], kwargs["attention_mask"], self.max_prompt_tokens)
        return kwargs

    def _sample(self, inputs: PolicyInputs, steps: int, generator, initial_noise: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """Normalized actions (B, Ta, A): from a captured graph where one serves (the generator then only draws
        the initial noise, as eager flow sampling uses it), else eagerly."""
        if self.graphs.enabled:
            if initial_noise is None:
                initial_noise = randn_like(inputs.actions, generator)
            return self.graphs.sample(self._graph_inputs(inputs), steps, initial_noise)
        return self.model.generate_actions(**inputs.model_kwargs(), num_inference_steps=steps, generator=generator,
                                           initial_noise=initial_noise)

    @torch.inference_mode()
    def predict(self, samples: Sequence[RawObservation], *, num_inference_steps: Optional[int] = None,
                seed: Optional[int] = None, noise: Optional[np.ndarray] = None) -> dict[str, Any]:
        """Denormalized action chunks for checked observations.

        ``noise``: the initial noise (B, Ta, A) or (Ta, A), used where no past action is given;
        else it is drawn from ``seed`` (one generator for the call), so the same seed gives
        the same actions.
        """
        started = time.perf_counter()
        inputs = self.prepare(samples)
        prepared = time.perf_counter()
        refused = next((error for error in self.beyond_range(inputs) if error is not None), None)
        if refused is not None:
            raise refused
        steps = self._steps(num_inference_steps)
        seed = new_seed() if seed is None else seed
        initial_noise = None if noise is None else self._initial_noise(noise, inputs.actions)
        normalized = self._sample(inputs, steps, make_generator(self.device, seed), initial_noise)
        out = self._chunks(normalized, steps, seed, started, prepared)
        if not all(out.pop("finite")):
            raise overflowed(noise is not None)
        return out

    @torch.inference_mode()
    def predict_each(self, requests: Sequence[PolicyRequest], *, num_inference_steps: Optional[int] = None
                     ) -> list[Union[ActionChunk, InvalidInputError]]:
        """Several robots' requests (each passed by ``check_request``) in one batched model call; each gets
        exactly what ``predict([sample], seed=…, noise=…)`` gives it alone (up to float rounding of the batched
        kernels), as its own ``ActionChunk`` (or, for a request whose actions overflowed, an
        ``InvalidInputError``: that request's failure, its neighbours unaffected).

        Each request draws from its own generator (its initial noise, and a DDPM policy's step
        noise), so its actions do not depend on which other requests share the batch.
        """
        now = time.time()
        started = time.perf_counter()
        inputs = self.prepare([request.sample for request in requests])
        prepared = time.perf_counter()
        steps = self._steps(num_inference_steps)
        seeds = [new_seed() if request.seed is None else request.seed for request in requests]
        generators = [make_generator(self.device, seed) for seed in seeds]
        # Row i's noise: its own, else drawn from its generator as a batch of one would draw it.
        initial_noise = torch.stack([
            self._initial_noise(request.noise, inputs.actions[i:i + 1])[0] if request.noise is not None
            else randn_like(inputs.actions[i], generator) for i, (request, generator) in
            enumerate(zip(requests, generators))])
        normalized = self._sample(inputs, steps, generators, initial_noise)
        batch = self._chunks(normalized, steps, None, started, prepared)
        refused = [error or (None if finite else overflowed(request.noise is not None))  # each its own failure
                   for error, finite, request in zip(self.beyond_range(inputs), batch["finite"], requests)]
        return [refused[i] if refused[i] is not None else ActionChunk(
            actions={k: v[i] for k, v in batch["actions"].items()}, action_chunk=batch["action_chunk"][i],
            normalized_actions=batch["normalized_actions"][i], first_action_index=batch["first_action_index"],
            n_action_steps=self.n_action_steps, action_fields=batch["action_fields"], num_inference_steps=steps,
            seed=seed, checkpoint_step=self.checkpoint_step,
            valid_until=self.valid_until(observed_at(request.timestamp, request.received_at, now),
                                         self.n_action_steps),
            timestamp=request.timestamp, step=request.step, timing_ms=dict(batch["timing_ms"]))
            for i, (request, seed) in enumerate(zip(requests, seeds))]

    # ------------------------------------------------------------------ evaluation

    def loss_batch(self, samples: Sequence[RawObservation], action_windows: Sequence[dict[str, np.ndarray]],
                   condition_on_past: bool = True) -> dict[str, torch.Tensor]:
        """Model-level batch for the batch handler: observations + raw action windows (Ta, d) per field."""
        r = self.robot_io
        fields = [f"samples[{i}].observation.language_instruction" for i in range(len(samples))]
        self.check_instructions(samples, fields)
        inputs = build_inputs(list(samples), r, self.normalizer, self.processor, self.uses_language)
        actions = normalize_fields(list(action_windows), r.action_fields, self.normalizer, r.past_steps)
        past_mask = torch.zeros(actions.shape[:2], dtype=torch.bool)
        if condition_on_past:
            past_mask[:, :r.past_steps] = True
        return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask,
                "pixel_values": inputs.pixel_values, "attention_mask_images": inputs.attention_mask_images,
                "actions": actions, "past_mask": past_mask, "proprioception": inputs.proprioception,
                "backbone_inputs": inputs.backbone_inputs}

    @torch.inference_mode()
    def evaluate(self, samples: Sequence[RawObservation], action_windows: Sequence[dict[str, np.ndarray]], *,
                 seed: Optional[int] = None, condition_on_past: bool = True) -> dict[str, Any]:
        (out,) = self.evaluate_each([PolicyEvaluation(list(samples), list(action_windows), seed, condition_on_past)])
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def evaluate_each(self, evaluations: Sequence["PolicyEvaluation"]) -> list[Union[dict[str, Any], Exception]]:
        """Several clients' evaluations in one forward pass; each gets what ``evaluate`` gives it alone (its own
        seed's noise and timesteps, its loss over its own rows; up to float rounding of the batched kernels), or
        its own ``InvalidInputError`` (a loss that overflowed, no row to score). Samples that cannot be batched
        together raise for the whole call (a caller then runs each alone, as the server does)."""
        samples = [s for e in evaluations for s in e.samples]
        windows = [w for e in evaluations for w in e.action_windows]
        batch = self.loss_batch(samples, windows, condition_on_past=True)
        row = 0
        for e in evaluations:  # past rows are fed clean per evaluation, as it asked
            if not e.condition_on_past:
                batch["past_mask"][row:row + len(e.samples)] = False
            row += len(e.samples)
        seeds = [new_seed() if e.seed is None else e.seed for e in evaluations]
        outs = self.batch_handler.compute_loss_each(self.model, batch, [len(e.samples) for e in evaluations],
                                                    [make_generator(self.device, seed) for seed in seeds])
        return [out if isinstance(out, Exception) else _scores(out.to_dict(), seed) for out, seed in zip(outs, seeds)]
