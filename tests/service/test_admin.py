"""Live model control (``/admin/deployments``): load, reload under load with no failed request, unload; admin
keys apart from the clients' keys; checkpoints only from the allowed roots."""

from __future__ import annotations

import shutil
import threading
import time

import msgpack
import pytest
import torch

from service import DeploymentSpec
from tests.factories import PREDICT_REQUESTS
from tests.service.conftest import serving, wait_ready
from tests.service.test_sessions import current, without_timing

FULL = {**PREDICT_REQUESTS["diffusion_policy"], "model": "policy", "seed": 1}  # a whole observation window

CLIENT, ADMIN = {"Authorization": "Bearer client-key"}, {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def roots(tiny_checkpoints, tmp_path_factory):
    return allowed_root(tiny_checkpoints, tmp_path_factory)


def allowed_root(tiny_checkpoints, tmp_path_factory):
    """An allowed root holding the tiny policy twice: ``policy-a`` as built, ``policy-b`` with a newer checkpoint
    (step 222) beside the old one; and a text model outside the root."""
    root = tmp_path_factory.mktemp("allowed")
    a, b = root / "policy-a", root / "policy-b"
    shutil.copytree(tiny_checkpoints["diffusion_policy"], a)
    shutil.copytree(a, b)
    payload = torch.load(b / "checkpoints" / "checkpoint_1.pt", weights_only=True)
    torch.save({**payload, "checkpoint_num": 2, "global_step": 222}, b / "checkpoints" / "checkpoint_2.pt")
    shutil.copytree(tiny_checkpoints["transformer"], root / "lm")
    return root


@pytest.fixture
def client(roots):
    with serving(DeploymentSpec(name="policy", checkpoint=str(roots / "policy-a")), api_keys="client-key",
                 admin_keys="admin-key", checkpoint_roots=str(roots)) as c:
        yield c


def predict(client) -> dict:
    response = client.post("/predict/diffusion_policy", json=FULL, headers=CLIENT)
    assert response.status_code == 200, response.text
    return response.json()


def test_without_admin_keys_there_is_no_admin_api(tiny_checkpoints):
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"]))) as c:
        assert c.post("/admin/deployments", json={"checkpoint": "/x"}).status_code == 404


def test_admin_and_client_keys_are_apart(client, roots):
    body = {"name": "lm", "checkpoint": str(roots / "lm")}
    assert client.post("/admin/deployments", json=body, headers=CLIENT).status_code == 401
    assert client.post("/admin/deployments", json=body).status_code == 401
    # before the body is validated: no list of what a body got wrong for a caller without the key
    assert client.post("/admin/deployments", json={"nme": 1}).status_code == 401
    assert client.post("/admin/deployments/policy/reload", json={"bogus": 1}, headers=CLIENT).status_code == 401
    assert client.get("/models", headers=ADMIN).status_code == 401  # an admin key is not a client key


def test_checkpoints_only_from_the_allowed_roots(client, roots, tiny_checkpoints, tmp_path):
    outside = client.post("/admin/deployments", json={"name": "x", "checkpoint": str(tiny_checkpoints["vlm"])},
                          headers=ADMIN)
    assert outside.status_code == 422 and outside.json()["error"]["field"] == "checkpoint"
    assert str(roots) in outside.json()["error"]["message"]
    escape = roots / "escape"  # a symlink inside the root that points out of it
    escape.symlink_to(tiny_checkpoints["vlm"])
    try:
        assert client.post("/admin/deployments", json={"name": "x", "checkpoint": str(escape)},
                           headers=ADMIN).status_code == 422
    finally:
        escape.unlink()
    url = client.post("/admin/deployments", json={"name": "x", "checkpoint": "https://example.com/ckpt"},
                      headers=ADMIN)
    assert url.status_code == 422 and "URL" in url.json()["error"]["message"]
    # the weights file and the tokenizer stay inside too: a file name in checkpoints/, a directory under a root
    weights = tiny_checkpoints["transformer"] / "checkpoints" / "checkpoint_1.pt"
    lm = str(roots / "lm")
    for fields, field in (({"checkpoint_file": str(weights)}, "checkpoint_file"),
                          ({"checkpoint_file": f"../../../{weights.relative_to(weights.anchor)}"}, "checkpoint_file"),
                          ({"checkpoint_file": ".."}, "checkpoint_file"),
                          ({"tokenizer": str(tiny_checkpoints["transformer"] / "tokenizer")}, "tokenizer")):
        refused = client.post("/admin/deployments", json={"name": "x", "checkpoint": lm, **fields}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, (fields, refused.text)
        refused = client.post("/admin/deployments/policy/reload", json={"checkpoint": lm, **fields}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, (fields, refused.text)
    # a NUL character (the OS cannot take it) is the field's fault, not a server error
    for path, name in (("/admin/deployments", {"name": "x"}), ("/admin/deployments/policy/reload", {})):
        refused = client.post(path, json={**name, "checkpoint": lm + "\x00/etc"}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "checkpoint", refused.text
    # a weights file the load would pick by itself (the latest), linked out of the root, is refused as one named
    linked = roots / "linked-out"
    (linked / "checkpoints").mkdir(parents=True)
    for side_file in (roots / "lm").iterdir():
        if side_file.is_file():
            shutil.copy(side_file, linked / side_file.name)
    (linked / "checkpoints" / "checkpoint_1.pt").symlink_to(weights)
    try:
        for path, name in (("/admin/deployments", {"name": "x"}), ("/admin/deployments/policy/reload", {})):
            refused = client.post(path, json={**name, "checkpoint": str(linked)}, headers=ADMIN)
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "checkpoint", refused.text
            assert "checkpoint_1.pt" in refused.json()["error"]["message"]
        (linked / "checkpoints" / "checkpoint_1.pt").unlink()
        (linked / "loop").symlink_to(linked / "loop")  # a link loop: the field's fault, not a server error
        refused = client.post("/admin/deployments", json={"name": "x", "checkpoint": str(linked)}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "checkpoint", refused.text
        assert "cannot be resolved" in refused.json()["error"]["message"]
    finally:
        shutil.rmtree(linked)
    assert "x" not in {d["name"] for d in client.get("/models", headers=CLIENT).json()["deployments"]}
    inside = client.post("/admin/deployments", json={"name": "x", "checkpoint": lm,
                                                     "checkpoint_file": "checkpoint_1.pt"}, headers=ADMIN)
    assert inside.status_code == 202, inside.text


def test_load_serve_and_unload(client, roots):
    loaded = client.post("/admin/deployments", json={"name": "lm", "checkpoint": str(roots / "lm")}, headers=ADMIN)
    assert loaded.status_code == 202 and loaded.json()["name"] == "lm"
    assert client.post("/admin/deployments", json={"name": "lm", "checkpoint": str(roots / "lm")},
                       headers=ADMIN).status_code == 409  # the name is taken
    wait_ready(client)
    text = client.post("/predict/transformer", json={"model": "lm", "prompt": "a", "max_new_tokens": 2},
                       headers=CLIENT)
    assert text.status_code == 200, text.text
    assert 'deployment="lm"' in client.get("/metrics", headers=CLIENT).text
    assert client.delete("/admin/deployments/lm", headers=ADMIN).json() == {"name": "lm", "unloaded": True}
    names = [d["name"] for d in client.get("/models", headers=CLIENT).json()["deployments"]]
    assert names == ["policy"]
    deadline = time.monotonic() + 10  # its series leave with it, once it has run its last call
    while 'deployment="lm"' in client.get("/metrics", headers=CLIENT).text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'deployment="lm"' not in client.get("/metrics", headers=CLIENT).text
    assert 'deployment="policy"' in client.get("/metrics", headers=CLIENT).text
    gone = client.post("/predict/transformer", json={"model": "lm", "prompt": "a"}, headers=CLIENT)
    assert gone.status_code == 404
    for unknown in (client.delete("/admin/deployments/lm", headers=ADMIN),
                    client.post("/admin/deployments/lm/reload", json={}, headers=ADMIN)):
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "name"  # the path's name


def test_a_reload_keeps_the_deployments_type(client, roots):
    """Its clients call /predict/{type} by its name: a checkpoint of another type is refused before it loads, and
    the deployment keeps serving."""
    refused = client.post("/admin/deployments/policy/reload", json={"checkpoint": str(roots / "lm")}, headers=ADMIN)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "checkpoint", refused.text
    assert "'transformer'" in refused.json()["error"]["message"]
    assert "'diffusion_policy'" in refused.json()["error"]["message"]
    assert client.get("/models/policy", headers=CLIENT).json()["type"] == "diffusion_policy"
    predict(client)


def test_reload_under_load_fails_no_request(client, roots):
    before = predict(client)
    assert before["checkpoint_step"] != 222
    session = client.post("/predict/diffusion_policy", json={"model": "policy", "observation": current(0),
                                                             "session_id": "robot-1"}, headers=CLIENT)
    assert session.status_code == 200
    steps, per_client, failures, stop = [], [[], [], []], [], threading.Event()

    def robot_loop(mine: list):
        while not stop.is_set():
            response = client.post("/predict/diffusion_policy", json=FULL, headers=CLIENT)
            if response.status_code == 200:
                mine.append(response.json()["checkpoint_step"])
                steps.append(mine[-1])
            else:
                failures.append(response.text)

    threads = [threading.Thread(target=robot_loop, args=(mine,)) for mine in per_client]
    for thread in threads:
        thread.start()
    try:
        reloaded = client.post("/admin/deployments/policy/reload", json={"checkpoint": str(roots / "policy-b")},
                               headers=ADMIN)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["checkpoint"]["step"] == 222
        seen, deadline = len(steps), time.monotonic() + 60
        while len(steps) < seen + 6 and time.monotonic() < deadline:  # a few requests on the new checkpoint
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert steps[0] == before["checkpoint_step"] and steps[-1] == 222
    # Each client sees old replies, then new ones, never back. (Across clients the completions interleave: the
    # old checkpoint answers what was queued before the swap while the new one already serves.)
    for mine in per_client:
        assert mine == sorted(mine, key=lambda s: s == 222), mine
    # the reloaded deployment's sessions ended; their robot is told so
    gone = client.post("/predict/diffusion_policy", json={"model": "policy", "observation": current(1),
                                                          "session_id": "robot-1"}, headers=CLIENT)
    assert gone.status_code == 409 and "reloaded" in gone.json()["error"]["message"]
    # a reload that cannot load leaves the serving checkpoint in place
    broken = roots / "broken"
    shutil.copytree(roots / "policy-a", broken, dirs_exist_ok=True)
    (broken / "checkpoints" / "checkpoint_1.pt").write_bytes(b"not a checkpoint")
    failed = client.post("/admin/deployments/policy/reload", json={"checkpoint": str(broken)}, headers=ADMIN)
    assert failed.status_code == 422 and "keeps serving" in failed.json()["error"]["message"]
    assert predict(client)["checkpoint_step"] == 222


def test_a_deployment_loading_through_the_admin_api_leaves_the_server_ready(client, roots, monkeypatch):
    """Readiness is for the deployments the server started with: one added while it serves loads beside them,
    and a load balancer must not move away from those meanwhile (it did: 503 for as long as the load took)."""
    import concurrent.futures

    from service.deployments import Deployment

    assert client.get("/health/ready").status_code == 200
    monkeypatch.setattr(Deployment, "start_loading", lambda self: concurrent.futures.Future())  # loads forever
    added = client.post("/admin/deployments", json={"name": "slow", "checkpoint": str(roots / "lm")}, headers=ADMIN)
    assert added.status_code == 202, added.text
    probe = client.get("/health/ready")
    assert probe.status_code == 200 and probe.json()["deployments"]["slow"] == "loading", probe.text
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        loading = client.post(path, json={"model": "slow", "max_tokens": 2, **body}, headers=CLIENT)
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"], loading.text


def test_a_deployment_name_must_be_addressable(client, roots):
    """A name is a URL segment, a metrics label and a log field: one with a slash could never be unloaded or
    reloaded (its routes 404), and control characters would forge log lines."""
    for name in ("a/b", "two\nlines", "", " padded", "x" * 129):
        refused = client.post("/admin/deployments", json={"name": name, "checkpoint": str(roots / "lm")},
                              headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "name", (name, refused.text)
    assert client.post("/admin/deployments", json={"name": "lm v2.1", "checkpoint": str(roots / "lm")},
                       headers=ADMIN).status_code == 202
    refused = client.post("/admin/deployments", json={"name": "a/b", "checkpoint": str(roots / "lm")},
                          headers=ADMIN)
    assert refused.json()["error"]["message"].count("got 'a/b'") == 1  # the value shown once
    schema = client.get("/openapi.json").json()["components"]["schemas"]["DeploymentSpec"]["properties"]["name"]
    assert schema["maxLength"] == 128 and schema["minLength"] == 1 and "pattern" in schema


def test_a_session_on_an_unloaded_deployment_is_freed_by_its_reset(client, roots):
    """A robot's session on a deployment that is then unloaded is reported gone (409); its reset answers 200 with
    no model (there is none to start the episode on), and its next request, to a deployment still served, starts
    a session there rather than being told again that it is gone."""
    loaded = client.post("/admin/deployments", json={"name": "p2", "checkpoint": str(roots / "policy-b")},
                         headers=ADMIN)
    assert loaded.status_code == 202, loaded.text
    wait_ready(client)
    first = client.post("/sessions/arm/step", json={"model": "p2", "observation": current(0), "step": 0},
                        headers=CLIENT)
    assert first.status_code == 200 and first.json()["model"] == "p2", first.text
    assert client.delete("/admin/deployments/p2", headers=ADMIN).status_code == 200
    gone = client.post("/sessions/arm/step", json={"observation": current(1), "step": 1}, headers=CLIENT)
    assert gone.status_code == 409 and gone.json()["error"]["type"] == "session_gone", gone.text
    reset = client.post("/sessions/arm/reset", json={"seed": 4}, headers=CLIENT)
    assert reset.status_code == 200, reset.text
    assert without_timing(reset.json()) == {"session_id": "arm", "model": None, "reset": True, "seed": 4}
    again = client.post("/sessions/arm/step", json={"model": "policy", "observation": current(0), "step": 0},
                        headers=CLIENT)
    assert again.status_code == 200 and again.json()["model"] == "policy", again.text


def test_the_admin_operations_document_their_headers_and_msgpack_bodies(client, roots):
    """As every operation: X-Request-ID in and out, and the body in msgpack beside JSON; a msgpack load is taken."""
    paths = client.get("/openapi.json").json()["paths"]
    load, reload = paths["/admin/deployments"]["post"], paths["/admin/deployments/{name}/reload"]["post"]
    unload = paths["/admin/deployments/{name}"]["delete"]
    for operation, success in ((load, "202"), (reload, "200"), (unload, "200")):
        assert "X-Request-ID" in {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert "X-Request-ID" in operation["responses"][success]["headers"]
    for operation in (load, reload):
        content = operation["requestBody"]["content"]
        assert content["application/msgpack"]["schema"] == content["application/json"]["schema"]
    loaded = client.post("/admin/deployments", headers={**ADMIN, "content-type": "application/msgpack"},
                         content=msgpack.packb({"name": "lm-msgpack", "checkpoint": str(roots / "lm")}))
    assert loaded.status_code == 202, loaded.text
    assert client.delete("/admin/deployments/lm-msgpack", headers=ADMIN).status_code == 200


def test_a_reload_keeps_the_name_of_a_deployment_loaded_without_one(client, roots):
    """Loaded without ``name``, a deployment is named after its folder; reloaded with another folder it keeps the
    name it is served, addressed and labelled under (before, it called itself after the new folder: its metrics
    series stopped moving, and that name could be loaded a second time)."""
    added = client.post("/admin/deployments", json={"checkpoint": str(roots / "policy-a")}, headers=ADMIN)
    assert added.status_code == 202 and added.json()["name"] == "policy-a", added.text
    wait_ready(client)
    reloaded = client.post("/admin/deployments/policy-a/reload", json={"checkpoint": str(roots / "policy-b")},
                           headers=ADMIN)
    assert reloaded.status_code == 200 and reloaded.json()["name"] == "policy-a", reloaded.text
    assert [d["name"] for d in client.get("/models", headers=CLIENT).json()["deployments"]] == ["policy", "policy-a"]
    served = client.post("/predict/diffusion_policy", json={**FULL, "model": "policy-a"}, headers=CLIENT)
    assert served.status_code == 200 and served.json()["checkpoint_step"] == 222, served.text
    scrape = client.get("/metrics", headers=CLIENT).text
    assert 'vla_model_run_seconds_count{deployment="policy-a"}' in scrape


def test_an_empty_reload_serves_the_latest_checkpoint_file(client, roots):
    """``checkpoint_file`` defaults to the latest: a deployment loaded with a named file and reloaded with ``{}``
    serves the newest file of its experiment (before, the file named at load stayed)."""
    added = client.post("/admin/deployments", json={"name": "pinned", "checkpoint": str(roots / "policy-b"),
                                                    "checkpoint_file": "checkpoint_1.pt"}, headers=ADMIN)
    assert added.status_code == 202, added.text
    wait_ready(client)
    assert client.get("/models/pinned", headers=CLIENT).json()["checkpoint"]["step"] != 222
    reloaded = client.post("/admin/deployments/pinned/reload", json={}, headers=ADMIN)
    assert reloaded.status_code == 200 and reloaded.json()["checkpoint"]["step"] == 222, reloaded.text
    pinned = client.post("/admin/deployments/pinned/reload", json={"checkpoint_file": "checkpoint_1.pt"}, headers=ADMIN)
    assert pinned.status_code == 200 and pinned.json()["checkpoint"]["step"] != 222, pinned.text


@pytest.mark.parametrize("body", [
    dict(content=b"{not json", headers={"content-type": "application/json"}),
    dict(content=b"<x/>", headers={"content-type": "application/xml"}),
    dict(content=b"\x00" * 40, headers={"content-type": "application/msgpack"}),
    dict(content=b'{"checkpoint": "' + b"a" * (17 << 20) + b'"}', headers={"content-type": "application/json"}),
], ids=["bad json", "another type", "bad msgpack", "over the size cap"])
def test_a_caller_without_the_admin_key_gets_401_before_its_body_is_read(client, body):
    """As for a client key: 401 with ``WWW-Authenticate`` whatever the body (before, the admin key was checked
    after the body was read and parsed: 400, 413 or 415, and a 401 without the header)."""
    for headers in ({}, CLIENT):
        refused = client.post("/admin/deployments", **{**body, "headers": {**body["headers"], **headers}})
        assert refused.status_code == 401 and "admin key" in refused.json()["error"]["message"], refused.text[:300]
        assert refused.headers["www-authenticate"].startswith("Bearer")


def test_a_reload_of_a_deployment_still_loading_keeps_its_type(client, roots, monkeypatch):
    """Its type is read from its checkpoint while it loads: a reload with another type's checkpoint is refused then
    too (before, a deployment not yet loaded had no type to compare, and its name could be given to a text model
    that its robots would then call)."""
    import concurrent.futures

    from service.deployments import Deployment

    def start_loading(self):  # the policy loads for ever; another checkpoint's load ends at once, unready
        loading = concurrent.futures.Future()
        if not self.spec.checkpoint.endswith("policy-a"):
            loading.set_result(None)
        return loading

    monkeypatch.setattr(Deployment, "start_loading", start_loading)
    added = client.post("/admin/deployments", json={"name": "slow", "checkpoint": str(roots / "policy-a")},
                        headers=ADMIN)
    assert added.status_code == 202, added.text
    refused = client.post("/admin/deployments/slow/reload", json={"checkpoint": str(roots / "lm")}, headers=ADMIN)
    assert refused.status_code == 422 and "keeps the type" in refused.json()["error"]["message"], refused.text


def test_a_second_reload_while_one_loads_is_refused_at_once(client, roots, monkeypatch):
    """Two reloads of one deployment: the second, sent while the first loads, gets 409 at once naming the reload in
    flight (before, it loaded a whole model beside the first, then got 409 "changed while this reload loaded"); the
    first then takes over as usual, and a reload after it is served."""
    import concurrent.futures

    loads, release = hold_first_load(monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/admin/deployments/policy/reload",
                            json={"checkpoint": str(roots / "policy-b")}, headers=ADMIN)
        deadline = time.monotonic() + 10
        while not loads and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post("/admin/deployments/policy/reload", json={}, headers=ADMIN)
        assert second.status_code == 409, second.text
        assert "still loading" in second.json()["error"]["message"] and second.json()["error"]["field"] == "name"
        assert len(loads) == 1  # nothing loaded for it
        release.set()
        assert first.result(30).status_code == 200, first.result().text
    assert first.result().json()["checkpoint"]["step"] == 222
    again = client.post("/admin/deployments/policy/reload", json={}, headers=ADMIN)
    assert again.status_code == 200, again.text


def served_step(client) -> int:
    return client.get("/models/policy", headers=CLIENT).json()["checkpoint"]["step"]


def hold_first_load(monkeypatch) -> tuple[list, threading.Event]:
    """From now on the first deployment to load waits until the returned event is set; the others load as usual.
    Also returns the list of the checkpoints loaded since."""
    import concurrent.futures

    from service.deployments import Deployment

    loads, release, real_start = [], threading.Event(), Deployment.start_loading

    def start_loading(self):
        loads.append(self.spec.checkpoint)
        if len(loads) > 1:
            return real_start(self)
        held = concurrent.futures.Future()

        def load() -> None:
            release.wait(30)
            real_start(self).add_done_callback(lambda done: held.set_result(done.result()))
        threading.Thread(target=load, daemon=True).start()
        return held

    monkeypatch.setattr(Deployment, "start_loading", start_loading)
    return loads, release


def test_a_reload_whose_caller_is_cancelled_still_runs_to_its_end_and_holds_the_name_till_then(client, roots,
                                                                                               monkeypatch):
    """The drain's end cancels the requests still running, a reload's among them. The reload goes on: its model
    is not left loading untracked, a second reload is refused while it loads (before, the name was freed at once
    and a second one loaded beside it), and once warm it takes over as if its caller had waited, the old one's
    robot sessions ended with it."""
    loads, release = hold_first_load(monkeypatch)
    manager = client.app.state.manager
    spec = manager.get("policy").spec.model_copy(update={"checkpoint": str(roots / "policy-b")})
    old, swapped = manager.get("policy"), []
    reloading = client.portal.start_task_soon(manager.reload, "policy", spec, swapped.append)
    deadline = time.monotonic() + 10
    while not loads and time.monotonic() < deadline:
        time.sleep(0.01)
    reloading.cancel()
    time.sleep(0.05)
    assert reloading.cancelled()
    second = client.post("/admin/deployments/policy/reload", json={}, headers=ADMIN)
    assert second.status_code == 409 and "still loading" in second.json()["error"]["message"], second.text
    release.set()
    deadline = time.monotonic() + 30
    while served_step(client) != 222 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served_step(client) == 222
    assert swapped == [old]  # (what the route ends the old one's robot sessions with)
    predict(client)
    again = client.post("/admin/deployments/policy/reload", json={}, headers=ADMIN)
    assert again.status_code == 200, again.text


def test_a_shutdown_does_not_wait_for_a_reload_still_loading(client, roots, monkeypatch):
    """A load cannot be interrupted and a reload's model is dropped at shutdown anyway: the shutdown (after the
    drain) does not wait for it (before, it waited its whole timeout), and the exit's log line can name it."""
    from service.deployments import Deployment

    loading, release, real_load = threading.Event(), threading.Event(), Deployment._load

    def slow_load(self):  # the reload's load runs on its model thread until the test releases it
        if "policy-b" in str(self.spec.checkpoint):
            loading.set()
            release.wait(30)
        return real_load(self)

    monkeypatch.setattr(Deployment, "_load", slow_load)
    manager = client.app.state.manager
    spec = manager.get("policy").spec.model_copy(update={"checkpoint": str(roots / "policy-b")})
    reloading = client.portal.start_task_soon(manager.reload, "policy", spec)
    assert loading.wait(10)
    assert manager.reloads_loading == ["policy"]
    try:
        started = time.monotonic()
        manager.shutdown(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        release.set()
    assert reloading.exception(30).status == 503  # (told that the server shut down while it loaded)
    assert manager.reloads_loading == []
