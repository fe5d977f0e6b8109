"""FastAPI dependencies: the app's deployment manager."""

from fastapi import Request

from service.deployments import DeploymentManager


def get_manager(request: Request) -> DeploymentManager:
    return request.app.state.manager

