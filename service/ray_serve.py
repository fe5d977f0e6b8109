"""Scale-out on Ray Serve: the same FastAPI app (``service.app.create_app``) as a Serve deployment.

Start it with the same deployment YAML as ``vla-foundry serve --config``::

    serve run service.ray_serve:app config=/abs/path/deploy.yaml num_replicas=2 num_gpus=1
    serve run deploy/ray/serve_config.yaml          # or `serve deploy` it to a running cluster

Why it is built the way it is:

- The app is created *inside each replica* (``serve.ingress`` with a builder function), not
  pickled from the driver: its ``DeploymentManager`` owns executor threads and models that
  must live in the replica process. Ray Serve runs the app's FastAPI lifespan in the replica
  (``ASGIAppReplicaWrapper._run_asgi_lifespan_startup``, uvicorn's ``LifespanOn``), so the
  manager starts loading there, and its ``__del__`` runs the lifespan's shutdown.
- Replica start-up waits until every deployment has loaded or failed (the lifespan is wrapped):
  Serve sends traffic, and counts a replica towards autoscaling, only once its constructor
  returned and a first ``check_health`` passed, so a replica that is still loading a large
  checkpoint never receives requests (no 503 "still loading" behind a load balancer).
  ``check_health`` then fails while any deployment is loading, i.e. while ``/health/ready`` would
  answer 503 for a deployment that has not failed. A deployment that *failed* does not make the
  replica unhealthy (a restart would fail the same way): it is reported in ``/models`` and
  ``/health/ready``, as on a single server, and the others serve.
- The device follows the GPUs Ray gave the replica: Ray sets ``CUDA_VISIBLE_DEVICES`` for
  ``num_gpus >= 1`` (or a fraction), so ``cuda``/``auto`` is that GPU; a replica given no GPU
  (``num_gpus: 0``) runs on the CPU, because Ray then leaves ``CUDA_VISIBLE_DEVICES`` alone and
  ``auto`` would otherwise pick an unreserved ``cuda:0``.
- Each replica's inter-deployment gRPC server binds the node IP, not every interface (Ray
  Serve 2.60 binds ``[::]``), so a cluster started on 127.0.0.1 listens on loopback only.
- Every response carries ``X-Serve-Replica`` (the Serve replica id), so a client or a test can
  tell which replica answered.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.replicas import Replica, cpu_device_check, hold_startup_until_loaded, settings_for_replica
from service.settings import Settings

logger = logging.getLogger("service.ray_serve")

DEPLOYMENT_NAME = "VLAFoundryServe"  # the name a Serve config file's `deployments:` entry must use
REPLICA_HEADER = "x-serve-replica"
GIVEN_BY = "ray_actor_options.num_gpus"


class RayServeArgs(BaseModel):
    """The application's arguments: ``serve run service.ray_serve:app key=value ...`` or a config file's ``args:``.

    A Serve config file's ``deployments:`` section (``num_replicas``, ``ray_actor_options``,
    ``autoscaling_config``, ...) overrides these, as it overrides any code default.
    """

    model_config = ConfigDict(extra="forbid")

    config: Optional[str] = Field(None, description="The deployment YAML of `vla-foundry serve --config` (an "
                                                    "absolute path is safest: a relative one is relative to the "
                                                    "directory `serve` runs in); none: VLA_CONFIG or the demo pack.")
    num_replicas: Optional[Union[Annotated[int, Field(ge=1)], Literal["auto", "per-gpu"]]] = Field(
        None, description="A fixed replica count; `per-gpu`: as many as the cluster's GPUs hold at num_gpus each "
                          "(counted when the application is built); `auto` to autoscale; default: 1, or "
                          "autoscaling when min/max_replicas or target_ongoing_requests is given.")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per replica (ray_actor_options.num_gpus): 1 = "
                                                             "one replica per GPU, 0.5 = two per GPU, 0 = CPU "
                                                             "replicas (Ray's default).")
    num_cpus: Optional[float] = Field(None, ge=0, description="CPUs reserved per replica (Ray's default: 1).")
    min_replicas: Optional[int] = Field(None, ge=0, description="Autoscaling: fewest replicas (default 1).")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling: most replicas (default 100).")
    target_ongoing_requests: Optional[float] = Field(None, gt=0, description="Autoscaling: ongoing requests per "
                                                                             "replica to aim for (default 2).")
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="Requests one replica takes at once "
                                                                        "before Serve queues them (default 5).")

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"num_gpus {value:g}: above 1, Ray gives whole GPUs only; use a whole number, or a "
                             "fraction up to 1 (0.5 = two replicas per GPU)")
        return value


def app(args: dict[str, Any]) -> Application:
    """The application builder ``serve run service.ray_serve:app`` and Serve config files call.

    CLI arguments arrive as strings (``num_replicas=2``); pydantic turns them into numbers.
    """
    try:
        parsed = RayServeArgs.model_validate(dict(args or {}))
    except ValidationError as e:
        raise ValueError(f"bad service.ray_serve:app arguments {dict(args or {})!r}: {e}. Allowed keys: "
                         f"{', '.join(RayServeArgs.model_fields)}") from None
    return build_app(parsed)


def build_app(args: RayServeArgs) -> Application:
    """The bound Serve application for ``args``: settings are read here, once, and shipped to the replicas."""
    settings = Settings.load(Path(args.config).expanduser().resolve() if args.config else None)
    if "host" in settings.model_fields_set or "port" in settings.model_fields_set:
        logger.warning("host/port of the deployment YAML are ignored under Ray Serve: the Serve HTTP proxy binds "
                       "(http_options in a Serve config file, or serve.start(http_options=...))")
    if args.num_gpus == 0:
        cpu_device_check(settings, GIVEN_BY)  # fail here, not in every replica
    autoscale = args.num_replicas == "auto" or any(
        v is not None for v in (args.min_replicas, args.max_replicas, args.target_ongoing_requests))
    if autoscale and args.num_replicas not in (None, "auto"):
        raise ValueError(f"num_replicas={args.num_replicas} fixes the replica count, but autoscaling options "
                         "(min_replicas, max_replicas, target_ongoing_requests) were given too; use "
                         "num_replicas=auto with them, or drop them")
    # Only what was given: a Serve config file's `deployments:` section then sets the rest without a clash.
    actor = {k: v for k, v in (("num_gpus", args.num_gpus), ("num_cpus", args.num_cpus)) if v is not None}
    options: dict[str, Any] = {"ray_actor_options": actor} if actor else {}
    if args.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = args.max_ongoing_requests
    if autoscale:
        # num_replicas="auto": Ray's autoscaling defaults (min 1, max 100, target 2), overridden by what was given.
        options["num_replicas"] = "auto"
        autoscaling = {k: v for k, v in (("min_replicas", args.min_replicas), ("max_replicas", args.max_replicas),
                                         ("target_ongoing_requests", args.target_ongoing_requests)) if v is not None}
        if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
            raise ValueError(f"min_replicas={args.min_replicas} is above max_replicas={args.max_replicas}; "
                             "lower min_replicas or raise max_replicas")
        if autoscaling:
            options["autoscaling_config"] = autoscaling
    elif args.num_replicas == "per-gpu":
        options["num_replicas"] = replicas_per_gpu(args.num_gpus)
        options.setdefault("ray_actor_options", {})["num_gpus"] = 1 if args.num_gpus is None else args.num_gpus
    elif args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    return deployment_for(settings).options(**options).bind()


def replicas_per_gpu(num_gpus: Optional[float]) -> int:
    """``num_replicas=per-gpu``: how many replicas of ``num_gpus`` GPUs each (default 1) the cluster's nodes hold
    now, node by node. `serve run module:app` calls the builder before it connects to Ray, so this connects for
    the count (to ``RAY_ADDRESS``, else the cluster on this host, else a new local one: `serve run`'s
    ``--address`` is not seen here) and disconnects again."""
    if num_gpus == 0:
        raise ValueError("num_replicas=per-gpu with num_gpus=0 would give no replica a GPU; use num_gpus=1 (one "
                         "replica per GPU) or a fraction such as 0.5 (two per GPU), or a fixed num_replicas")
    per_replica = num_gpus or 1
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), namespace="serve")  # Serve's namespace, as `serve run`
    try:
        nodes = [node.get("Resources", {}).get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
    finally:
        if connected_here:  # `serve run` then connects itself, with its own address and runtime environment
            ray.shutdown()
    if per_replica < 1:  # Ray places a fraction within one GPU, never across two: so many per whole GPU
        count = sum(int(gpus + 1e-9) * int(1 / per_replica + 1e-9) for gpus in nodes)
    else:
        count = sum(int(gpus / per_replica + 1e-9) for gpus in nodes)
    if count < 1:
        raise ValueError(f"num_replicas=per-gpu: no node of the Ray cluster has {per_replica:g} GPU(s) for a replica "
                         f"(GPUs per node: {nodes}); add GPU nodes, or give replicas no GPU (num_gpus=0) and a fixed "
                         "num_replicas")
    return count


def deployment_for(settings: Settings) -> serve.Deployment:
    """The Serve deployment whose replicas each run ``create_app(settings)``.

    The ingress class is made per settings because ``serve.ingress`` takes the app builder when
    the class is decorated; the builder closes over ``settings`` and is called in the replica.
    """

    def build_asgi_app():
        _bind_replica_grpc_to_node_ip()
        return replica_app(settings, num_gpus=len(ray.get_gpu_ids()))

    cls = serve.ingress(build_asgi_app)(_Replica)
    return serve.deployment(cls, name=DEPLOYMENT_NAME)


class _Replica:
    """One Serve replica: the ingress wrapper gives it ``self.app`` (the FastAPI app) and runs its lifespan."""

    async def check_health(self) -> None:
        """Serve calls this on start (the replica gets no traffic until it passes) and every health period."""
        check_health(self.app)


def check_health(fastapi_app) -> None:
    """Raises while a deployment is still loading (``/health/ready`` would say 503 for one that has not failed)."""
    is_ready, body = fastapi_app.state.manager.readiness()
    if not is_ready and body["status"] == "loading":
        loading = [n for n, s in body["deployments"].items() if s == "loading"]
        raise RuntimeError(f"deployments still loading: {', '.join(loading)}")


def replica_app(settings: Settings, num_gpus: int):
    """The FastAPI app of a replica Ray gave ``num_gpus`` GPUs: its start-up waits until the models have loaded."""
    from service.app import create_app

    settings = settings_for_replica(settings, num_gpus, GIVEN_BY)
    if not settings.deployments:
        from vla_foundry.demo import ensure_demo_pack

        ensure_demo_pack(settings.demo_dir, progress=False)  # replicas on one host take turns on its file lock
    logger.info("replica with %d GPU(s): device %s", num_gpus, settings.device)
    fastapi_app = create_app(settings, Replica.of_this_process("ray", id=_serve_replica_id()))
    hold_startup_until_loaded(fastapi_app)
    fastapi_app.add_outermost(ReplicaHeaderMiddleware)  # (the front door's refusals carry it too)
    return fastapi_app


def _serve_replica_id() -> Optional[str]:
    """Serve's id of this replica (what ``X-Serve-Replica`` says), None outside a replica."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


def _bind_replica_grpc_to_node_ip() -> None:
    """Bind this replica's inter-deployment gRPC server to the node's IP instead of every interface.

    Ray Serve 2.60 starts it on ``[::]:0`` whatever the node IP (``ray.serve._private.replica``,
    after the app is built, so this runs first); Ray's own servers bind the node IP, so peers
    reach it the same way and a single-host cluster on 127.0.0.1 stays loopback-only. A Ray
    without that private function keeps its own behaviour.
    """
    try:
        from ray.serve._private import replica as replica_module

        original = replica_module.add_port_to_grpc_server
    except (ImportError, AttributeError):
        return
    if getattr(original, "binds_node_ip", False):
        return
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port_to_grpc_server(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port_to_grpc_server.binds_node_ip = True
    replica_module.add_port_to_grpc_server = add_port_to_grpc_server


class ReplicaHeaderMiddleware:
    """Adds ``X-Serve-Replica: <replica id>`` to every HTTP response (which replica answered)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._id: Optional[bytes] = None

    def _replica_id(self) -> bytes:
        if self._id is None:
            self._id = (_serve_replica_id() or "unknown").encode()  # outside a replica (a plain ASGI test): none
        return self._id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                                self._replica_id())]}
            await send(message)

        await self.app(scope, receive, send_with_header)
