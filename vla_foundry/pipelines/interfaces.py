"""What a server may call on a pipeline: one typed interface per modality.

The service reads a pipeline through these members only (``tests/service/test_contract.py``
checks every attribute it touches against them); anything else on a pipeline is its own
business and may change without touching the service. Each modality's pipeline class
satisfies its protocol (checked by the same test), so a new pipeline of an existing
modality is served by implementing these members.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import numpy as np

from vla_foundry.continuous import DEFAULT_PREFILL_TOKENS, ContinuousBatcher, Generation
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.action import ActionChunk, PolicyEvaluation, PolicyRequest
from vla_foundry.pipelines.caption import CaptionEvaluation
from vla_foundry.pipelines.image import ImagePlan, ImageRequest, ImageResult
from vla_foundry.pipelines.text import CompletionResult, TextEvaluation
from vla_foundry.robotics.observations import RawObservation
from vla_foundry.robotics.robot_io import RobotIO


class Served(Protocol):
    """Every pipeline: what ``GET /models`` shows, the warm-up before the first request, that requests come from
    now on (``serving``) and that they no longer do (``close``), and the batcher its generations share (None for
    every pipeline that does not generate text continuously)."""

    modality: str
    decodes_continuously: bool  # its generations can join a running batch (``continuous_batcher`` gives one)

    def io(self) -> dict[str, Any]: ...

    def checkpoint_info(self) -> dict[str, Any]: ...

    def warmup(self, max_batch_size: int = 1) -> None: ...

    def serving(self) -> None: ...

    def close(self) -> None: ...

    def continuous_batcher(self, max_sequences: int, max_cache_bytes: Optional[int] = None,
                           prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> Optional[ContinuousBatcher]: ...


class TextServing(Served, Protocol):
    tokenizer: Any  # None: token ids only (no text in, no text out)

    def render_chat(self, messages: list[dict]) -> str: ...

    # the rows ``complete`` would run, checked for their length: safe off the model thread (its own tokenizer)
    def prompt_ids(self, prompts: Optional[Sequence[str]] = None,
                   prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *, sampling: Any,
                   rendered: bool = False) -> list[list[int]]: ...

    def complete(self, prompts: Optional[Sequence[str]] = None,
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, **options: Any) -> CompletionResult: ...

    # ``complete``'s generation, for the pipeline's ContinuousBatcher (``continuous_batcher``)
    def start_completion(self, prompts: Optional[Sequence[str]] = None,
                         prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, **options: Any) -> Generation: ...

    def evaluate(self, input_ids=None, attention_mask=None, texts=None, seed: Optional[int] = None
                 ) -> dict[str, Any]: ...

    def evaluate_each(self, evaluations: Sequence[TextEvaluation]
                      ) -> list[dict[str, Any] | InvalidInputError]: ...  # an error: that evaluation's own failure


class CaptionServing(TextServing, Protocol):
    def caption(self, images, prompts: Optional[Sequence[str]] = None,
                prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, **options: Any) -> CompletionResult: ...

    def start_caption(self, images, prompts: Optional[Sequence[str]] = None,
                      prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, **options: Any) -> Generation: ...

    def check(self, image_counts: Sequence[int], prompts: Optional[Sequence[str]] = None,
              prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, **options: Any) -> None: ...

    def evaluate_each(self, evaluations: Sequence[CaptionEvaluation]  # type: ignore[override]
                      ) -> list[dict[str, Any] | InvalidInputError]: ...  # captions score with their images


class ImageServing(Served, Protocol):
    def plan(self, request: ImageRequest, max_inference_steps: Optional[int] = None) -> ImagePlan: ...

    def generate_each(self, plans: Sequence[ImagePlan]) -> list[ImageResult]: ...

    def evaluate(self, images: Sequence[np.ndarray], texts: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> dict[str, Any]: ...


class EncoderServing(Served, Protocol):
    def check(self, texts: Optional[Sequence[str]], images: Optional[Sequence[np.ndarray]],
              token_ids: Any = None) -> Any:
        """The request's checked inputs (its texts tokenized), what ``embed_each`` takes; ``token_ids``: those of
        an earlier check of the same texts."""

    def embed_each(self, requests: Sequence[Any]) -> list[dict[str, Any]]: ...

    def evaluate(self, texts: Sequence[str], images: Sequence[np.ndarray], seed: Optional[int] = None
                 ) -> dict[str, Any]: ...


class ActionServing(Served, Protocol):
    """A policy. Robot sessions (``vla_foundry.robotics.session``) take the pipeline itself, through these members."""

    robot_io: RobotIO  # cameras, fields and widths: what an observation must hold
    uses_language: bool
    n_action_steps: int  # the actions of a chunk a robot executes
    open_loop_steps: int  # a session's default: the actions it executes before it asks for the next chunk

    def anchor(self, timestamp: Optional[float], now: Optional[float] = None) -> float: ...  # stale: refused

    def valid_until(self, anchor: float, steps: int) -> float: ...

    def check_request(self, request: PolicyRequest) -> None: ...

    def check_magnitudes(self, name: str, rows: np.ndarray, where: str) -> None: ...  # rows the model overflows on

    def chunk_expiry(self, timestamp: Optional[float], *, steps: Optional[int] = None) -> Optional[float]: ...

    def predict_each(self, requests: Sequence[PolicyRequest], *, num_inference_steps: Optional[int] = None
                     ) -> list[ActionChunk | InvalidInputError]: ...  # an error: that request's own failure

    def evaluate(self, samples: Sequence[RawObservation], action_windows: Sequence[dict[str, np.ndarray]], *,
                 seed: Optional[int] = None, condition_on_past: bool = True) -> dict[str, Any]: ...

    def evaluate_each(self, evaluations: Sequence[PolicyEvaluation]
                      ) -> list[dict[str, Any] | InvalidInputError]: ...  # an error: that evaluation's own failure


INTERFACES: dict[str, type] = {"text": TextServing, "caption": CaptionServing, "image": ImageServing,
                               "encoder": EncoderServing, "action": ActionServing}
