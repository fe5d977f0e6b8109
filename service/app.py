"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional

from fastapi import FastAPI, Response
from starlette.types import ASGIApp

from service.auth import ApiKeyMiddleware, ApiKeys
from service.deployments import DeploymentManager
from service.errors import ERROR_RESPONSES, install_error_handlers
from service.openapi_extra import document_api_keys, operation_openapi
from service.metrics import Metrics, RequestMetrics
from service.images import PixelBudget
from service.memory import return_large_blocks_to_the_system
from service.middleware import BodyCodecMiddleware, DecodedBodyRoute, OriginCheck
from service.deadlines import Deadlines, RefusalPacer
from service.front_door import FrontDoor
from service.light_requests import LightRequestPacer
from service.probes import LivenessProbe
from service.replicas import Fleet, Replica, ReplicaDirectory
from service.request_ids import RequestIds
from service.routes import health, models
from service.routes.admin import add_admin_routes
from service.routes.docs import add_docs_routes
from service.routes.page import add_page_routes
from service.routes.inference import add_inference_routes
from service.routes.openai import add_openai_routes
from service.routes.robot_ws import add_robot_websocket
from service.routes.sessions import add_session_routes
from service.sessions import SessionStore
from service.torch_threads import apply_torch_threads
from service.shared_sessions import SharedSessionStates
from service.settings import Settings

logger = logging.getLogger("service")


def unprotected_warning(settings: Settings) -> Optional[str]:
    """The warning due when the server listens beyond this host without API keys, else None."""
    if settings.api_key_list() or settings.host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"serving on {settings.host} without API keys: anyone who reaches this address can use every "
            "deployment; set VLA_API_KEYS or VLA_API_KEYS_FILE")


class ServeApp(FastAPI):
    """FastAPI with a front door (``front_door.py``) ahead of the framework and every middleware."""

    front_door: Optional[ASGIApp] = None  # the door, and what ``add_outermost`` wrapped around it
    # With API keys: whether a path needs one, and whether admin keys are set (the OpenAPI document says so).
    needs_key: Optional[Callable[[str], bool]] = None
    admin_keys: bool = False

    def openapi(self) -> dict:
        if self.openapi_schema is None and self.needs_key is not None:
            self.openapi_schema = document_api_keys(super().openapi(), self.needs_key, self.admin_keys)
        return super().openapi()

    async def __call__(self, scope, receive, send) -> None:
        if self.front_door is None:
            await super().__call__(scope, receive, send)
        else:
            await self.front_door(scope, receive, send)

    def add_outermost(self, middleware: type, **options: Any) -> None:
        """Wrap ``middleware`` around everything, the front door's replies included (``add_middleware`` wraps
        FastAPI's own stack only, behind the door)."""
        self.front_door = middleware(self.front_door, **options)


def create_app(settings: Optional[Settings] = None, replica: Optional[Replica] = None) -> FastAPI:
    """The app for ``settings``; deployments start loading (each on its own thread) at startup. ``replica``:
    this process in a fleet of replicas (default: a server started on its own)."""
    settings = settings or Settings.load()
    metrics = Metrics()
    manager = DeploymentManager(settings, metrics)
    shared = (SharedSessionStates(settings.session_store, settings.session_idle_timeout_s,
                                  settings.session_state_max_bytes) if settings.session_store else None)
    fleet = Fleet(replica or Replica.of_this_process(), lambda: [d.info() for d in manager.deployments.values()],
                  None if shared is None else ReplicaDirectory(shared.redis, shared.prefix))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.switch_interval_ms is not None:  # process-wide: the model threads and the event loop share it
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        logger.info(apply_torch_threads(settings.torch_threads))  # process-wide, before any model thread starts
        return_large_blocks_to_the_system()  # decoded images' memory goes back after each request (memory.py)
        if shared is not None:
            try:
                await shared.check()
            except Exception as e:  # a wrong VLA_SESSION_STORE fails the start, naming it
                await shared.close()
                raise RuntimeError(f"the session store {shared.url!r} (VLA_SESSION_STORE) cannot be reached: "
                                   f"{type(e).__name__}: {e}") from e
        metrics.watch_gc()
        manager.start()
        fleet.start()
        try:
            yield
        finally:
            await fleet.stop()
            # Off the event loop: it waits for model calls still running, and meanwhile a stream the drain cut off
            # must still run its clean-up here (its generation told to stop, its last event sent).
            await asyncio.to_thread(manager.shutdown)
            metrics.unwatch_gc()
            if shared is not None:
                await shared.close()

    app = ServeApp(title="VLA Foundry Serve", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None,  # served without a CDN (routes/docs.py)
                  description="Serves VLA Foundry checkpoints: text, captions, images and robot actions.")
    app.router.route_class = DecodedBodyRoute  # routes validate the middleware's unpacked msgpack bodies
    app.state.settings = settings
    app.state.manager = manager
    app.state.fleet = fleet
    app.state.sessions = SessionStore(settings.max_sessions, settings.session_idle_timeout_s, shared)
    app.state.metrics = metrics
    metrics.watch(manager, app.state.sessions)
    app.state.pixels = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)
    metrics.watch_pixels(app.state.pixels)
    app.state.origins = OriginCheck(not settings.api_key_list(), settings.allowed_origin_list())
    app.add_middleware(BodyCodecMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_body_keys=settings.max_body_keys, pixels=app.state.pixels, origins=app.state.origins)
    app.add_middleware(Deadlines)  # X-Request-Timeout → the request's deadline (deadlines.py), once its key is checked
    api_keys, admin_keys = settings.api_key_list(), settings.admin_key_list()
    if api_keys or admin_keys:  # added last, so outermost: a request without a key is refused before its body is read
        key_options = dict(keys=ApiKeys(api_keys) if api_keys else None,
                           admin_keys=ApiKeys(admin_keys) if admin_keys else None,
                           metrics_public=settings.metrics_public)
        app.add_middleware(ApiKeyMiddleware, **key_options)
        app.needs_key = ApiKeyMiddleware(None, **key_options).needs_key  # (for the OpenAPI document)
        app.admin_keys = bool(admin_keys)
    if not api_keys and (replica is None or replica.index is None):  # (a launch of replicas says it once)
        warning = unprotected_warning(settings)
        if warning:
            logger.warning(warning)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outside the key check: 401s are counted too
    app.add_middleware(RequestIds)  # every request's id, in its reply, error body and log lines
    app.add_middleware(LivenessProbe)  # a probe costs the event loop almost nothing (probes.py)
    # Outermost: while a model works, GET/HEAD/OPTIONS requests are paced so a flood cannot take its CPU.
    app.add_middleware(LightRequestPacer, rate=settings.light_requests_per_s, models_at_work=manager.models_at_work,
                       on_delay=metrics.observe_light_delay)
    # Ahead of all of it: refusals of an overloaded deployment before the body is read (front_door.py).
    app.state.refusal_pacer = pacer = RefusalPacer(settings.shed_pacing_s, settings.shed_retries_per_s)
    app.front_door = FrontDoor(functools.partial(FastAPI.__call__, app), manager, metrics, pacer=pacer,
                               keys=ApiKeys(api_keys) if api_keys else None,
                               log_refusals_per_s=settings.log_refusals_per_s)
    install_error_handlers(app)
    app.include_router(health.router)
    # Before the mounts (docs assets, the page's files): a mount matches a websocket upgrade too, and the robot
    # websockets' catch-all answers every other path's upgrade with a 404 naming them.
    add_robot_websocket(app, settings)
    add_docs_routes(app)
    add_page_routes(app)
    app.add_api_route("/metrics", lambda: metrics.response(), methods=["GET"], tags=["operations"],
                      summary="Prometheus metrics (text format)", response_class=Response,
                      responses={200: {"description": "The Prometheus text exposition format.",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}},
                      openapi_extra=operation_openapi())
    app.include_router(models.router)
    add_inference_routes(app, settings)
    add_openai_routes(app, settings)
    add_session_routes(app, settings)
    add_admin_routes(app, settings)
    return app
