"""VLA Foundry Serve: the FastAPI service around the ``vla_foundry`` model package."""

from service.app import create_app
from service.settings import DeploymentSpec, Settings

__all__ = ["create_app", "DeploymentSpec", "Settings"]
