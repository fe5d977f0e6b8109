"""Discovery: what is registered and what is deployed."""

from fastapi import APIRouter, Depends, Request

from service.codecs import encode_response
from service.dependencies import get_manager
from service.deployments import DeploymentManager
from vla_foundry.models.registry import list_registered_batch_handlers, list_registered_models

router = APIRouter(tags=["models"])


@router.get("/models", summary="Registered types, batch handlers, every deployment, the replicas serving them")
async def models(request: Request, manager: DeploymentManager = Depends(get_manager)):
    fleet = request.app.state.fleet
    this = fleet.this()  # the replica that answered: host, pid, its GPUs, its deployments' devices
    body = {"registered_models": list_registered_models(),
            "registered_batch_handlers": list_registered_batch_handlers(),
            "deployments": [d.info() for d in manager.deployments.values()],
            "replica": this,
            "replicas": await fleet.replicas(this)}  # every live replica (only this one without VLA_SESSION_STORE)
    return encode_response(body, request.headers.get("accept", ""))


@router.get("/models/{name}", summary="One deployment")
async def model(name: str, request: Request, manager: DeploymentManager = Depends(get_manager)):
    return encode_response(manager.get(name).info(), request.headers.get("accept", ""))
