"""``POST /predict/{type}`` and ``POST /evaluate/{type}`` for every registered type.

Routes are generated from the registry: each type gets its modality's schemas under its
own name (so /docs shows one request schema per type), and a new model type of an
existing modality is served without touching this package.
"""

# No `from __future__ import annotations`: FastAPI reads the generated request classes
# from the endpoint's real annotations.

import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from service.auth import caller_of
from service.codecs import MSGPACK, encode_response
from service.deadlines import tightened
from service.deployments import DeploymentManager
from service.disconnects import unless_client_leaves
from service.errors import ApiError, session_conflict_responses
from service.middleware import reply_in_bytes_keys
from service.modalities import ADAPTERS
from service.modalities.base import ModalityAdapter, ModelCall
from service.openapi_extra import operation_openapi, schema_ref
from service.settings import Settings
from vla_foundry.errors import unknown_key_error
from vla_foundry.models.registry import is_model_registered, list_registered_models, model_modality

KINDS = ("predict", "evaluate")


def _camel(model_type: str) -> str:
    return "".join(part.capitalize() for part in model_type.split("_"))


def _endpoint(model_type: str, kind: str, request_cls: type, adapter: ModalityAdapter):
    make_call = adapter.predict_call if kind == "predict" else adapter.evaluate_call
    encode = adapter.encode_predict if kind == "predict" else adapter.encode_evaluate
    reply = adapter.reply if kind == "predict" else None
    session_run = adapter.session_predict if kind == "predict" else None
    check = adapter.check if kind == "predict" else None
    batchable = (adapter.batch_key if kind == "predict" else adapter.evaluate_batch_key) is not None

    def check_and_prepare(pipeline, body) -> None:  # cheap refusals first: no image decode for them
        if check is not None:
            check(pipeline, body)
        adapter.prepare(body)

    expiry = adapter.expires if kind == "predict" else None

    async def endpoint(body: request_cls, request: Request):
        started = time.perf_counter()
        # The manager straight from the app state, not Depends(get_manager): solving a sub-dependency costs
        # about 0.1 ms per request here (measured in process, right after a model run has cooled the caches).
        manager: DeploymentManager = request.app.state.manager
        deployment = manager.resolve(model_type, body.model, kind)
        with tightened(body.timeout_s, started):  # before decoding: a refusal costs no image decode
            deployment.admit(batchable, stage="decode")
        # decode: the request's images, before it queues (on the loop when that is cheaper than the hop)
        prepare_ms = 0.0
        if adapter.prepare is not None:
            if adapter.prepare_on_loop is not None and adapter.prepare_on_loop(body):
                adapter.prepare(body)
            else:
                with deployment.reserving(batchable):  # admission counts it while it decodes
                    await run_in_threadpool(check_and_prepare, deployment.pipeline, body)
            prepare_ms = (time.perf_counter() - started) * 1000
            deployment = deployment.current()  # reloaded while the images decoded: the new one
        # run: one call into the deployment (a robot session's requests one at a time, in arrival order)
        session_id = getattr(body, "session_id", None)
        with tightened(body.timeout_s, started, expiry(deployment.pipeline, body) if expiry else None):
            if session_run is not None and session_id is not None:
                entry = request.app.state.sessions.acquire(session_id, deployment, caller_of(request.scope))
                call = ModelCall(session_run, (body, entry.policy), adapter.batch_key(body))
                timed = await entry.call(deployment.call(call))
            else:  # a client that leaves while its call is queued gets it dropped (disconnects.py)
                call = make_call(body)
                timed = await unless_client_leaves(request, deployment.call(call), deployment.name)
        # encode
        value = (await run_in_threadpool(encode, body, timed.value) if adapter.encode_in_pool
                 else encode(body, timed.value))
        # A pipeline may split its run time (e.g. preprocess / infer); decoding before the queue is preprocess.
        timing = {"queue": timed.queue_ms, "infer": timed.run_ms, **value.pop("timing_ms", {})}
        if call.batch_key is not None or call.start is not None:  # batched, or a generation
            timing["batch_size"] = timed.batch_size
        if "preprocess" in timing:
            timing["preprocess"] += prepare_ms
        total = (time.perf_counter() - started) * 1000
        payload = {"model": deployment.name, **value,
                   "timing_ms": {**{k: round(v, 3) for k, v in timing.items()}, "total": round(total, 3)}}
        request.app.state.metrics.observe_reply(deployment.name, payload)
        accept = request.headers.get("accept", "")
        special = reply(payload, accept) if reply is not None else None
        if special is not None:
            return special
        return encode_response(payload, accept, bytes_keys=reply_in_bytes_keys(request))

    return endpoint


def _reply_openapi(response: type, special: Optional[dict]) -> dict:
    """The 200 reply in /openapi.json besides the JSON one FastAPI documents from ``response``: msgpack, which
    every route answers with to a client that prefers it, and the modality's own (``ModalityAdapter.reply_openapi``,
    e.g. image/png)."""
    # The JSON reply's schema, which FastAPI names after the model's class.
    reply = {"description": "JSON, or msgpack to a client that prefers it (`Accept: application/msgpack`): the same "
                            "fields, with a typed array's `data` as raw bytes beside `__ndarray__: true`.",
             "content": {MSGPACK: {"schema": {"$ref": f"#/components/schemas/{response.__name__}"}}}}
    if special is None:
        return reply
    return {**reply, **special, "content": {**reply["content"], **special["content"]}}


def add_inference_routes(app: FastAPI, settings: Settings) -> None:
    for model_type in list_registered_models():
        adapter = ADAPTERS.get(model_modality(model_type))
        if adapter is None:
            continue
        parts = {"predict": (adapter.predict_request, adapter.predict_response),
                 "evaluate": (adapter.evaluate_request, adapter.evaluate_response)}
        for kind, (base, response) in parts.items():
            request_cls = type(f"{_camel(model_type)}{kind.capitalize()}Request", (base,), {
                "__module__": __name__, **base.limits_from(settings)})
            endpoint = _endpoint(model_type, kind, request_cls, adapter)
            # A policy's predict may carry a robot session (session_id), whose stored step may conflict (409).
            sessions = session_conflict_responses() if kind == "predict" and adapter.session_predict is not None else {}
            app.add_api_route(f"/{kind}/{model_type}", endpoint,
                              methods=["POST"],
                              response_model=response, tags=[kind], name=f"{kind}_{model_type}",
                              responses={200: _reply_openapi(response, adapter.reply_openapi if kind == "predict"
                                                             else None), **sessions},
                              openapi_extra=operation_openapi(schema_ref(request_cls), deadline=True),
                              summary=f"{kind.capitalize()} with a {model_type} deployment")

    async def unknown_type(model_type: str):
        if not is_model_registered(model_type):
            raise ApiError(404, str(unknown_key_error("model type", model_type, list_registered_models())))
        raise ApiError(404, f"type {model_type!r} is registered, but this server has no endpoints for its "
                            f"modality ({model_modality(model_type)!r})")

    for kind in KINDS:  # after the typed routes, so only unknown types land here
        app.add_api_route(f"/{kind}/{{model_type}}", unknown_type, methods=["POST"], include_in_schema=False)
