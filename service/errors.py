"""One error shape over HTTP: ``{"error": {"type", "message", "field"?, "request_id"?}}``.

No traceback or file path ever reaches a client; the server log has the details.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.codecs import encode_response
from service.request_ids import current_request_id, loggable_path, request_id_header
from vla_foundry.errors import InputTooLargeError, InvalidInputError, StaleObservationError

logger = logging.getLogger("service")

ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_value",
               503: "unavailable", 504: "timeout", 500: "internal_error"}


class ErrorDetail(BaseModel):
    type: str = Field(..., description="What kind of error (invalid_value, overloaded, timeout, ...).")
    message: str = Field(..., description="What was wrong, what is allowed, and the fix.")
    field: Optional[str] = Field(None, description="The request field at fault, as a dotted path.")
    request_id: Optional[str] = Field(None, description="The request's id (also in the X-Request-ID header).")
    param: Optional[str] = Field(None, description="On the /v1 routes: `field` under OpenAI's name for it, which "
                                                   "OpenAI's clients read.")
    code: Optional[str] = Field(None, description="On the /v1 routes: `type` under OpenAI's name for it.")


class ErrorBody(BaseModel):
    """The one error shape, whatever the status."""

    error: ErrorDetail


def retry_after_header(when: str) -> dict[str, Any]:
    """``Retry-After`` as an OpenAPI reply header: whole seconds (the server never sends a date), ``when`` sent."""
    return {"description": f"Seconds to wait before sending the request again; sent {when}.", "required": False,
            "schema": {"type": "integer", "minimum": 0}}


_RETRY_AFTER_503 = retry_after_header(
    "with a 503 that knows when to come back: a deployment loading or overloaded (the expected wait), images in "
    "flight over their budget, all robot sessions busy, the session store failing to answer, a request cut off "
    "by the drain at shutdown, or GET /health/ready not ready. A deployment that failed to load sends none")

# Documented on every route (FastAPI(responses=...)), so clients generated from /openapi.json know the shape.
# Errors come in msgpack too, to a client that prefers it (codecs.encode_response): the same schema. Every reply,
# errors included, carries the request's X-Request-ID (request_ids.RequestIds).
_MSGPACK_ERROR = {"application/msgpack": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_ERROR_DESCRIPTIONS = (
    (400, "Malformed body or header"), (401, "Missing or unknown API key"), (404, "No such route, type or deployment"),
    (409, "A stale observation, or a robot session that is gone, taken, of another deployment, or stepped on "
          "another replica at the same time (session_conflict)"),
    (413, "Body over VLA_MAX_BODY_BYTES or VLA_MAX_BODY_KEYS, images over their pixel limit, or a robot session's "
          "state over VLA_SESSION_STATE_MAX_BYTES"), (415, "Content-Type not JSON or msgpack"),
    (422, "A value is invalid (the field is named)"), (500, "Internal error (the log has details)"),
    (503, "Loading, overloaded, past admission, or the session store failing to answer (Retry-After says when "
          "to come back)"),
    (504, "The request's deadline passed before it could run"))
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description, "content": _MSGPACK_ERROR,
             "headers": {"X-Request-ID": request_id_header(),
                         **({"Retry-After": _RETRY_AFTER_503} if status == 503 else {})}}
    for status, description in _ERROR_DESCRIPTIONS}


def session_conflict_responses() -> dict[int | str, dict[str, Any]]:
    """The 409 of an operation that stores a robot session's step (``responses=``, over the app's one): a
    ``session_conflict`` comes with ``Retry-After: 0`` (send the step again now)."""
    conflict = ERROR_RESPONSES[409]
    return {409: {**conflict, "headers": {**conflict["headers"], "Retry-After": retry_after_header(
        "as 0 with a session_conflict (the session was stepped on another replica at the same time): send the "
        "request again now")}}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None, *, retry_after: Optional[int] = None,
                 type: Optional[str] = None, deadline: Optional[float] = None, wait_s: Optional[float] = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.retry_after = retry_after
        self.wait_s = wait_s  # an overload refusal's expected wait, in seconds, where admission knew it
        self.deadline = deadline  # the refused request's deadline (time.perf_counter()), where it had one
        self.type = type or ERROR_TYPES.get(status, "error")


def error_body(status: int, message: str, field: Optional[str] = None, type: Optional[str] = None,
               scope: Optional[dict] = None) -> dict[str, Any]:
    """The one error shape; ``request_id`` is the current request's (``request_ids.py``), to quote in a report. For a
    request to the /v1 routes (``scope``), also OpenAI's names of the field and type, which its clients read."""
    error: dict[str, Any] = {"type": type or ERROR_TYPES.get(status, "error"), "message": message}
    if field:
        error["field"] = field
    request_id = current_request_id.get()
    if request_id is not None:
        error["request_id"] = request_id
    if scope is not None and is_openai_route(scope):
        error.update(param=field, code=error["type"])
    return {"error": error}


def is_openai_route(scope: dict) -> bool:
    """Whether a request is to the OpenAI-compatible routes (/v1/..., as the app's routes see its path)."""
    from service.auth import app_path

    return app_path(scope).startswith("/v1/")


async def deny_upgrade(scope: dict, send, response: Response) -> bool:
    """Answers a websocket upgrade with ``response`` as its HTTP reply (status, headers, body: what any HTTP client
    reads), where the server supports ASGI's ``websocket.http.response``; False where it does not, and the caller
    closes the connection its own way (a close before accepting reaches the client as a bare 403)."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        return False
    await send({"type": "websocket.http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "websocket.http.response.body", "body": response.body})
    return True


def unexpected_error(scope: dict, exc: Exception) -> Response:
    """A 500 for an error no handler expected: logged with its traceback, answered without one (in the format the
    client accepts)."""
    logger.exception("unhandled error on %s %s", scope.get("method"), loggable_path(scope.get("path") or ""),
                     exc_info=exc)
    return error_response(Request(scope), 500, f"internal error ({type(exc).__name__}); the server log has details")


def error_response(request: Optional[Request], status: int, message: str, field: Optional[str] = None, *,
                   type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> Response:
    accept = request.headers.get("accept", "") if request is not None else ""
    body = error_body(status, message, field, type, scope=request.scope if request is not None else None)
    return encode_response(body, accept, status_code=status, headers=headers)


# No request field has these names.
_PLAIN_TYPE_LABELS = {"str", "int", "float", "bool", "bytes", "none", "dict", "list"}


def field_of_loc(loc: tuple) -> Optional[str]:
    """A pydantic error location → the request field it names (``observation.images.front``)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Drop pydantic's union-branch labels (e.g. "list[int]", "str") so the field reads like the request.
    parts = [p for p in parts if "[" not in p and "function-" not in p and p not in _PLAIN_TYPE_LABELS]
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    field = field_of_loc(tuple(err.get("loc", ())))
    if err.get("type") == "missing":
        if not field:  # the body itself (an empty request body)
            return "the request has no body; send a JSON (or msgpack) object with the fields of this route"
        return f"{field} is required"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    message = f"{field}: {msg}" if field else msg
    shown = repr(err.get("input"))
    # (a validator's own message may already show the value)
    return message + (f"; got {shown}" if "input" in err and len(shown) <= 80 and "; got " not in msg else "")


def _input_status(exc: InvalidInputError) -> int:
    # A value over a size limit is "too large" (413), not "malformed" (422): the fix is to send less. A stale
    # observation conflicts with the present (409): the fix is a fresh one.
    if isinstance(exc, StaleObservationError):
        return 409
    return 413 if isinstance(exc, InputTooLargeError) else 422


def _input_error_type(exc: InvalidInputError) -> Optional[str]:
    return "stale_observation" if isinstance(exc, StaleObservationError) else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        retry_after = await request.app.state.refusal_pacer.hold(exc)  # (deadlines.RefusalPacer)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return error_response(request, exc.status, exc.message, exc.field, type=exc.type, headers=headers)

    @app.exception_handler(InvalidInputError)
    async def _invalid_input(request: Request, exc: InvalidInputError):
        return error_response(request, _input_status(exc), str(exc), exc.field, type=_input_error_type(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", "")
            return error_response(request, 400, f"the body is not valid JSON ({reason}); send a JSON object, or "
                                                f"msgpack with Content-Type: application/msgpack")
        if any(e.get("loc") == ("body",) and e.get("type") in ("model_attributes_type", "dict_type", "model_type")
               for e in errors):
            return error_response(request, 400, "the body must be a JSON (or msgpack) object")
        first = errors[0]
        original = (first.get("ctx") or {}).get("error")
        status = 422
        if isinstance(original, InvalidInputError):  # cross-field checks name their field themselves
            message, field, status = str(original), original.field, _input_status(original)
        else:
            message, field = _validation_message(first), field_of_loc(tuple(first.get("loc", ())))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(request, status, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see GET /docs for the routes"
        return error_response(request, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # what escapes metrics.RequestMetrics' own catch
        return unexpected_error(request.scope, exc)
