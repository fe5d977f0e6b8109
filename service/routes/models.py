"""Discovery: what is registered and what is deployed."""

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.codecs import MSGPACK, encode_response
from service.dependencies import get_manager
from service.deployments import DeploymentManager
from service.openapi_extra import operation_openapi
from vla_foundry.models.registry import list_registered_batch_handlers, list_registered_models

router = APIRouter(tags=["models"])
# Both routes answer in msgpack to a client that prefers it (Accept), as every route does.
MSGPACK_REPLY = {200: {"content": {MSGPACK: {"schema": {}}}}}


def as_served(info: dict[str, Any], max_inference_steps: int) -> dict[str, Any]:
    """A deployment's ``info()`` as this server serves it: an image model's ``io`` gains the server's cap on the
    sampler steps that run (``max_inference_steps``, VLA_MAX_INFERENCE_STEPS), and its
    ``io.defaults.num_inference_steps``, the steps a request without ``num_inference_steps`` runs, becomes null
    when the model's default is over the cap: such a request is refused (422), not clamped (the pipeline's
    ``plan``), so it runs none."""
    io = info.get("io") or {}
    defaults = io.get("defaults") or {}
    if info.get("modality") != "image" or "num_inference_steps" not in defaults:
        return info
    steps = defaults["num_inference_steps"]
    served_defaults = {**defaults, "num_inference_steps": steps if steps <= max_inference_steps else None}
    return {**info, "io": {**io, "max_inference_steps": max_inference_steps, "defaults": served_defaults}}


@router.get("/models", summary="Registered types, batch handlers, every deployment, the replicas serving them",
            responses=MSGPACK_REPLY, openapi_extra=operation_openapi())
async def models(request: Request, manager: DeploymentManager = Depends(get_manager)):
    fleet = request.app.state.fleet
    this = fleet.this()  # the replica that answered: host, pid, its GPUs, its deployments' devices
    max_steps = request.app.state.settings.max_inference_steps
    body = {"registered_models": list_registered_models(),
            "registered_batch_handlers": list_registered_batch_handlers(),
            "deployments": [as_served(d.info(), max_steps) for d in manager.deployments.values()],
            "replica": this,
            "replicas": await fleet.replicas(this)}  # every live replica (only this one without VLA_SESSION_STORE)
    return encode_response(body, request.headers.get("accept", ""))


@router.get("/models/{name}", summary="One deployment", responses=MSGPACK_REPLY, openapi_extra=operation_openapi())
async def model(name: str, request: Request, manager: DeploymentManager = Depends(get_manager)):
    info = as_served(manager.get(name, field="name").info(), request.app.state.settings.max_inference_steps)
    return encode_response(info, request.headers.get("accept", ""))
