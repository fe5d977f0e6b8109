"""OpenAI-compatible text API for every text and caption deployment: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (with ``stream: true`` as server-sent events).

The official ``openai`` client works unchanged: ``base_url="http://host:8000/v1"`` and the
deployment name as ``model``. Defaults follow OpenAI's (temperature 1, top_p 1, no top-k,
16 tokens for completions); ``top_k`` is accepted as an extension. Chat uses the
tokenizer's (or HF processor's) chat template; caption deployments take ``image_url``
content parts with ``data:`` URLs. Parameters this server cannot honour (logprobs, echo,
penalties, tools, …) are refused by name rather than silently ignored.
"""

# No `from __future__ import annotations`: FastAPI reads the per-app request classes from the real annotations.

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, ClassVar, Iterator, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from service.codecs import encode_response
from service.dependencies import get_manager
from service.deployments import Deployment, DeploymentManager
from service.disconnects import unless_client_leaves
from service.errors import ApiError
from service.images import decode_image_value
from service.middleware import DecodedBodyRoute
from service.modalities.base import ModelCall, Number, each
from service.modalities.text import stop_list, usage_of
from service.openapi_extra import operation_openapi, schema_ref
from service.streaming import SSE_DONE, DeltaStream, sse, sse_error
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.interfaces import CaptionServing, TextServing
from vla_foundry.pipelines.text import new_seed
from vla_foundry.sampling import SamplingParams

logger = logging.getLogger("service")

TEXT_MODALITIES = ("text", "caption")
OWNER = "vla-foundry"


# ----------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Optional[StrictBool] = Field(None, description="A last chunk with the request's token usage.")
    include_obfuscation: Optional[StrictBool] = Field(None, description="Accepted, and changes nothing here (OpenAI "
                                                                        "pads its events against side channels).")


class OpenAIRequest(BaseModel):
    # Unknown fields are refused by name (a typo must not silently change nothing).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cap_max_new_tokens: ClassVar[int] = 1024  # set per app (see add_openai_routes)
    cap_batch: ClassVar[int] = 64
    cap_images: ClassVar[int] = 16
    # Parameters this server cannot honour, with the values that mean "off" (accepted, since clients send them).
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"logprobs": (None, False), "presence_penalty": (None, 0),
                                               "frequency_penalty": (None, 0), "logit_bias": (None, {})}

    model: Optional[str] = Field(None, description="Deployment name (GET /v1/models); optional when one text or "
                                                   "caption deployment is served.")
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, lt=2**31, description="Extension: 0 = off.")
    n: StrictInt = Field(1, ge=1, description="Choices per prompt.")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = Field(None, description="Only with `stream: true`.")
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    user: Optional[str] = None
    # Accepted only at values that change nothing:
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, float]] = None

    # Fields an OpenAI client may send as null to mean "the default" (as OpenAI reads them).
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = ("temperature", "top_p", "top_k", "n", "stream")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in cls.NULL_MEANS_DEFAULT):
            data = {k: v for k, v in data.items() if not (v is None and k in cls.NULL_MEANS_DEFAULT)}
        return data

    @model_validator(mode="after")
    def _check_common(self):
        for name, off in self.UNSUPPORTED.items():
            value = getattr(self, name)
            # (None and booleans by identity: `logprobs: 0` asks for log probabilities, though 0 == False)
            if not any(value is o if o is None or isinstance(o, bool) else value == o for o in off):
                raise InvalidInputError(f"`{name}` is not supported by this server; drop it (got {value!r})",
                                        field=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidInputError("stream_options is only allowed with `stream: true`", field="stream_options")
        stop = stop_list(self.stop)
        if len(stop) > 4:
            raise InvalidInputError(f"at most 4 stop sequences; got {len(stop)}", field="stop")
        if self.max_new_tokens > self.cap_max_new_tokens:
            name = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) else "max_tokens"
            raise InvalidInputError(f"{name} must be <= {self.cap_max_new_tokens}; got {self.max_new_tokens}",
                                    field=name)
        return self

    @property
    def max_new_tokens(self) -> int:
        """The length asked for; without one, the API's default, within the server's cap (chat: the cap; also
        ``max_completion_tokens``). Only a length the client sent is refused for being over the cap."""
        if "max_tokens" in self.model_fields_set and self.max_tokens is not None:
            return self.max_tokens
        return min(self.max_tokens or self.cap_max_new_tokens, self.cap_max_new_tokens)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = Field(16, ge=1)
    echo: StrictBool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**OpenAIRequest.UNSUPPORTED, "echo": (False,), "best_of": (None, 1),
                                               "suffix": (None,)}
    NULL_MEANS_DEFAULT: ClassVar[tuple[str, ...]] = (*OpenAIRequest.NULL_MEANS_DEFAULT, "max_tokens", "echo")

    @model_validator(mode="after")
    def _check(self):
        rows = len(self.prompt_rows()[0] or self.prompt_rows()[1] or [])
        if rows == 0:
            raise InvalidInputError("`prompt` is empty; send at least one prompt", field="prompt")
        if rows * self.n > self.cap_batch:
            raise InvalidInputError(f"prompts × n must be <= {self.cap_batch}; got {rows} × {self.n}", field="n")
        return self

    def prompt_rows(self) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
        """(texts, token id rows): exactly one is set."""
        p = self.prompt
        if isinstance(p, str):
            return [p], None
        if p and all(isinstance(x, int) for x in p):
            return None, [p]
        if p and all(isinstance(x, list) for x in p):
            return None, p
        return p, None


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    # What an OpenAI client's own reply message carries (``message.model_dump()`` sent back in the next turn):
    # accepted empty, and ignored; tool and function calls and audio are not supported.
    refusal: Optional[str] = None
    annotations: Optional[list[Any]] = None
    audio: Optional[Any] = None
    function_call: Optional[Any] = None
    tool_calls: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _check(self):
        for name in ("audio", "function_call", "tool_calls"):
            if getattr(self, name):
                raise InvalidInputError(f"`{name}` in a message is not supported by this server (it has no tools, "
                                        "functions or audio); drop it", field="messages")
        return self


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[StrictBool] = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**OpenAIRequest.UNSUPPORTED, "top_logprobs": (None, 0),
                                               "tools": (None, []), "tool_choice": (None, "none")}

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or super().max_new_tokens

    def sampling(self) -> SamplingParams:
        # No length given: generate until eos, the server's cap or the end of the model's context.
        unbounded = self.max_completion_tokens is None and self.max_tokens is None
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p, fit_context=unbounded)

    @model_validator(mode="after")
    def _check(self):
        if self.response_format not in (None, {"type": "text"}):
            raise InvalidInputError("only response_format {\"type\": \"text\"} is supported", field="response_format")
        if self.n > self.cap_batch:
            raise InvalidInputError(f"n must be <= {self.cap_batch}; got {self.n}", field="n")
        images = sum(1 for m in self.messages if isinstance(m.content, list) for p in m.content
                     if p.type == "image_url")
        if images > self.cap_images:
            raise InvalidInputError(f"{images} images, over this server's limit of {self.cap_images} per request "
                                    "(VLA_MAX_IMAGES); send fewer", field="messages")
        return self

    def conversation(self) -> tuple[list[dict], list[Any]]:
        """Messages for a chat template and the image values in order. With images, content stays a list of
        parts (image parts become ``{"type": "image"}``, as HF processors' templates expect); without, every
        content is plain text, which any template takes. A ``developer`` message is OpenAI's newer name for a
        ``system`` one, and goes to the template as ``system`` (the role templates know; many refuse others)."""
        roles = [_TEMPLATE_ROLES.get(m.role, m.role) for m in self.messages]
        if not any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content)
                   for m in self.messages):
            return [{"role": role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.text or "" for p in (m.content or []))} for role, m in zip(roles, self.messages)], []
        messages, images = [], []
        for i, (role, m) in enumerate(zip(roles, self.messages)):
            if m.content is None or isinstance(m.content, str):
                messages.append({"role": role, "content": m.content or ""})
                continue
            parts = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                else:
                    url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                    if not url:
                        raise InvalidInputError("an image_url part needs image_url.url",
                                                field=f"messages[{i}].content[{j}]")
                    images.append((url, f"messages[{i}].content[{j}].image_url"))
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        return messages, images


_TEMPLATE_ROLES = {"developer": "system"}  # OpenAI's role → the one chat templates know


# ----------------------------------------------------------------------------- work on the deployment's thread


# Pipeline errors name the /predict fields; a /v1 client sent these instead.
V1_FIELDS = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}


def _v1_names(error: InvalidInputError, request: Any, chat: bool = False) -> InvalidInputError:
    """The same error (same class, so the same status) in the names the /v1 client sent (a chat's prompt is its
    ``messages``; its length is ``max_completion_tokens`` where it sent that)."""
    length = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    message = str(error).replace("max_new_tokens", length).replace("prompt_token_ids", "prompt")
    field = {**V1_FIELDS, "max_new_tokens": length}.get(error.field, error.field)
    if chat and field == "prompt":
        message = message.replace("prompt[0]", "messages").replace("the prompt is", "the messages are")
        field, message = "messages", message.replace("the prompt", "the messages")
    return type(error)(message, field=field)


async def _v1_named(request: Any, chat: bool, reply: Awaitable[Any]) -> Any:
    """``reply``, with a refusal made after the request was queued in the /v1 client's names (a model process
    checks a generation's input in its own process, where ``_run_job`` does not name it)."""
    try:
        return await reply
    except InvalidInputError as e:
        raise _v1_names(e, request, chat) from e


@dataclass(frozen=True)
class V1Prompt:
    """A ``/v1`` request's prompt as the model thread takes it: its token rows (a completion's prompts, a text
    chat), or a chat with images as its rendered text and decoded images (a caption model's processor tokenizes
    them together)."""

    ids: Optional[list[list[int]]] = None
    text: Optional[str] = None
    images: Optional[list] = None


def run_completion(pipeline: TextServing, request: CompletionRequest, ids: list[list[int]], on_text=None,
                   start: bool = False):
    """The request's completions of its prompts' token rows ``ids`` (``start``: its generation, for the
    deployment's continuous batcher)."""
    n = request.n
    complete = pipeline.start_completion if start else pipeline.complete
    return complete(None, [r for r in ids for _ in range(n)], sampling=request.sampling(),
                    stop=request.stop_strings(), seed=request.seed, on_text=on_text)


def decode_chat_images(request: ChatRequest, image_limits: dict) -> tuple[list[dict], list]:
    """The conversation and its decoded images (run off the event loop, before the request queues)."""
    messages, image_values = request.conversation()
    return messages, [decode_image_value(value, field=field, **image_limits) for value, field in image_values]


def run_chat(pipeline: CaptionServing, request: ChatRequest, prompt: V1Prompt, on_text=None, start: bool = False):
    """The chat's choices (``start``: its generation, for the deployment's continuous batcher)."""
    n = request.n
    common = dict(sampling=request.sampling(), stop=request.stop_strings(), seed=request.seed, on_text=on_text)
    if prompt.images:
        return (pipeline.start_caption if start else pipeline.caption)([prompt.images] * n, [prompt.text] * n,
                                                                       rendered=True, **common)
    return (pipeline.start_completion if start else pipeline.complete)(None, prompt.ids * n, **common)


def v1_rows(request: Any, prompt: V1Prompt) -> int:
    """The sequences a ``/v1`` request decodes: ``n`` choices of each prompt row (a chat has one)."""
    return (len(prompt.ids) if prompt.ids else 1) * request.n


def v1_prompt(pipeline: TextServing, request: Any, conversation: Optional[tuple[list[dict], list]]) -> V1Prompt:
    """The request's prompt, rendered and tokenized, and checked for its length (off the model thread and the
    event loop: a prompt of megabytes is refused here, where it holds up nobody's tokens)."""
    try:
        if conversation is None:
            texts, ids = request.prompt_rows()
            return V1Prompt(ids=pipeline.prompt_ids(texts, ids, sampling=request.sampling()))
        messages, images = conversation
        text = pipeline.render_chat(messages)
        if images:
            return V1Prompt(text=text, images=images)
        return V1Prompt(ids=pipeline.prompt_ids([text], sampling=request.sampling(), rendered=True))
    except InvalidInputError as e:
        raise _v1_names(e, request, chat=conversation is not None) from e


@dataclass(frozen=True)
class V1Job:
    """A decoded ``/v1`` request: what its ``ModelCall`` carries to the model thread."""

    request: Any  # CompletionRequest or ChatRequest
    prompt: V1Prompt
    on_text: Optional[Callable] = None  # streaming: called with each row's new text as it is made


def _run_job(pipeline: TextServing, job: V1Job, start: bool = False):
    chat = isinstance(job.request, ChatRequest)
    try:
        if not chat:
            return run_completion(pipeline, job.request, job.prompt.ids, job.on_text, start)
        return run_chat(pipeline, job.request, job.prompt, job.on_text, start)
    except InvalidInputError as e:
        raise _v1_names(e, job.request, chat) from e


def start_v1(pipeline: TextServing, job: V1Job):
    """A ``/v1`` request's generation for a continuously batching deployment (``ModelCall.start``)."""
    return _run_job(pipeline, job, start=True)


run_v1 = each(_run_job)  # where the deployment does not batch continuously: one request per model call


# ----------------------------------------------------------------------------- routes


def _deployment(manager: DeploymentManager, name: Optional[str]) -> Deployment:
    if name is None:
        loading = [d.name for d in manager.deployments.values() if d.modality is None and d.status == "loading"]
        if loading:  # their type is not known yet
            raise ApiError(503, f"deployments are still loading ({', '.join(loading)}); retry shortly, or name "
                                "one in `model`", retry_after=5)
        served = [d for d in manager.deployments.values() if d.modality in TEXT_MODALITIES]
        if len(served) != 1:
            raise ApiError(422, "name the deployment in `model`; text and caption deployments: "
                                f"{', '.join(d.name for d in served) or '(none)'}", field="model")
        return served[0]
    deployment = manager.get(name)
    if deployment.modality is not None and deployment.modality not in TEXT_MODALITIES:
        raise ApiError(404, f"deployment {name!r} serves {deployment.modality!r}, not text; the /v1 API serves text "
                            f"and caption deployments (POST /predict/{deployment.model_type} for this one)",
                       field="model")
    return deployment


def _check_tokenizer(deployment: Deployment) -> None:
    pipeline = deployment.pipeline
    if pipeline is not None and pipeline.tokenizer is None:
        raise ApiError(422, f"deployment {deployment.name!r} has no tokenizer, so it cannot return text; use "
                            f"POST /predict/{deployment.model_type} with token ids", field="model")


# The 200 of the generating routes in /openapi.json: the JSON reply, or the stream of server-sent events.
V1_GENERATED = {200: {"description": "The completion (OpenAI's shape); with `stream: true`, server-sent events: one "
                                     "`data: <chunk JSON>` per step's text, ending with `data: [DONE]`.",
                      "content": {"application/json": {"schema": {"type": "object"}},
                                  "text/event-stream": {"schema": {"type": "string"}}}}}


def add_openai_routes(app: FastAPI, settings) -> None:
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=DecodedBodyRoute)
    caps = {"cap_max_new_tokens": settings.max_new_tokens, "cap_batch": settings.max_batch,
            "cap_images": settings.max_images}
    image_limits = {"max_pixels": settings.max_image_pixels, "max_bytes": settings.max_body_bytes}
    completion_cls = type("CompletionRequest", (CompletionRequest,), {"__module__": __name__, **caps})
    chat_cls = type("ChatCompletionRequest", (ChatRequest,), {"__module__": __name__, **caps})

    @router.get("/models", summary="Text and caption deployments, OpenAI style", openapi_extra=operation_openapi())
    async def list_models(manager: DeploymentManager = Depends(get_manager)):
        data = [{"id": d.name, "object": "model", "created": d.created, "owned_by": OWNER, "type": d.model_type,
                 "status": d.status}
                for d in manager.deployments.values() if d.modality in TEXT_MODALITIES]
        return {"object": "list", "data": data}

    @router.get("/models/{name}", summary="One text or caption deployment, OpenAI style",
                openapi_extra=operation_openapi())
    async def get_model(name: str, manager: DeploymentManager = Depends(get_manager)):
        d = _deployment(manager, name)
        return {"id": d.name, "object": "model", "created": d.created, "owned_by": OWNER, "type": d.model_type,
                "status": d.status}

    @router.post("/completions", summary="Text completions (OpenAI legacy completions)", responses=V1_GENERATED,
                 openapi_extra=operation_openapi(schema_ref(completion_cls), deadline=True))
    async def completions(body: completion_cls, request: Request, manager: DeploymentManager = Depends(get_manager)):
        deployment = _deployment(manager, body.model)
        _check_tokenizer(deployment)
        return await _respond(deployment, body, request, "text_completion", "cmpl", None)

    @router.post("/chat/completions", summary="Chat completions (images as image_url parts for caption models)",
                 responses=V1_GENERATED, openapi_extra=operation_openapi(schema_ref(chat_cls), deadline=True))
    async def chat_completions(body: chat_cls, request: Request, manager: DeploymentManager = Depends(get_manager)):
        deployment = _deployment(manager, body.model)
        _check_tokenizer(deployment)
        if deployment.modality == "text" and any(
                isinstance(m.content, list) and any(p.type == "image_url" for p in m.content) for m in body.messages):
            raise ApiError(422, f"deployment {deployment.name!r} is a text model; image_url parts need a caption "
                                "deployment", field="messages")
        conversation = await run_in_threadpool(decode_chat_images, body, image_limits)
        return await _respond(deployment, body, request, "chat.completion", "chatcmpl", conversation)

    app.include_router(router)


async def _respond(deployment: Deployment, body: OpenAIRequest, request: Request, kind: str, id_prefix: str,
                   conversation: Optional[tuple]):
    response_id = f"{id_prefix}-{secrets.token_hex(12)}"
    created = int(time.time())
    chat = kind == "chat.completion"
    if body.seed is None:  # drawn here, so that every chunk of a stream can report it as a reply does
        body.seed = new_seed()
    deployment.check_ready()  # a deployment loading or failed has no pipeline to tokenize with (503)
    pipeline = deployment.current().pipeline
    if pipeline is None:  # unloaded meanwhile
        raise ApiError(503, f"deployment {deployment.name!r} was unloaded; retry, or name another", retry_after=1)
    prompt = await run_in_threadpool(v1_prompt, pipeline, body, conversation)
    if not body.stream:
        started = time.perf_counter()
        call = ModelCall(run_v1, V1Job(body, prompt), start=start_v1, rows=v1_rows(body, prompt))
        timed = await _v1_named(body, chat, unless_client_leaves(request, deployment.call(call), deployment.name))
        result = timed.value
        choices = [({"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                     "logprobs": None} if chat else
                    {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None})
                   for i, c in enumerate(result.completions)]
        payload = {"id": response_id, "object": kind, "created": created, "model": deployment.name,
                   "choices": choices, "usage": usage_of(result, body.n), "system_fingerprint": f"seed-{result.seed}",
                   "timing_ms": {"queue": round(timed.queue_ms, 3), "infer": round(timed.run_ms, 3),
                                 "total": round((time.perf_counter() - started) * 1000, 3)}}
        request.app.state.metrics.observe_reply(deployment.name, payload)
        return encode_response(payload, request.headers.get("accept", ""))

    stream = DeltaStream()
    received = request.state.received_at  # set by RequestMetrics, the server's metrics middleware
    # A client that leaves before the first token drops the generation unrun (it may still be queued).
    await _v1_named(body, chat, unless_client_leaves(request, stream.start(deployment.call(ModelCall(
        run_v1, V1Job(body, prompt, stream.on_text), start=start_v1, rows=v1_rows(body, prompt)))), deployment.name))
    metrics = request.app.state.metrics
    first_token = time.perf_counter()
    metrics.first_token_seconds.labels(deployment.name).observe(first_token - received)
    chunk_kind = kind + ".chunk" if chat else kind

    def chunk(choices: list, **extra) -> str:
        return sse({"id": response_id, "object": chunk_kind, "created": created, "model": deployment.name,
                    "system_fingerprint": f"seed-{body.seed}", "choices": choices,
                    **({"usage": None} if body.include_usage else {}), **extra})  # (OpenAI: null but in the last)

    def chunks(deltas: list) -> Iterator[str]:
        for row, text, _, finish in deltas:
            if not text and finish is None and (row in started or not chat):
                continue  # tokens that do not show as text yet (a partial character, a possible stop string)
            if chat:
                delta: dict = {}
                if row not in started:
                    started.add(row)
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                yield chunk([{"index": row, "delta": delta, "finish_reason": finish, "logprobs": None}])
            else:
                yield chunk([{"index": row, "text": text or "", "finish_reason": finish, "logprobs": None}])

    started: set = set()

    async def events():
        # One write per list of deltas, one event per row in it: what arrived together (a stream that fell behind
        # its generation, or the rows of one step) costs the client one event per row, not one per token.
        streamed, counted = 0, False  # tokens sent so far; whether the reply's usage counted its tokens
        try:
            async for deltas in stream.batches():
                streamed += sum(len(ids) for _, _, ids, _ in deltas)
                payload = "".join(chunks(deltas))
                if payload:
                    yield payload
            result = stream.result().value
            usage = usage_of(result, body.n)
            metrics.observe_reply(deployment.name, {"usage": usage})
            counted = True
            # Rows decode side by side, one token each per step: the longest spans the first token to the last.
            steps = max((len(c.token_ids) for c in result.completions), default=0)
            if steps > 1:
                metrics.token_pace_seconds.labels(deployment.name).observe(
                    (time.perf_counter() - first_token) / (steps - 1))
            yield (chunk([], usage=usage) if body.include_usage else "") + SSE_DONE
        except InvalidInputError as e:
            yield sse_error(422, str(e), request.scope) + SSE_DONE
        except ApiError as e:  # the service's own refusal (its model process died, say): in-band as it is
            logger.warning("streamed generation on %s ended: %s", deployment.name, e.message)
            yield sse_error(e.status, e.message, request.scope, field=e.field, type=e.type) + SSE_DONE
        except Exception as e:  # the stream has started: the error goes in-band, without internals
            logger.exception("streamed generation on %s failed", deployment.name)
            yield sse_error(500, f"generation failed ({type(e).__name__}); the server log has details",
                            request.scope) + SSE_DONE
        finally:  # a stream that ended early (its client left, an error, the drain): the tokens it was sent
            if not counted and streamed:
                metrics.tokens.labels(deployment.name).inc(streamed)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
