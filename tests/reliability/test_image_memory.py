"""Images under every cap must not amplify memory: cheap refusals come before any pixel is decoded, the
decoded pixels are bounded per request (413) and in flight (503), and the memory of a burst of large images
goes back to the system once they are served (``service/images.py``, ``service/memory.py``)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import service.images
from service import DeploymentSpec, Settings
from tests.service.conftest import serving
from tests.service.live_server import live_server_process

SMALL = 64 * 64


def png_b64(side: int) -> str:
    """A side² PNG of zeros: a few KB that decode to side² × 3 bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    with serving(DeploymentSpec(name="vlm", checkpoint=str(tiny_checkpoints["vlm"])), max_image_pixels=SMALL,
                 max_request_pixels=3 * SMALL, max_pixels_in_flight=8 * SMALL) as c:
        yield c


@pytest.fixture
def decodes(monkeypatch):
    """The images decoded while the test runs (every decode of bytes goes through service.images)."""
    seen: list[str] = []
    real = service.images.decode_image_bytes

    def counting(data, **kwargs):
        seen.append(kwargs["field"])
        return real(data, **kwargs)

    monkeypatch.setattr(service.images, "decode_image_bytes", counting)
    return seen


def test_a_prompt_too_long_is_refused_before_any_image_is_decoded(client, decodes):
    images = [png_b64(64)] * 3
    response = client.post("/predict/vlm", json={"images": images, "prompt": "word " * 4000, "max_new_tokens": 2})
    assert response.status_code == 422, response.text
    assert "max_seq_len" in response.json()["error"]["message"]
    assert decodes == []
    ok = client.post("/predict/vlm", json={"images": images, "prompt": "a", "max_new_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert decodes == ["images[0]", "images[1]", "images[2]"]


def test_the_pixels_of_one_request_are_capped(client):
    response = client.post("/predict/vlm", json={"images": [png_b64(64)] * 4, "max_new_tokens": 2})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["field"] == "images[3]" and "VLA_MAX_REQUEST_PIXELS" in error["message"]
    assert client.app.state.pixels.used == 0  # the three claimed images went back with the reply


def test_the_pixels_in_flight_are_capped_and_come_back(client):
    budget = client.app.state.pixels
    with budget.lease() as first, budget.lease() as second:  # two requests in flight hold all but two images
        first.claim(3 * SMALL, "images[0]")
        second.claim(3 * SMALL, "images[0]")
        replies: list = []
        refused = threading.Thread(target=lambda: replies.append(client.post(
            "/predict/vlm", json={"images": [png_b64(64)] * 3, "max_new_tokens": 2})))
        refused.start()
        time.sleep(0.3)  # its refusal is held back (VLA_SHED_PACING_S, at least 0.5 s) with its claims given back
        assert budget.used == 6 * SMALL and not replies
        refused.join(timeout=30)
        response = replies[0]
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "overloaded" and error["field"] == "images[2]"
        assert "VLA_MAX_PIXELS_IN_FLIGHT" in error["message"]
        assert budget.used == 6 * SMALL  # the refused request's two claims went back
    assert budget.used == 0
    assert client.post("/predict/vlm", json={"images": [png_b64(64)] * 3, "max_new_tokens": 2}).status_code == 200


def test_leases_share_one_budget():
    """Two requests' leases draw on one budget; a refused claim takes nothing, and every lease gives all back."""
    from service.errors import ApiError
    from service.images import PixelBudget

    budget = PixelBudget(per_request=10, in_flight=10)
    with budget.lease() as lease:
        lease.claim(10, "observation.images.front")
        with pytest.raises(ApiError) as refused:
            with budget.lease() as other:
                other.claim(1, "observation.images.wrist")
        assert refused.value.status == 503 and budget.used == 10
    assert budget.used == 0


def test_the_caps_must_nest():
    with pytest.raises(ValueError, match="must nest"):
        Settings(max_image_pixels=100, max_request_pixels=50)
    with pytest.raises(ValueError, match="must nest"):
        Settings(max_request_pixels=4 * 4096 * 4096, max_pixels_in_flight=4096 * 4096)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def test_a_burst_of_large_images_gives_its_memory_back(tiny_checkpoints, tmp_path):
    """Four requests at once of four 4096² PNGs each (49 KB that decode to 50 MB): about 800 MB while they are
    served, then back near where the server started (it used to keep about 640 MB of it for good)."""
    body = {"images": [png_b64(4096)] * 4, "prompt": "a", "max_new_tokens": 1}
    with live_server_process(["--checkpoint", f"{tiny_checkpoints['vlm']}=vlm"], tmp_path / "demo") as (base, proc):
        with httpx.Client(base_url=base, timeout=120) as client:
            assert client.post("/predict/vlm", json=body).status_code == 200  # warm: first-use allocations
            before = rss_mb(proc.pid)
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda _: client.post("/predict/vlm", json=body).status_code, range(4)))
            # The last request's images are freed just after its reply is sent: on a busy host that can come after
            # the reply reaches the test (seen: 196 MB more just after, 4 MB 0.25 s later). Given back within 5 s;
            # the memory kept for good before was about 640 MB.
            deadline = time.monotonic() + 5
            while (after := rss_mb(proc.pid)) - before >= 150 and time.monotonic() < deadline:
                time.sleep(0.1)
    print(f"RSS {before:.0f} MB before the burst, {after:.0f} MB after")
    assert statuses == [200] * 4
    assert after - before < 150, f"RSS {before:.0f} MB before the burst, {after:.0f} MB after"
