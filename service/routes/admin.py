"""Live model control, behind admin keys (``VLA_ADMIN_KEYS``, apart from the clients' keys); absent without them.

- ``POST /admin/deployments`` loads a new deployment from a checkpoint under ``VLA_CHECKPOINT_ROOTS``
  (202: it loads on its own thread; ``GET /models/{name}`` shows its progress);
- ``POST /admin/deployments/{name}/reload`` swaps in another checkpoint: the new one loads and warms up
  beside the serving one, which serves until then and finishes what it has queued, so no request
  fails; replies then carry the new checkpoint's step. Its robot sessions end (their robots are told);
- ``DELETE /admin/deployments/{name}`` unloads one and frees its memory once its queue is done.
"""

# No `from __future__ import annotations`: FastAPI reads the request classes from the real annotations.

import asyncio
import os
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from service.codecs import encode_response
from service.errors import ApiError
from service.openapi_extra import operation_openapi, schema_ref
from service.routes.models import as_served
from service.settings import DeploymentSpec, Settings
from vla_foundry.checkpoint import checkpoint_file_path


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = Field(None, description="The experiment directory to serve now (default: the same "
                                                        "one, e.g. for a newer checkpoint file in it).")
    checkpoint_file: Optional[str] = Field(None, description="A weights file in its checkpoints/ (default: the "
                                                             "latest, whatever file the deployment serves now).")
    use_ema: Optional[StrictBool] = None


MAX_TREE_ENTRIES = 100_000  # entries of an experiment directory checked for links out of the roots


def _outside(roots: list[Path], field: str, what: str) -> ApiError:
    allowed = ", ".join(map(str, roots)) or "(none: set VLA_CHECKPOINT_ROOTS)"
    return ApiError(422, f"{field} {what} is outside the folders the admin API may load from: {allowed}", field=field)


def _checked_path(path: str, roots: list[Path], field: str = "checkpoint") -> str:
    """``path`` resolved (symlinks followed) when it lies under an allowed root; else 422 naming them."""
    if "://" in path:
        raise ApiError(422, f"{field} must be a path on this host, not a URL", field=field)
    if "\x00" in path:  # (the OS cannot take it; resolving it raises)
        raise ApiError(422, f"{field} must be a path without NUL characters", field=field)
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise ApiError(422, f"{field} {path!r} cannot be resolved ({type(e).__name__}: {e})", field=field) from e
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _outside(roots, field, repr(path))
    return str(resolved)


def _checked_tree(directory: str, roots: list[Path], field: str = "checkpoint") -> None:
    """422 when anything in ``directory`` (links followed, each folder once) resolves outside the roots: the weights
    file a load picks by itself (the latest, or the EMA one) must be as confined as one named in the request."""
    seen: set[str] = set()
    count = 0
    for top, dirs, files in os.walk(directory, followlinks=True):
        real_top = os.path.realpath(top)
        if real_top in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real_top)
        for entry in dirs + files:
            count += 1
            if count > MAX_TREE_ENTRIES:
                raise ApiError(422, f"{field} holds more than {MAX_TREE_ENTRIES} files and folders; serve an "
                                    "experiment directory, not a folder of them", field=field)
            path = Path(top) / entry
            try:
                if not path.is_symlink():
                    continue
                target = path.resolve(strict=True)  # (Python 3.13 no longer raises on a loop unless strict)
            except (OSError, RuntimeError) as e:  # a link loop, an unreadable folder
                raise ApiError(422, f"{field} holds {str(path)!r}, which cannot be resolved ({type(e).__name__}: {e}); "
                                    "serve a directory whose links all lead to files", field=field) from e
            if not any(target.is_relative_to(root) for root in roots):
                raise _outside(roots, field, f"holds {str(path)!r}, a link to {str(target)!r}, which")


def _checked_files(fields: dict, roots: list[Path]) -> dict:
    """``fields`` (a deployment's ``checkpoint``, ``checkpoint_file``, ``tokenizer``) with every path they name
    resolved and under the allowed roots: the weights file is a file name in the experiment's ``checkpoints/``
    (as absolute path, so nothing else is looked up), the tokenizer a directory under a root."""
    out = dict(fields, checkpoint=_checked_path(fields["checkpoint"], roots))
    _checked_tree(out["checkpoint"], roots)
    name = fields.get("checkpoint_file")
    if name is not None:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ApiError(422, f"checkpoint_file {name!r} must be a file name in the experiment's checkpoints/ "
                                "folder (e.g. checkpoint_2000.pt), not a path", field="checkpoint_file")
        out["checkpoint_file"] = _checked_path(str(checkpoint_file_path(out["checkpoint"], name)), roots,
                                               "checkpoint_file")
    if fields.get("tokenizer") is not None:
        out["tokenizer"] = _checked_path(fields["tokenizer"], roots, "tokenizer")
        _checked_tree(out["tokenizer"], roots, "tokenizer")
    return out


def add_admin_routes(app: FastAPI, settings: Settings) -> None:
    keys = settings.admin_key_list()
    if not keys:
        return
    roots = settings.checkpoint_root_list()

    def reply(request: Request, body: dict, status: int = 200):
        return encode_response(body, request.headers.get("accept", ""), status_code=status)

    async def load(spec: DeploymentSpec, request: Request):
        # (off the event loop: a big experiment directory takes a while to walk)
        spec = spec.model_copy(update=await asyncio.to_thread(_checked_files, spec.model_dump(
            include={"checkpoint", "checkpoint_file", "tokenizer"}), roots))
        deployment = request.app.state.manager.add(spec)
        return reply(request, as_served(deployment.info(), request.app.state.settings.max_inference_steps), 202)

    async def reload(name: str, body: ReloadRequest, request: Request):
        manager = request.app.state.manager
        old = manager.get(name, field="name")
        update = body.model_dump(exclude_none=True)
        update.setdefault("checkpoint", old.spec.checkpoint)
        update = await asyncio.to_thread(_checked_files, update, roots)
        update.setdefault("checkpoint_file", None)  # none named: the latest (a file named at load is not kept)
        # (the name it is served under: one loaded without a name took its folder's, which another folder would change)
        sessions = request.app.state.sessions
        new = await manager.reload(name, old.spec.model_copy(update={**update, "name": name}), swapped=lambda old:
                                   sessions.end_deployment(old, f"ended: deployment {name!r} was reloaded with "
                                                                "another checkpoint"))
        return reply(request, as_served(new.info(), request.app.state.settings.max_inference_steps))

    async def unload(name: str, request: Request):
        old = request.app.state.manager.remove(name)
        request.app.state.sessions.end_deployment(old, f"ended: deployment {name!r} was unloaded")
        return reply(request, {"name": name, "unloaded": True})

    # The admin key is checked before the body is read (``auth.ApiKeyMiddleware``): a caller without it gets 401,
    # never a list of what its body got wrong.
    app.add_api_route("/admin/deployments", load, methods=["POST"], tags=["admin"], status_code=202,
                      summary="Load a deployment from a checkpoint under VLA_CHECKPOINT_ROOTS",
                      openapi_extra=operation_openapi(schema_ref(DeploymentSpec), success=202))
    app.add_api_route("/admin/deployments/{name}/reload", reload, methods=["POST"], tags=["admin"],
                      summary="Swap in another checkpoint with no failed request",
                      openapi_extra=operation_openapi(schema_ref(ReloadRequest)))
    app.add_api_route("/admin/deployments/{name}", unload, methods=["DELETE"], tags=["admin"],
                      summary="Unload a deployment and free its memory",
                      openapi_extra=operation_openapi())
