"""Liveness and readiness."""

from fastapi import APIRouter, Depends, Request

from service.codecs import encode_response
from service.dependencies import get_manager
from service.deployments import DeploymentManager
from service.openapi_extra import operation_openapi

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live(request: Request):
    return encode_response({"status": "live"}, request.headers.get("accept", ""))


@router.get("/health/ready", summary="Every deployment that has not failed is loaded and warmed up",
            openapi_extra=operation_openapi())
async def ready(request: Request, manager: DeploymentManager = Depends(get_manager)):
    is_ready, body = manager.readiness()
    headers = None if is_ready else {"Retry-After": "5"}
    return encode_response(body, request.headers.get("accept", ""), 200 if is_ready else 503, headers)


router.add_api_route("/healthz", ready, methods=["GET"], summary="Alias of /health/ready",
                     openapi_extra=operation_openapi())
# HEAD as well, as load balancers probe (the status is the answer; /health/live answers it in probes.py)
for _path in ("/health/ready", "/healthz"):
    router.add_api_route(_path, ready, methods=["HEAD"], include_in_schema=False)
