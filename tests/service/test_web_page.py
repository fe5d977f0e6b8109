"""The page at ``GET /`` and the offline ``/docs``, in a real browser (headless Chromium, driven by Playwright).

A live server (loopback port, API keys on) serves the shipped demo captioner and policy. The
browser may reach nothing but that server: every other request is blocked and recorded. With the
key typed into the page, it captions an uploaded image (the same caption the API gives for it)
and runs robot episodes until one reaches its target; each episode is replayed with the Python
reach task (same frames, pixel for pixel, and the same final position). ``/docs`` renders its
operations from the package's own Swagger UI files. Skips, saying why, where Chromium or
Playwright is missing (``make test`` installs Chromium where it can).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from tests.service.live_server import live_server
from vla_foundry.demo import SHIPPED_PACK, shipped_members
from vla_foundry.demo import reach_task as task
from vla_foundry.demo import vlm as shapes

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
KEY = "page-test-key"
CHROMIUM = os.environ.get("VLA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def reach_constants_in_page() -> dict:
    source = (STATIC / "app.js").read_text()
    return json.loads(re.search(r"const REACH = (\{.*?\});", source, re.S).group(1))


def test_the_page_simulates_the_python_reach_task():
    """The page's copy of the task's constants is the task's (the browser test checks its pixels)."""
    page = reach_constants_in_page()
    assert page == {
        "image_size": task.IMAGE_SIZE, "background": task.BACKGROUND, "agent_color": list(task.AGENT_COLOR),
        "colors": {k: list(v) for k, v in task.COLORS.items()}, "target_radius_px": task.TARGET_RADIUS_PX,
        "agent_radius_px": task.AGENT_RADIUS_PX, "max_step": task.MAX_STEP, "success_radius": task.SUCCESS_RADIUS,
        "episode_steps": task.EPISODE_STEPS, "target_spots": [list(s) for s in task.TARGET_SPOTS],
        "target_jitter": task.TARGET_JITTER, "agent_range": task.AGENT_RANGE,
        "min_agent_target_distance": task.MIN_AGENT_TARGET_DISTANCE}
    assert task.NUM_TARGETS == 1  # the page draws one target


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; or set VLA_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    members = shipped_members()
    served = ("demo-vlm", "demo-diffusion_policy", "demo-transformer_hf")
    if not set(served) <= set(members):
        pytest.fail("the package ships no trained demo pack (vla_foundry/demo/pack); vla-foundry demo --ship")
    args = [a for m in served for a in ("--checkpoint", str(SHIPPED_PACK / m))]
    with live_server(args, tmp_path_factory.mktemp("demo"), env={"VLA_API_KEYS": KEY}) as base:
        yield base


@contextmanager
def page_of(browser, server: str):
    """A page that may reach ``server`` and nothing else; ``page.blocked`` lists what it tried."""
    context = browser.new_context()
    page = context.new_page()
    page.blocked = []
    local = urlparse(server).netloc

    def route(request_route):
        url = urlparse(request_route.request.url)
        if url.scheme in ("data", "blob") or url.netloc == local:
            request_route.continue_()
        else:
            page.blocked.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    with page_of(browser, server) as page:
        yield page


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_page_captions_an_image_and_drives_the_robot(page, server, tmp_path):
    page.goto(server + "/")
    page.wait_for_selector("#status-line.error")  # the server wants a key: /models was refused
    assert page.is_hidden("#caption-form")  # and no form offers a deployment it could not see
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#deployments tr[data-name=demo-diffusion_policy]")
    assert page.inner_text("#deployments tr[data-name=demo-vlm] .status-ready") == "ready"

    # caption an uploaded image: what the API answers for the same image
    image = png(shapes.draw("red", "circle", "left", random.Random(3)))
    (tmp_path / "shape.png").write_bytes(image)
    page.set_input_files("#caption-form input[type=file]", str(tmp_path / "shape.png"))
    page.click("#caption-form button[type=submit]")
    page.wait_for_function("() => !['', '…'].includes(document.querySelector('#caption-out').textContent)")
    caption = page.inner_text("#caption-out")
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        reply = client.post("/predict/vlm", json={"image": "data:image/png;base64," + base64.b64encode(image).decode(),
                                                  "temperature": 0})
    assert reply.status_code == 200 and caption == reply.json()["captions"][0]["text"] and caption.strip()

    # robot episodes until one reaches its target (the demo policy succeeds in most), each replayed in Python
    outcomes = []
    for _ in range(8):
        page.click("#robot-form button[type=submit]")
        page.wait_for_selector("#robot-out[data-result]", timeout=60_000)
        episode = page.evaluate("window.robotEpisode")
        outcomes.append(replay(episode))
        if outcomes[-1]:
            break
    assert any(outcomes), f"no episode of {len(outcomes)} reached its target"

    # a chat goes on past the model's context (128 tokens): the oldest exchanges are left out, no turn fails;
    # only deployments with a chat template are offered (demo-vlm has none)
    chat_models = page.eval_on_selector_all("#chat-form select option", "options => options.map(o => o.value)")
    assert chat_models == ["demo-transformer_hf"], chat_models
    for turn in range(1, 6):
        page.click("#chat-form button[type=submit]")
        page.wait_for_function(f"() => document.querySelector('#chat-log').dataset.answered === '{turn}' || "
                               "document.querySelector('#chat-error').textContent", timeout=60_000)
        assert page.inner_text("#chat-error") == "", page.inner_text("#chat-error")
    assert len(page.query_selector_all("#chat-log .chat-assistant")) < 5  # the oldest exchanges were left out
    if os.environ.get("VLA_PAGE_SCREENSHOT"):  # the README's picture: VLA_PAGE_SCREENSHOT=docs/page.png
        page.screenshot(path=os.environ["VLA_PAGE_SCREENSHOT"], full_page=True)
    assert page.blocked == []


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory):
    """No keys; VLA_MAX_NEW_TOKENS 16 and VLA_MAX_IMAGES 1; a text model with a tokenizer and one without, an
    unconditional image model, and a chat model (128 tokens of context)."""
    from tests.factories import tiny_model, tiny_stable_diffusion_params, tiny_transformer_params
    from vla_foundry.checkpoint import save_experiment

    root = tmp_path_factory.mktemp("page-models")
    save_experiment(tiny_model(tiny_stable_diffusion_params(None)), root / "unconditional")
    save_experiment(tiny_model(tiny_transformer_params()), root / "ids-only")
    members = [SHIPPED_PACK / "demo-transformer", SHIPPED_PACK / "demo-transformer_hf", root / "unconditional",
               root / "ids-only"]
    args = [a for m in members for a in ("--checkpoint", str(m))]
    with live_server(args, tmp_path_factory.mktemp("demo"), env={"VLA_MAX_NEW_TOKENS": "16",
                                                                 "VLA_MAX_IMAGES": "1"}) as base:
        yield base


@pytest.fixture
def capped_page(browser, capped_server):
    with page_of(browser, capped_server) as page:
        yield page


def submit(page, form: str) -> None:
    page.click(f"{form} button[type=submit]")
    page.wait_for_function(f"() => !document.querySelector('{form} button[type=submit]').disabled", timeout=60_000)


def test_the_forms_work_within_the_servers_caps_and_with_what_each_model_takes(capped_page, capped_server):
    """Each form works under caps below what the page once asked for (it sent max_new_tokens 40, max_tokens 32,
    num_images 2: refused); the text form offers only models that take text prompts; the image form sends no
    prompt to an unconditional model (it always sent one: refused); a chat turn refused even alone leaves the
    history as it was (it was emptied); a long word does not widen the capped_page."""
    sent = []
    capped_page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    capped_page.set_viewport_size({"width": 1000, "height": 800})
    capped_page.goto(capped_server + "/")
    capped_page.wait_for_selector("#deployments tr[data-name=ids-only]")
    offered = capped_page.eval_on_selector_all("#text-form select option", "options => options.map(o => o.value)")
    assert offered == ["demo-transformer", "demo-transformer_hf"], offered  # (not ids-only: token ids only)

    capped_page.fill("#text-form input[name=prompt]", "https://example.com/" + "a" * 150)
    submit(capped_page, "#text-form")
    assert "error" not in capped_page.get_attribute("#text-out", "class"), capped_page.inner_text("#text-out")
    width = capped_page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], width

    capped_page.select_option("#image-form select", "unconditional")
    assert capped_page.is_hidden("#image-form input[name=prompt]")
    submit(capped_page, "#image-form")
    assert "error" not in capped_page.get_attribute("#image-out", "class"), capped_page.inner_text("#image-out")
    assert capped_page.locator("#image-out img").count() == 1

    capped_page.fill("#chat-form input[name=message]", "first question")
    submit(capped_page, "#chat-form")
    assert capped_page.inner_text("#chat-error") == ""
    capped_page.fill("#chat-form input[name=message]", "hello " * 200)  # over the context even alone
    submit(capped_page, "#chat-form")
    assert "max_seq_len" in capped_page.inner_text("#chat-error")
    capped_page.fill("#chat-form input[name=message]", "second question")
    submit(capped_page, "#chat-form")
    assert capped_page.inner_text("#chat-error") == ""
    assert [m["content"] for m in sent[-1]["messages"] if m["role"] == "user"] == ["first question",
                                                                                   "second question"]
    assert "user: first question" in capped_page.inner_text("#chat-log")
    assert capped_page.blocked == []


def test_refreshing_while_a_deployment_loads_keeps_one_poll(capped_page, capped_server):
    """Each refresh (the button, a key typed) started another 2 s poll of /models beside the running one."""
    calls = []

    def loading(route):
        calls.append(time.monotonic())
        reply = route.fetch()
        body = reply.json()
        body["deployments"][0].update(status="loading", stage="loading the checkpoint")
        route.fulfill(response=reply, body=json.dumps(body))

    capped_page.route("**/models", loading)
    capped_page.goto(capped_server + "/")
    capped_page.wait_for_selector("#status-line:has-text('loading')")
    for _ in range(4):
        capped_page.click("#refresh")
    clicked = time.monotonic()
    capped_page.wait_for_timeout(4_500)
    polls = [t for t in calls if t > clicked + 0.5]  # after the clicks' own requests
    assert len(polls) <= 3, len(polls)  # one poll every 2 s (five chains: about 10)


def replay(episode: dict) -> bool:
    """The page's episode in the Python task: every frame it sent is task.render of the replayed state, and it
    ends where the page says, with the page's verdict. Returns that verdict."""
    start = episode["start"]
    state = task.ReachState(agent=np.asarray(start["agent"], np.float32),
                            targets={start["goal"]: np.asarray(start["target"], np.float32)}, goal=start["goal"])
    frames = {f["t"]: np.asarray(f["pixels"], np.uint8).reshape(task.IMAGE_SIZE, task.IMAGE_SIZE, 3)
              for f in episode["frames"]}
    assert frames and 0 in frames
    for t, action in enumerate(episode["actions"]):
        if t in frames:
            np.testing.assert_array_equal(frames[t], task.render(state), err_msg=f"frame at step {t}")
        state = task.step(state, np.asarray(action, np.float32))
    np.testing.assert_allclose(state.agent, episode["final"], atol=1e-6)
    assert task.success(state) == episode["success"]
    return episode["success"]


def test_docs_render_offline(page, server):
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)  # Swagger UI drew the operations
    assert page.locator(".opblock").count() > 10
    assert page.locator("button.authorize").count() == 1  # the server takes keys: "Try it out" can send one
    assert page.blocked == []
    page.goto(server + "/redoc")
    page.wait_for_selector("[data-section-id]", timeout=30_000)  # ReDoc drew its sections
    assert page.blocked == []
