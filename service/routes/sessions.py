"""Robot sessions: ``POST /sessions/{id}/step`` (one action per control step), ``POST
/sessions/{id}/reset``, ``GET /sessions``, ``DELETE /sessions/{id}``.

Chunk mode needs no route of its own: ``/predict/{policy type}`` with a ``session_id``.
"""

# No `from __future__ import annotations`: FastAPI reads the request classes from the real annotations.

import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from service.auth import caller_of
from service.codecs import encode_response
from service.deadlines import tightened
from service.deployments import DeploymentManager
from service.errors import ApiError, session_conflict_responses
from service.middleware import reply_in_bytes_keys
from service.modalities.action import (MAX_STEP, Observation, begin_sessions, decode_observation_frames,
                                       finish_sessions)
from service.modalities.base import ModelCall, Number, RequestBase, ResponseBase
from service.openapi_extra import operation_openapi, schema_ref
from service.sessions import GONE_FOR_GOOD
from service.settings import Settings
from vla_foundry.pipelines.interfaces import ActionServing
from vla_foundry.robotics.session import ActionStep


class SessionStepRequest(RequestBase):
    observation: Observation = Field(..., description="The current step: one frame per camera, the current "
                                                      "[d] proprioception row per field, the instruction.")
    step: Optional[StrictInt] = Field(None, ge=0, lt=MAX_STEP,
                                      description="The robot's control step; default: the last one + 1.")
    timestamp: Optional[Number] = Field(None, description="The observation's time (Unix seconds, server clock).")
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1, description="Denoising steps when this step replans.")

    @model_validator(mode="after")
    def _check(self):
        self.check_inference_steps(self.num_inference_steps)
        return self


class SessionStepResponse(ResponseBase):
    session_id: str
    step: int
    actions: dict[str, list] = Field(..., description="Action field → [d]: what to execute at this step.")
    action: list = Field(..., description="[A]: the fields concatenated in io.actions order.")
    replanned: bool = Field(..., description="Whether this step ran the policy (else the action comes from the "
                                             "plan made at plan_step).")
    plan_step: int
    timestamp: Optional[float] = None
    valid_until: float = Field(..., description="The step's timestamp (or receive time) + one control period.")


class SessionResetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**62,
                                      description="Seeds the session's plans (plan k uses seed + k).")


class SessionInfo(BaseModel):
    """One live robot session, as ``GET /sessions`` lists it (``SessionEntry.info``; with a shared session store,
    as the store has it)."""

    session_id: str
    model: str = Field(..., description="The policy deployment it runs on.")
    created: float = Field(..., description="When it started (Unix seconds).")
    last_used: float = Field(..., description="Its last request (Unix seconds).")
    idle_s: float = Field(..., description="Seconds since its last request.")
    requests: int = Field(..., description="Requests it has served.")
    busy: bool = Field(..., description="Whether this replica is serving a request of it now.")
    last_step: Optional[int] = Field(..., description="The last control step it was sent; null before any.")
    plans: int = Field(..., description="Policy runs (plans) made in its current episode.")
    plan_step: Optional[int] = Field(..., description="The step its current plan starts at; null before any.")
    open_loop_steps: int = Field(..., description="Actions served from a plan before the next one is made.")


class SessionList(BaseModel):
    sessions: list[SessionInfo] = Field(..., description="The caller's live sessions (every session on a server "
                                                         "without API keys), the least recently used first.")
    max_sessions: int = Field(..., description="Sessions kept at most (VLA_MAX_SESSIONS).")
    idle_timeout_s: float = Field(..., description="Sessions idle longer expire (VLA_SESSION_IDLE_TIMEOUT_S).")


def _policy_deployment(manager: DeploymentManager, name: Optional[str]):
    if name is not None:
        return manager.get(name)
    policies = [d for d in manager.deployments.values() if d.modality == "action"]
    if len(policies) != 1:
        names = ", ".join(d.name for d in policies) or "(none)"
        raise ApiError(422 if policies else 404, f"name the policy deployment in `model` (policies served: {names})",
                       field="model")
    return policies[0]


def _steps(pipeline: ActionServing, items: list[tuple[SessionStepRequest, Any]]) -> list:
    """Step mode of several robots' sessions: one ``ActionStep`` each (or that step's exception); the sessions
    due a new plan share one model call."""

    def begin(body: SessionStepRequest, session):
        observation = body.observation
        return session.begin_step(observation.decoded_frames(body, "observation"),
                                  observation.decoded_lowdim("observation"), observation.language_instruction or "",
                                  step=body.step, num_inference_steps=body.num_inference_steps,
                                  timestamp=body.timestamp, digest=observation.made_digest,
                                  received_at=body.received_at)

    return finish_sessions(pipeline, begin_sessions(items, begin))


def _encode_step(result: ActionStep) -> dict:
    return {"step": result.step, "actions": result.actions, "action": result.action.tolist(),
            "replanned": result.replanned, "plan_step": result.plan_step, "timestamp": result.timestamp,
            "valid_until": result.valid_until}


def add_session_routes(app: FastAPI, settings: Settings) -> None:
    step_request = type("SessionStepRequest", (SessionStepRequest,), {"__module__": __name__,
                                                                     **RequestBase.limits_from(settings)})

    async def step(session_id: str, body: step_request, request: Request):
        started = time.perf_counter()
        manager: DeploymentManager = request.app.state.manager  # not Depends: see routes/inference.py
        sessions = request.app.state.sessions
        owner = caller_of(request.scope)
        try:
            deployment = (await sessions.deployment_of(session_id, owner, manager.get) if body.model is None
                          else manager.get(body.model))
        except ApiError as e:
            if e.status != 404:  # a session that is gone, or another key's: its robot must hear it
                raise
            deployment = _policy_deployment(manager, body.model)  # a new session: the one policy served
        deployment.check_ready()
        await decode_observation_frames(body)
        prepared = time.perf_counter()
        deployment = deployment.current()  # reloaded while the frames decoded: the new one
        # A step whose action would be due after its valid_until (one control period from its timestamp) is
        # refused now (409 stale) or dropped unrun once that passes while it waits (504).
        expiry = deployment.pipeline.chunk_expiry(body.timestamp, steps=1) if deployment.modality == "action" else None
        entry = sessions.acquire(session_id, deployment, owner)
        call = ModelCall(_steps, (body, entry.policy), ("steps", body.num_inference_steps))
        with tightened(body.timeout_s, started, expiry):
            timed = await entry.call(deployment.call(call))
        result: ActionStep = timed.value
        timing = {"queue": timed.queue_ms, "preprocess": (prepared - started) * 1000, "infer": timed.run_ms,
                  **{k: v for k, v in result.timing_ms.items() if k != "preprocess"}}
        timing["total"] = (time.perf_counter() - started) * 1000
        timing["batch_size"] = timed.batch_size
        payload = {"model": deployment.name, "session_id": session_id, **_encode_step(result),
                   "timing_ms": {k: round(v, 3) for k, v in timing.items()}}
        return encode_response(payload, request.headers.get("accept", ""), bytes_keys=reply_in_bytes_keys(request))

    async def reset(session_id: str, request: Request, body: Optional[SessionResetRequest] = None):
        started = time.perf_counter()
        sessions, owner, seed = request.app.state.sessions, caller_of(request.scope), body.seed if body else None
        manager: DeploymentManager = request.app.state.manager
        # A session that expired or was evicted starts its new episode now, on the deployment it was on; a live one
        # is reset where it is. Either way the answer names the session's model and its new episode's seed.
        entry = await sessions.reset_gone(session_id, owner, seed, manager.get)
        if entry is GONE_FOR_GOOD:  # its deployment was unloaded: the next request starts a session anew
            model = None
        else:
            if entry is None:
                entry = await sessions.lookup(session_id, owner, manager.get)
                await entry.reset(seed)
            model, seed = entry.deployment.name, entry.policy.seed
        timing = {"total": round((time.perf_counter() - started) * 1000, 3)}  # (as every reply carries; no model ran)
        return encode_response({"session_id": session_id, "model": model, "reset": True, "seed": seed,
                                "timing_ms": timing}, request.headers.get("accept", ""))

    async def list_sessions(request: Request):
        store = request.app.state.sessions
        return encode_response({"sessions": await store.listed(caller_of(request.scope)),
                                "max_sessions": store.max_sessions,
                                "idle_timeout_s": store.idle_timeout_s}, request.headers.get("accept", ""))

    async def delete(session_id: str, request: Request):
        await request.app.state.sessions.delete(session_id, caller_of(request.scope))
        return encode_response({"session_id": session_id, "deleted": True}, request.headers.get("accept", ""))

    # The reset's body is optional: documented (JSON and msgpack) as FastAPI documents an Optional body.
    reset_body = {"anyOf": [schema_ref(SessionResetRequest), {"type": "null"}], "title": "Body"}
    app.add_api_route("/sessions/{session_id}/step", step, methods=["POST"], tags=["sessions"],
                      response_model=SessionStepResponse, summary="One action for the robot's current step",
                      responses=session_conflict_responses(),
                      openapi_extra=operation_openapi(schema_ref(step_request), deadline=True))
    app.add_api_route("/sessions/{session_id}/reset", reset, methods=["POST"], tags=["sessions"],
                      summary="Forget the session's history (a new episode), optionally with a new seed",
                      responses=session_conflict_responses(), openapi_extra=operation_openapi(reset_body))
    app.add_api_route("/sessions", list_sessions, methods=["GET"], tags=["sessions"], summary="Live robot sessions",
                      response_model=SessionList, openapi_extra=operation_openapi())
    app.add_api_route("/sessions/{session_id}", delete, methods=["DELETE"], tags=["sessions"], summary="End a session",
                      openapi_extra=operation_openapi())
