"""VLA Foundry Serve: the FastAPI service around the ``vla_foundry`` model package.

``create_app``, ``DeploymentSpec`` and ``Settings`` are imported on first use, so the
command line (``service.cli``) runs its ``demo`` and ``models`` commands without the
``serve`` extra installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "DeploymentSpec", "Settings"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    if name in ("DeploymentSpec", "Settings"):
        from service import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
