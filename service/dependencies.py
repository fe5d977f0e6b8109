"""FastAPI dependencies: the app's deployment manager."""

from fastapi import Request

from service.deployments import DeploymentManager


async def get_manager(request: Request) -> DeploymentManager:
    # async: FastAPI runs a plain-def dependency in the thread pool, a hop (about 0.1 ms) per request.
    return request.app.state.manager
