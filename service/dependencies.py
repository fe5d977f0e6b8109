"""FastAPI dependencies: the app's settings and deployment manager."""

from fastapi import Request

from service.deployments import DeploymentManager
from service.settings import Settings


def get_manager(request: Request) -> DeploymentManager:
    return request.app.state.manager


def get_settings(request: Request) -> Settings:
    return request.app.state.settings
