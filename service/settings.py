"""Service settings: the deployment YAML, ``VLA_*`` environment variables and CLI flags.

Precedence, highest first: CLI flags, the deployment YAML (``--config``/``VLA_CONFIG``),
``VLA_*`` variables, defaults. With no deployment anywhere the service serves the demo pack.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vla_foundry.checkpoint import resolve_dtype
from vla_foundry.continuous import DEFAULT_PREFILL_TOKENS
from vla_foundry.demo_paths import DEFAULT_DEMO_DIR


DEPLOYMENT_NAME = re.compile(r"(?!\.{1,2}$)(?! )[^/\\?#%\x00-\x1f\x7f]{1,128}(?<! )")


class DeploymentSpec(BaseModel):
    """One checkpoint to serve."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    name: Optional[str] = Field(None, description="Unique name; defaults to the checkpoint directory's name.",
                                json_schema_extra={"minLength": 1, "maxLength": 128,
                                                   "pattern": DEPLOYMENT_NAME.pattern})
    checkpoint: str = Field(..., min_length=1, description="A VLA Foundry experiment directory.")
    checkpoint_file: Optional[str] = Field(None, description="A weights file in checkpoints/; default: the latest "
                                                             "(its ema_N.pt when the run used EMA).")
    use_ema: Optional[bool] = Field(None, description="Force EMA weights on or off; default: config.yaml ema.enabled.")
    device: Optional[str] = Field(None, description="Overrides the top-level device.")
    dtype: Optional[str] = Field(None, description="Overrides the top-level dtype.")
    tokenizer: Optional[str] = Field(None, description="Text models: a tokenizer directory or cached hub id that "
                                                       "replaces the checkpoint's.")
    num_inference_steps: Optional[int] = Field(None, ge=1, description="Policies: default denoising steps "
                                                                       "(default 10, at most the model's T).")
    n_action_steps: Optional[int] = Field(None, ge=1, description="Policies: actions a robot should execute "
                                                                  "before asking again (default: half the chunk "
                                                                  "from the current step).")
    open_loop_steps: Optional[int] = Field(None, ge=1, description="Policies, step mode: actions handed out "
                                                                   "from one plan before replanning (default: "
                                                                   "n_action_steps).")
    control_period_s: float = Field(0.1, gt=0, description="Policies: the robot's control period; a chunk is valid "
                                                           "until its timestamp + n_action_steps periods.")
    max_observation_age_s: Optional[float] = Field(None, gt=0, description="Policies: observations whose timestamp "
                                                                           "is older than this (server clock) are "
                                                                           "refused with 409; none: no limit.")
    max_batch_size: Optional[int] = Field(None, ge=1, description="Overrides the top-level max_batch_size.")
    batch_wait_ms: Optional[float] = Field(None, ge=0, le=1000, description="Overrides the top-level "
                                                                           "batch_wait_ms.")
    request_timeout_s: Optional[float] = Field(None, gt=0, le=3600, description=(
        "Default deadline of this deployment's requests, in seconds from arrival (a request's "
        "X-Request-Timeout may set an earlier one): one still waiting then gets 504 and never runs."))
    max_queue_ms: Optional[float] = Field(None, gt=0, description=(
        "Refuse a request (503, Retry-After) when the expected wait for the model thread is longer."))
    max_queue_calls: Optional[float] = Field(None, gt=0, le=1000, description=(
        "As max_queue_ms, in this deployment's calls: refuse a request when the expected wait is longer than this "
        "many of its recent calls of the request's kind, as measured while it serves (a full batch of "
        "max_batch_size for requests that batch, until one has run the largest measured; a lone call for those "
        "that do not; no bound before its first call). 0.5 admits a request only when the model is about free, "
        "whatever the hardware; with max_queue_ms too, the lesser bound holds. A generation's wait for a "
        "continuous batcher's slots is no call: max_queue_ms alone bounds that part."))
    model_process: Optional[bool] = Field(None, description="Policies, text and captions: overrides the top-level "
                                                            "model_process.")

    @property
    def resolved_name(self) -> str:
        return self.name or Path(self.checkpoint.rstrip("/")).name

    @model_validator(mode="after")
    def _named(self) -> "DeploymentSpec":
        if self.name is None and not DEPLOYMENT_NAME.fullmatch(self.resolved_name):
            raise ValueError(f"the checkpoint {self.checkpoint[:80]!r} gives no usable deployment name (its folder's "
                             "name); give it a `name:` (or --checkpoint DIR=NAME)")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        # A name is a URL segment (/models/{name}, /admin/deployments/{name}), a metrics label and a log field.
        if v is not None and not DEPLOYMENT_NAME.fullmatch(v):
            raise ValueError(f"a deployment name is 1-128 characters, none of them / \\ ? # % or a control character, "
                             f"no space at either end, and not . or ..; got {v[:40]!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else checked_device(v, "deployments[].device")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else checked_dtype(v, "deployments[].dtype")


def checked_device(value: str, setting: str) -> str:
    """``value`` when it names a device this server knows (auto, cpu, cuda, cuda:N); else an error naming
    ``setting``."""
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(f"{setting} must be auto, cpu, cuda or cuda:N (N a GPU's index, e.g. cuda:0); got {value!r}")
    return value


def checked_dtype(value: str, setting: str) -> str:
    """``value`` when the loader takes it as a dtype; else an error naming ``setting`` and the allowed values."""
    try:
        resolve_dtype(value)  # the loader's own check, so that what passes here loads
    except ValueError:
        raise ValueError(f"{setting} must be auto, float32, bfloat16 or float16; got {value!r}") from None
    return value


class Settings(BaseSettings):
    # Errors never echo the input (it holds the API keys); an empty variable is unset (`VLA_X=` in a shell or an
    # env file means "not given", not the empty string).
    model_config = SettingsConfigDict(env_prefix="VLA_", extra="forbid", hide_input_in_errors=True,
                                      env_ignore_empty=True, allow_inf_nan=False)

    config: Optional[Path] = Field(None, description="Deployment YAML file (device, dtype, deployments).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto = cuda:0 when present).")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16 (auto = float32 on CPU; on CUDA "
                                           "bfloat16 for checkpoints trained in bf16).")
    deployments: list[DeploymentSpec] = Field(default_factory=list, description=(
        "Checkpoints to serve: the deployment YAML's `deployments:` list (entries below); as a variable, JSON. "
        "None anywhere: the demo pack."))
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    demo_dir: Path = Field(DEFAULT_DEMO_DIR, description="Where the demo pack is built and served from.")
    replicas: Union[Annotated[int, Field(ge=1)], Literal["per-gpu"]] = Field(1, description=(
        "Server processes behind the one address (`vla-foundry serve`; each loads every deployment and batches its "
        "own requests): a count, spread over the GPUs in turn (CPU replicas on a host without GPUs), or `per-gpu`: "
        "replicas_per_gpu on each GPU of `gpus`. More than one needs VLA_SESSION_STORE for robot sessions on HTTP "
        "that any replica may serve."))
    replicas_per_gpu: int = Field(1, ge=1, le=64, description=(
        "With replicas per-gpu: replicas sharing each GPU (small policies leave most of a GPU idle)."))
    gpus: Optional[str] = Field(None, description=(
        "The GPUs replicas are given, as CUDA_VISIBLE_DEVICES names them (`0,1` or UUIDs; `none`: CPU replicas); "
        "none: those CUDA_VISIBLE_DEVICES names, else every GPU of the host. Only with replicas (refused with one "
        "server process, which takes its GPU from device)."))
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Request bodies above this get 413.")
    max_body_keys: int = Field(10_000, ge=100, description="Request bodies and websocket frames with more map keys "
                                                           "than this in all get 413 (1009 on a websocket), before "
                                                           "anything validates them.")
    max_queue: int = Field(64, ge=1, description="Requests waiting per deployment before 503 (overloaded).")
    max_new_tokens: int = Field(1024, ge=1, description="Cap on max_new_tokens per request.")
    max_batch: int = Field(64, ge=1, description="Cap on prompts (or sequences) per request.")
    max_images: int = Field(16, ge=1, description="Cap on images per request, sent or asked for (more get 422).")
    max_inference_steps: int = Field(1000, ge=1, description="Cap on num_inference_steps of image requests.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Cap on width x height of one image, checked "
                                                                  "from its header before decoding (more get 413).")
    max_request_pixels: int = Field(4 * 4096 * 4096, ge=1, description=(
        "Cap on the decoded pixels of all the images of one request (or websocket frame), each claimed from its "
        "header before it is decoded (more get 413)."))
    max_pixels_in_flight: int = Field(16 * 4096 * 4096, ge=1, description=(
        "Cap on the decoded image pixels held by all the requests in flight at once; an image that would pass it "
        "gets 503 with Retry-After (about 3 bytes of memory per pixel)."))
    max_ws_frame_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest websocket frame; a larger one "
                                                                         "closes the connection with 1009.")
    max_sessions: int = Field(256, ge=1, description="Robot sessions kept at once; the least recently used idle "
                                                      "one is evicted for a new one.")
    session_idle_timeout_s: float = Field(300.0, gt=0, description="Robot sessions idle longer than this expire.")
    session_store: Optional[str] = Field(None, description=(
        "A Redis URL (redis://host:6379/0) where robot sessions' states are kept, so that every replica serves "
        "every session and a session outlives the replica that made it (each step pulls the state and stores the "
        "new one with a compare-and-set); none: each session lives in the process that made it."))
    session_state_max_bytes: int = Field(16 * 2**20, ge=1024, description=(
        "With VLA_SESSION_STORE: the largest state one session may store (its recent frames, plan and counters); "
        "a step that would store more is refused (413) and not kept."))
    max_batch_size: Optional[int] = Field(None, ge=1, description=(
        "Queued requests of one deployment that may share one model call (policy predictions); default 32 on "
        "CUDA, 8 on the CPU; 1 turns batching off."))
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description=(
        "How long a free model thread waits for more requests before running a batch that is not full (never past "
        "the deadline of a request it holds); 0 never delays a lone request."))
    continuous_batching: Optional[bool] = Field(None, description=(
        "Text and caption generations decode together: a new request joins the running batch between decode steps "
        "and a finished one leaves at once (up to max_batch_size sequences; HF families whose cache cannot be kept "
        "in slots, e.g. sliding-window ones, always generate one request at a time); false: one request's "
        "generation at a time. None: on, except on CUDA "
        "with cuda_graphs, where one request's decode steps replay from a CUDA graph (a continuous batch's steps, "
        "a lone sequence's included, replay from CUDA graphs too, but one client through each is not yet measured "
        "side by side on a GPU)."))
    kv_cache_mb: Optional[float] = Field(None, gt=0, description=(
        "Cap on a continuously batching deployment's KV cache (allocated once, max_batch_size sequences of the "
        "model's full context); fewer sequences run together when they would not fit, and a request of more "
        "sequences than that, which runs by itself with a cache of its own, gets what the cap leaves beside them "
        "(more is refused); none: a quarter of the "
        "memory free at load (the GPU's on CUDA, the host's on the CPU), and a model of which not even one sequence "
        "fits then generates one request at a time."))
    prefill_tokens_per_step: int = Field(DEFAULT_PREFILL_TOKENS, ge=1, description=(
        "Prompt tokens a continuously batching deployment prefills between two decode steps (a longer prompt gets "
        "a step of its own), so new requests cannot stall the running ones for long."))
    switch_interval_ms: Optional[float] = Field(None, gt=0, le=100, description=(
        "The interpreter's thread switch interval (sys.setswitchinterval), in ms: how long a busy thread (the event "
        "loop under a flood of requests) may keep the interpreter lock before a model thread that waits for it gets "
        "it; none: Python's 5 ms."))
    torch_threads: Union[Annotated[int, Field(ge=1, le=1024)], Literal["auto"]] = Field("auto", description=(
        "Threads torch's CPU operators use in this process: a count, or `auto`: the CPUs the process may use (its "
        "affinity, bounded by a container's CPU quota) less one kept for the event loop, at least one; with "
        "OMP_NUM_THREADS set, auto leaves torch that many. Oversubscribed cores stall every parallel operator "
        "(see service/torch_threads.py)."))
    drain_timeout_s: float = Field(30.0, ge=0, le=3600, description=(
        "On SIGTERM or Ctrl-C: stop accepting connections, let requests and robot websockets in flight finish for "
        "at most this long in all, "
        "then cancel what is left and exit 0 (Docker's stop_grace_period should exceed it). Not read under Ray "
        "Serve, which drains a replica itself within its graceful_shutdown_timeout_s (README, Scaling out with "
        "Ray Serve)."))
    shed_pacing_s: float = Field(1.0, ge=0, le=30, description=(
        "Hold an overload refusal (503 overloaded) for between half of this and all of it before sending it "
        "(less when the request's deadline is sooner), with Retry-After less the time held: clients that retry at "
        "once then retry about once per period, not thousands of times a second; 0 sends it at once."))
    shed_retries_per_s: float = Field(0.0, ge=0, le=1_000_000, description=(
        "With shed_pacing_s: hold an overload refusal for half to all of the longer of the wait that refused it "
        "and (refusals held now) / this, at most shed_pacing_s, so that clients retrying at once come back about "
        "4/3 of this many times a second in all; 0: hold every one half of shed_pacing_s to all of it. For deployments "
        "in model processes, whose event loop refusing does not slow the model: with 500, the demo policy in "
        "batches of 1 met every overload goal in three runs of four (README, Reliability suite; "
        "service/deadlines.py)."))
    light_requests_per_s: float = Field(500.0, ge=0, le=1_000_000, description=(
        "While any model is at work, GET, HEAD and OPTIONS requests (probes, listings, /metrics, the docs) are "
        "served at most this many a second; more wait their turn (at most 0.5 s), so a client flooding them cannot "
        "take the model's CPU; 0 never paces them."))
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description=(
        "A connection's request headers must arrive within this long of its opening (or of the next request's "
        "first byte); else 408 and the connection closes (silently if it sent nothing)."))
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description=(
        "A request's whole body must arrive within this long of its headers (in all, not per chunk); else 408 "
        "and the connection closes, and nothing runs for the request."))
    metrics_public: bool = Field(False, description=(
        "Serve GET /metrics without an API key (for a scraper on a trusted network); by default it needs one, as "
        "every route but the health probes and the docs."))
    model_process: bool = Field(False, description=(
        "Policies, and text and caption deployments with continuous batching: run each deployment's model in a child "
        "process of its own (spawned at load; the server keeps a copy of the pipeline on the CPU for the checks and "
        "the tokenizer), so the event loop and the model no longer share one interpreter lock and a busy server uses "
        "two cores instead of one (2-core CPU: 16 robots on the demo policy about 1.5x the requests per second, 8 "
        "streaming clients of the demo transformer about 1.6x the tokens per second). Costs the weights in memory "
        "twice and 0.5-1 ms per policy call, or per first token, on a 2-core CPU (service/model_process.py, "
        "service/text_process.py)."))
    model_process_restarts: int = Field(3, ge=0, le=1000, description=(
        "With model_process: how many times a deployment restarts a model process that died (killed, out "
        "of memory) within 10 minutes; it refuses requests with 503 and Retry-After while the new one loads and "
        "warms up, and past that many it stays failed; 0: never restart."))
    model_process_start_timeout_s: float = Field(600.0, gt=0, le=86400, description=(
        "With model_process: how long a model process may take to load its checkpoint (at load and at a "
        "restart); one that has not is stopped, and the deployment fails with that reason."))
    warmup: bool = Field(True, description="Run one small call per deployment before reporting ready.")
    gc_freeze: bool = Field(True, description=(
        "Once a deployment has loaded, collect garbage and freeze what is alive (gc.freeze), so the cyclic garbage "
        "collector's full collections no longer walk the models' and libraries' objects (on a 2-core CPU each "
        "walk paused the whole server for 250-300 ms, every few seconds under load); unloading a deployment "
        "collects its model with the frozen objects and freezes again."))
    cuda_graphs: bool = Field(True, description=(
        "On CUDA, replay from captured CUDA graphs: text decoding (one request's steps, and a continuous batch's "
        "steps per batch bucket and key length bucket, captured at warm-up), and flow-matching policies' sampling "
        "(one graph per batch bucket 1, 2, 4, 8, 16, 32, captured at warm-up)."))
    traced_sampling: bool = Field(True, description=(
        "On CPU, run from TorchScript traces, so the model no longer waits for the interpreter lock at every op "
        "while the server handles other traffic: a flow-matching policy's sampling (a trace per batch size, traced "
        "on first use, checked against eager: about 2x faster), and a continuous batch's decode steps of "
        "transformer and vlm (one trace for every batch size and length, traced at warm-up: the eager step's ops "
        "and logits exactly)."))
    log_format: Literal["text", "json"] = Field("text", description=(
        "Log lines as text (with the request id in brackets) or one JSON object per line (time, level, logger, "
        "message, request_id; the access line adds method, route, status, duration_ms)."))
    log_refusals_per_s: int = Field(20, ge=0, le=1_000_000, description=(
        "Access lines a second, at most, for the requests the front door refuses before their bodies (503: "
        "overloaded, or the deployment not ready); past that, one line a second says how many were not logged. "
        "Metrics count every refusal; every other request gets its line. A line each about doubles what a refusal "
        "costs the event loop (bench/refusal_cost.py)."))
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn log level (critical, error, warning, info, debug, trace).")
    api_keys: Optional[SecretStr] = Field(None, description=(
        "API keys, comma-separated (in the YAML also a list). With a key here or in api_keys_file, every request "
        "but /health/* and the docs needs `Authorization: Api-Key <key>` or `Bearer <key>` (401 without); none: "
        "no authentication."))
    api_keys_file: Optional[Path] = Field(None, description="A file of API keys, one per line (blank lines and # "
                                                            "comments skipped): a Docker or Kubernetes secret. A "
                                                            "missing file, or one with no key, stops the start.")
    admin_keys: Optional[SecretStr] = Field(None, description=(
        "Admin keys, comma-separated, apart from the clients' api_keys: with one set, /admin/deployments loads, "
        "reloads and unloads deployments at run time (checkpoints under checkpoint_roots only); none: no /admin."))
    checkpoint_roots: Optional[str] = Field(None, description=(
        "Folders the admin API may load checkpoints from, comma-separated (in the YAML also a list); a path outside "
        "them, a symlink out of them or a URL is refused."))
    allowed_origins: Optional[str] = Field(None, description=(
        "Web origins (scheme://host[:port], comma-separated; * for any) whose pages may send this server bodies "
        "typed as text or a form and open robot websockets, besides its own: what a browser sends without asking "
        "the server first. Checked only on a server without api_keys (with keys such requests carry none and are "
        "refused anyway). Set it when a proxy rewrites Host, or for a web app of your own on another origin."))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return checked_device(v, "device")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return checked_dtype(v, "dtype")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # (uvicorn takes INFO as info, and configs write it so)

    @field_validator("session_store")
    @classmethod
    def _session_store(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        form = ("a Redis URL (redis://host:6379/0, rediss:// for TLS, or unix:///path/to/redis.sock); none keeps "
                "each session in its replica")
        if urlsplit(v).scheme.lower() not in ("redis", "rediss", "unix"):
            raise ValueError(f"session_store must be {form}")
        from redis.connection import parse_url

        try:
            parse_url(v)
        except (ValueError, TypeError):  # (its message may quote part of the URL: a password, say)
            raise ValueError(f"session_store is not a URL that Redis can read (its port, database or options); it "
                             f"must be {form}; a password that holds / ? # @ or : is written %-encoded") from None
        return v

    @field_validator("api_keys", "admin_keys", "checkpoint_roots", "allowed_origins", mode="before")
    @classmethod
    def _api_key_list(cls, v: Any) -> Any:
        return ",".join(str(k) for k in v) if isinstance(v, (list, tuple)) else v  # a YAML list

    @field_validator("allowed_origins")
    @classmethod
    def _allowed_origins(cls, v: Optional[str]) -> Optional[str]:
        from service.middleware import origin_key

        for entry in (e.strip() for e in (v or "").split(",")):
            parts = urlsplit(entry)
            if entry and entry != "*" and (origin_key(entry) is None or parts.scheme.lower() not in ("http", "https")
                                           or "*" in entry or parts.path not in ("", "/") or parts.query):
                raise ValueError(f"{entry[:80]!r} is not a web origin; write http(s)://host[:port] "
                                 "(no path, no wildcard in a host), e.g. https://robots.example.com, or * alone for "
                                 "any")
        return v

    def allowed_origin_list(self) -> frozenset:
        """The allowed origins as ``middleware.origin_key`` reads them (and ``*`` for any)."""
        from service.middleware import origin_key

        entries = [e.strip() for e in (self.allowed_origins or "").split(",") if e.strip()]
        return frozenset("*" if e == "*" else origin_key(e) for e in entries)

    def checkpoint_root_list(self) -> list[Path]:
        return [Path(p.strip()).resolve() for p in (self.checkpoint_roots or "").split(",") if p.strip()]

    @model_validator(mode="after")
    def _pixel_caps(self) -> "Settings":
        # Each cap must admit what the one inside it admits, or a request within every other cap never passes.
        if not self.max_image_pixels <= self.max_request_pixels <= self.max_pixels_in_flight:
            raise ValueError(f"the pixel caps must nest: max_image_pixels ({self.max_image_pixels}) <= "
                             f"max_request_pixels ({self.max_request_pixels}) <= max_pixels_in_flight "
                             f"({self.max_pixels_in_flight})")
        return self

    @model_validator(mode="after")
    def _gpus_are_for_replicas(self) -> "Settings":
        # One server process never reads gpus: silently ignoring it would serve on a GPU the operator did not name.
        if self.gpus is not None and self.replicas == 1:
            raise ValueError(f"gpus ({self.gpus!r}) names the GPUs of replicas, and replicas is 1; set replicas (a "
                             "count, or per-gpu), or pick one server process's GPU with device (cuda:N) or "
                             "CUDA_VISIBLE_DEVICES")
        return self

    @model_validator(mode="after")
    def _replicas_per_gpu_is_for_per_gpu(self) -> "Settings":
        if self.replicas_per_gpu != 1 and self.replicas != "per-gpu":
            raise ValueError(f"replicas_per_gpu ({self.replicas_per_gpu}) counts replicas on each GPU, and replicas "
                             f"is {self.replicas!r}; set replicas to per-gpu, or leave replicas_per_gpu at 1")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "Settings":
        names = [d.resolved_name for d in self.deployments]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # refused here, before anything loads (a replica would fail the same way at every restart)
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(repeated)}; give each "
                             "deployment a name of its own (`name:`, or --checkpoint DIR=NAME)")
        return self

    @model_validator(mode="after")
    def _api_keys(self) -> "Settings":
        from service.auth import read_keys

        self.api_key_list()  # a missing file or a malformed key is refused at start-up, naming the setting
        # An empty secret mounted: the server would be open, or not serve the keys the operator meant
        if self.api_keys_file is not None and not read_keys(None, self.api_keys_file):
            raise ValueError(f"api_keys_file {self.api_keys_file} holds no key (blank lines and # comments only); "
                             "put one key per line in it, or unset VLA_API_KEYS_FILE to serve without keys")
        if set(self.admin_key_list()) & set(self.api_key_list()):
            raise ValueError("an admin key is also a client key (admin_keys, api_keys); give admins keys of their own")
        return self

    def admin_key_list(self) -> list[str]:
        from service.auth import read_keys

        return read_keys(self.admin_keys.get_secret_value() if self.admin_keys else None, None)

    def api_key_list(self) -> list[str]:
        from service.auth import read_keys

        return read_keys(self.api_keys.get_secret_value() if self.api_keys else None, self.api_keys_file)

    @classmethod
    def load(cls, config: Optional[Path] = None, **overrides: Any) -> "Settings":
        """Settings from the environment, the deployment YAML and explicit ``overrides``."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        path = config or _ConfigPath().config
        values: dict[str, Any] = {}
        if path is not None:
            values = read_deployment_file(Path(path))
            values["config"] = Path(path)
        extra = overrides.pop("deployments", None) or []
        values.update(overrides)
        if values.get("deployments") or extra:  # else VLA_DEPLOYMENTS (or the demo pack) applies
            values["deployments"] = list(values.get("deployments") or []) + list(extra)
        return cls(**values)


# VLA_ variables that other parts read, not the server's settings: the robot client (VLA_API_KEY), the container's
# entrypoint, compose file and image build, and the tests and benches.
OTHER_VLA_VARIABLES = frozenset({
    "VLA_API_KEY", "VLA_DEPLOY_FILE", "VLA_ENTRYPOINT_DRY_RUN", "VLA_PUBLISH_ADDRESS", "VLA_GPU_COUNT", "VLA_IMAGE",
    "VLA_CPU_IMAGE", "VLA_CPU_BASE_IMAGE", "VLA_CHECKPOINTS_DIR", "VLA_CONFIG_DIR", "VLA_START_PERIOD", "VLA_UID",
    "VLA_GID", "VLA_WHEEL_SITE", "VLA_TORCH_VERSION", "VLA_TORCH_INDEX_URL", "VLA_CUDA_VERSION", "VLA_CUDNN_VERSION",
    "VLA_BUILD_DEMO", "VLA_FIXTURES_DIR", "VLA_FUZZ_EXAMPLES", "VLA_PAGE_SCREENSHOT", "VLA_CHROMIUM",
    "VLA_BENCH_SIMULATED_GPU"})


def ignored_variables(environ: dict[str, str], settings: "Settings") -> list[str]:
    """Warnings for ``VLA_`` variables in ``environ`` that nothing reads: a misspelt setting (``VLA_MAX_QUEU``)
    would otherwise be ignored without a word, and the server run on its default. Each names the setting it most
    likely meant. The client's VLA_API_KEY beside a server without keys is called out: that server is open."""
    import difflib

    known = {f"VLA_{name.upper()}" for name in Settings.model_fields}
    warnings = []
    # (names compare in capitals: the settings read VLA_Max_Queue as VLA_MAX_QUEUE)
    for name in sorted(n for n in environ
                       if n.upper().startswith("VLA_") and n.upper() not in known | OTHER_VLA_VARIABLES):
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        warnings.append(f"{name} is not a setting of this server and is ignored"
                        + (f"; did you mean {close[0]}?" if close else ""))
    if environ.get("VLA_API_KEY") and not settings.api_key_list():
        warnings.append("VLA_API_KEY is set, but it is the robot client's key: the server reads VLA_API_KEYS (or "
                        "VLA_API_KEYS_FILE), and has none, so it serves without authentication")
    return warnings


class _ConfigPath(BaseSettings):
    """Where the deployment YAML is (VLA_CONFIG), read alone: the other variables are checked once the YAML and the
    command line have been applied (VLA_GPUS alone, with replicas from the command line, is a valid launch)."""

    model_config = SettingsConfigDict(env_prefix="VLA_", extra="ignore", env_ignore_empty=True)

    config: Optional[Path] = None


def deployment_file_keys(config: Optional[Path] = None) -> tuple[Optional[Path], frozenset]:
    """The deployment file in use (``config``, else VLA_CONFIG's) and its top-level keys; none when there is no
    file or it cannot be read (its own error says so)."""
    try:
        path = config or _ConfigPath().config
        if path is None:
            return None, frozenset()
        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # (unreadable, or not YAML: reported by its own error)
        return None, frozenset()
    return Path(path), frozenset(data) if isinstance(data, dict) else frozenset()


def read_deployment_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"deployment file {path} " + ("is a directory; name the YAML file in it" if path.is_dir()
                                                        else "does not exist"))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # its problem and where; never str(e), which quotes the file's lines (keys too)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"deployment file {path} is not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError(f"deployment file {path} must hold a mapping with `deployments:`")
    base = path.parent
    if "deployments" in data and data["deployments"] is None:  # every entry commented out: as if the key were not
        del data["deployments"]  # there (VLA_DEPLOYMENTS, or the demo pack), not a type error naming a variable
    deployments = data.get("deployments") or []
    if not isinstance(deployments, list):
        raise ValueError(f"deployment file {path}: `deployments` must be a list, one `- checkpoint: ...` entry per "
                         f"deployment; got a {type(deployments).__name__}")
    for i, spec in enumerate(deployments):
        checkpoint = spec.get("checkpoint") if isinstance(spec, dict) else None
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ValueError(f"deployment file {path}: deployments[{i}].checkpoint must be a path (text); got "
                             f"{type(checkpoint).__name__} {str(checkpoint)[:40]!r}")
        # Relative checkpoint paths are relative to the deployment file.
        if checkpoint and not Path(checkpoint).is_absolute():
            spec["checkpoint"] = str((base / checkpoint).resolve())
    return data


def parse_checkpoint_arg(value: str) -> DeploymentSpec:
    """``DIR`` or ``DIR=NAME`` (the CLI's ``--checkpoint``); a ``DIR`` that exists is a path whole, ``=`` and all."""
    if Path(value).exists():
        return DeploymentSpec(checkpoint=str(Path(value).resolve()))
    splits = [i for i, c in enumerate(value) if c == "="]
    # the first split whose directory exists (a name may hold "=" too), else at the first "="
    at = next((i for i in splits if Path(value[:i]).exists()), splits[0] if splits else None)
    path, name = (value, None) if at is None else (value[:at], value[at + 1:])
    return DeploymentSpec(checkpoint=str(Path(path).resolve()), name=name or None)
