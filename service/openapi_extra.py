"""What ``/openapi.json`` documents of an operation beyond what FastAPI sees from its endpoint: the headers the
middleware reads and adds (``X-Request-ID``, ``X-Request-Timeout``) and the msgpack request bodies that
``middleware.BodyCodecMiddleware`` turns into the values JSON gives. Every route module uses it, through each
route's ``openapi_extra``."""

from typing import Callable, Optional

from service.codecs import MSGPACK_TYPES
from service.deadlines import timeout_parameter
from service.request_ids import request_id_header, request_id_parameter


def operation_openapi(body: Optional[dict] = None, *, deadline: bool = False, success: int = 200) -> dict:
    """An operation's ``openapi_extra``: what the middleware reads and adds, which FastAPI cannot see from the
    endpoint. The ``X-Request-ID`` header (every request; ``request_ids.py``) and, where ``deadline`` (the operation
    queues for a model, which acts on it), ``X-Request-Timeout`` (``deadlines.py``); the request body in msgpack
    beside JSON, ``body`` being its JSON schema (``middleware.BodyCodecMiddleware`` unpacks each msgpack type into
    the values JSON gives, so one schema serves both); the ``X-Request-ID`` of its ``success`` reply (error replies
    have theirs in ``errors.ERROR_RESPONSES``)."""
    extra: dict = {"parameters": [request_id_parameter(), *([timeout_parameter()] if deadline else [])],
                   "responses": {str(success): {"headers": {"X-Request-ID": request_id_header()}}}}
    if body is not None:
        extra["requestBody"] = {
            "description": "JSON, or msgpack with the same fields (in msgpack a typed array's `data` is raw bytes "
                           "rather than base64 text).",
            "content": {media_type: {"schema": body} for media_type in MSGPACK_TYPES}}
    return extra


def schema_ref(model: type) -> dict:
    """The JSON schema of a request model, as FastAPI documents an endpoint's body (named after its class)."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document_api_keys(schema: dict, needs_key: Callable[[str], bool], admin: bool) -> dict:
    """``schema`` (the app's OpenAPI document) saying which operations take an API key (``needs_key(path)``) as a
    bearer token (``auth.ApiKeyMiddleware``): Swagger UI at ``/docs`` then offers an Authorize button, and "Try it
    out" sends the key."""
    text = "An API key of VLA_API_KEYS, as `Authorization: Bearer <key>`" + (
        " (the /admin/ routes take a key of VLA_ADMIN_KEYS)." if admin else ".")
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http", "scheme": "bearer", "description": text}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation["security"] = [{"apiKey": []}] if needs_key(path) else []
    return schema
