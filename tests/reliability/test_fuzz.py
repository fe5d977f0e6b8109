"""Property-based fuzzing of every documented route with Schemathesis, from the app's own ``/openapi.json``.

Tiny models of every registered type are served (API keys on, so the key check is part of every
case); Schemathesis generates requests from each operation's schema (valid and invalid ones) and
checks that no reply is a 5xx and that every reply matches the status codes and schemas the
schema declares. ``VLA_FUZZ_EXAMPLES`` caps the cases per operation (default 80: over 1000 in all; routes
without parameters need one).

Generated cases rarely get past the schema, so the valid ``/predict/{type}`` and ``/evaluate/{type}`` bodies of
every type (tests/factories.py) are also mutated one value at a time: each value (dict entries, the first 3 items
of each list, at every depth) removed or replaced by two wrong ones (``REPLACEMENTS``), about 250 predict and 390
evaluate bodies, a few seconds per route on 2 cores.
"""

from __future__ import annotations

import copy
import os
import random
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from service import DeploymentSpec, Settings, create_app
from tests.service.conftest import wait_ready

# Deliberate refusals in the one error shape: a deadline the request itself set passed (504), or the deployment
# is loading or full (503). Any other 5xx is a fault.
REFUSALS = {503: {"unavailable", "overloaded"}, 504: {"timeout"}}
EXAMPLES = int(os.environ.get("VLA_FUZZ_EXAMPLES", "80"))
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    """The app, started once (its lifespan runs once) for both tests."""
    from fastapi.testclient import TestClient

    specs = [DeploymentSpec(name=f"tiny-{t}", checkpoint=str(p)) for t, p in tiny_checkpoints.items()]
    app = create_app(Settings(deployments=specs, device="cpu", api_keys=KEY, max_new_tokens=8, max_batch=4,
                              max_inference_steps=4, max_body_bytes=256 * 1024))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        wait_ready(client)
        yield client


# ----------------------------------------------------------------------------- mutations of valid bodies

# What replaces one value of a valid body: wrong types, extremes, empties, and typed arrays that lie.
REPLACEMENTS = [None, -1, 0, 2**63, 1e308, -1e308, 1e20, 3e38, "", "x" * 5000, True, [], {}, [[[]]], [1, "a", None],
                {"dtype": "|u1", "shape": [4096, 4096, 3], "data": "AAAA"}, {"dtype": ",", "shape": [1], "data": ""},
                {"dtype": "<f4", "shape": [-1], "data": "AAAA"}, {"dtype": "|O", "shape": [1], "data": "AA=="},
                "data:image/png;base64,AAAA", "not base64 at all!"]


def paths(value, prefix=()):
    """Every path to a value inside a JSON body (dict keys and list indices, the first 3 items of a list)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix + (key,)
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield prefix + (index,)
            yield from paths(item, prefix + (index,))


def replaced(body, path, new):
    """A deep copy of ``body`` with the value at ``path`` replaced by ``new`` (deleted when ``new`` is DELETE)."""
    body = copy.deepcopy(body)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return body


DELETE = object()


@pytest.mark.parametrize("kind", ["predict", "evaluate"])
def test_mutated_valid_bodies_never_fail_the_server(client, kind):
    """Each valid ``/predict`` and ``/evaluate`` body of every type (tests/factories.py), with each of its values
    replaced by two wrong ones (REPLACEMENTS, a seeded sample) or removed: a reply in the one error shape (or a
    200), never a 5xx. These get past the schema, into image, observation and action decoding, where generated
    cases rarely go. Each request is timed; the slowest 10 are printed (run with ``-s``)."""
    from tests.factories import EVALUATE_REQUESTS, PREDICT_REQUESTS

    bodies = PREDICT_REQUESTS if kind == "predict" else EVALUATE_REQUESTS
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    timings: list[tuple[float, str, tuple, str, int]] = []
    for model_type, body in bodies.items():
        body = {**body, "model": f"tiny-{model_type}"}
        for path in paths(body):
            for new in [DELETE, *rng.sample(REPLACEMENTS, 2)]:
                mutated = replaced(body, path, new)
                started = time.perf_counter()
                response = client.post(f"/{kind}/{model_type}", json=mutated)
                timings.append((time.perf_counter() - started, model_type, path,
                                "DELETE" if new is DELETE else repr(new)[:40], response.status_code))
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500 or (
                    response.status_code in REFUSALS and response.json()["error"]["type"]
                    in REFUSALS[response.status_code]), (model_type, path, new, response.text[:300])
                if response.status_code != 200:
                    assert set(response.json()) == {"error"}, response.text[:300]
    timings.sort(key=lambda t: t[0], reverse=True)
    print(f"\n{kind}: {sum(statuses.values())} mutated bodies in {sum(t[0] for t in timings):.1f}s, statuses "
          f"{dict(sorted(statuses.items()))}; slowest 10 (seconds, type, path, replacement, status):")
    for seconds, model_type, path, new, status in timings[:10]:
        print(f"  {seconds:6.3f}s  /{kind}/{model_type}  {path}  {new}  -> {status}")
    assert sum(statuses.values()) > 150


def value_at(body, path):
    for step in path:
        body = body[step]
    return body


@pytest.mark.parametrize("kind", ["predict", "evaluate"])
def test_huge_finite_numbers_never_fail_the_server(client, kind):
    """Every number of each valid body (the first items of each list) replaced by finite values far outside any
    model's range. Found by the mutations above: 3e38 in a policy's joint position, or 1e20 in an action to score,
    overflowed to infinity inside the model, and the reply then failed to encode (500)."""
    from tests.factories import EVALUATE_REQUESTS, PREDICT_REQUESTS

    bodies = PREDICT_REQUESTS if kind == "predict" else EVALUATE_REQUESTS
    sent = 0
    for model_type, body in bodies.items():
        body = {**body, "model": f"tiny-{model_type}"}
        numbers = [p for p in paths(body) if type(value_at(body, p)) in (int, float)]
        for path in numbers:
            for new in (1e20, 3e38, -3e38):
                response = client.post(f"/{kind}/{model_type}", json=replaced(body, path, new))
                sent += 1
                assert response.status_code < 500 or (
                    response.status_code in REFUSALS and response.json()["error"]["type"]
                    in REFUSALS[response.status_code]), (model_type, path, new, response.text[:300])
    assert sent > 30


# Last in this module: Schemathesis's ASGI transport runs the app's lifespan, whose end stops the model threads.
@schemathesis.check
def no_server_fault(ctx, response, case):
    """Schemathesis' ``not_a_server_error``, but for the refusals the API documents (``REFUSALS``)."""
    if response.status_code in REFUSALS:
        assert response.json()["error"]["type"] in REFUSALS[response.status_code], response.text
        return True
    return not_a_server_error(ctx, response, case)


def test_every_route_holds_under_fuzzing(client):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            counts[case.operation.label] = counts.get(case.operation.label, 0) + 1
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                   checks=[no_server_fault, status_code_conformance, response_schema_conformance])

        fuzz()
    print(f"{sum(counts.values())} cases over {len(counts)} operations")
    assert len(counts) >= 30 and sum(counts.values()) >= (1000 if EXAMPLES >= 80 else 1)
