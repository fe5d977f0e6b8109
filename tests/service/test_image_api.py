"""``/predict/stable_diffusion`` and ``/evaluate/stable_diffusion`` over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service import DeploymentSpec
from tests.factories import png_data_url, tiny_model, tiny_stable_diffusion_params
from vla_foundry.checkpoint import save_experiment
from vla_foundry.schedulers import FAST_SCHEDULERS, FLOW_SCHEDULERS
from tests.service.conftest import serving
from tests.service.live_server import live_server


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    spec = DeploymentSpec(name="sd", checkpoint=str(tiny_checkpoints["stable_diffusion"]))
    with serving(spec, max_images=4, max_inference_steps=50) as c:
        yield c


def draw(client, **body):
    return client.post("/predict/stable_diffusion", json={"num_inference_steps": 4, **body})


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_pngs_with_a_seed_each_and_identical_bytes_for_the_same_seed(client):
    first = draw(client, prompt="a red circle", num_images=2, seed=11).json()
    again = draw(client, prompt="a red circle", num_images=2, seed=11).json()
    assert [im["seed"] for im in first["images"]] == [11, 12] and first["seed"] == 11
    assert [im["data"] for im in first["images"]] == [im["data"] for im in again["images"]]
    assert pixels(first["images"][0]["data"]).shape == (16, 16, 3)
    # image i of a request is the image of seed + i alone
    alone = draw(client, prompt="a red circle", seed=12).json()
    assert alone["images"][0]["data"] == first["images"][1]["data"]
    assert first["scheduler"] == "dpmsolver++" and first["num_inference_steps"] == 4


def test_accept_png_returns_the_image_itself(client):
    response = client.post("/predict/stable_diffusion", json={"prompt": "a blue square", "seed": 5,
                                                               "num_inference_steps": 4},
                           headers={"accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "5"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = draw(client, prompt="a blue square", seed=5).json()
    assert base64.b64decode(as_json["images"][0]["data"]) == response.content
    several = client.post("/predict/stable_diffusion", json={"prompt": "x", "num_images": 2, "num_inference_steps": 2},
                          headers={"accept": "image/png"})
    assert several.headers["content-type"].startswith("application/json")  # one PNG per reply only


@pytest.mark.parametrize("scheduler", ["training", *FAST_SCHEDULERS])
def test_every_scheduler(client, scheduler):
    body = {"prompt": "a red circle", "scheduler": scheduler, "seed": 1}
    if scheduler == "training":
        body["num_inference_steps"] = None
    response = draw(client, **body)
    assert response.status_code == 200, response.text
    assert response.json()["scheduler"] == scheduler


def test_guidance_and_negative_prompt(client):
    plain = draw(client, prompt="a red circle", seed=3).json()["images"][0]["data"]
    guided = draw(client, prompt="a red circle", seed=3, guidance_scale=4.0).json()["images"][0]["data"]
    negative = draw(client, prompt="a red circle", seed=3, guidance_scale=4.0,
                    negative_prompt="a blue square").json()["images"][0]["data"]
    assert len({plain, guided, negative}) == 3


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "word " * 80}, 422, "prompt"),
    ({"prompt": "x", "num_images": 5}, 422, "num_images"),
    ({"prompt": "x", "num_inference_steps": 51}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "scheduler": "pndm"}, 422, "scheduler"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": "x", "scheduler": "training", "num_inference_steps": 3}, 422, "num_inference_steps"),
    ({"negative_prompt": "x"}, 422, "negative_prompt"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
])
def test_bad_requests_name_the_field(client, body, status, field):
    e = error_of(draw(client, **body), status)
    assert e["field"] == field, e


def test_over_long_prompt_names_the_limit(client):
    e = error_of(draw(client, prompt="word " * 80), 422)
    assert "at most" in e["message"] and "tokens" in e["message"]


def test_evaluate_is_seeded(client):
    body = {"images": [png_data_url(0), png_data_url(1)], "texts": ["a red circle", "a blue square"], "seed": 4}
    a = client.post("/evaluate/stable_diffusion", json=body).json()
    b = client.post("/evaluate/stable_diffusion", json=body).json()
    assert a["loss"] == b["loss"] > 0 and a["num_samples"] == 2
    e = error_of(client.post("/evaluate/stable_diffusion", json={"images": [png_data_url(0)], "seed": 1}), 422)
    assert e["field"] == "texts"


def test_models_describe_image_generation(client):
    io_info = client.get("/models/sd").json()["io"]
    assert io_info["image_size"] == 16 and io_info["text"] is True
    assert io_info["default_scheduler"] == "dpmsolver++" and "training" in io_info["schedulers"]


@pytest.fixture(scope="module")
def flow_client(tmp_path_factory):
    """A tiny unconditional model trained (here: built) with VLA Foundry's flow-matching scheduler."""
    path = tmp_path_factory.mktemp("flow-sd")
    save_experiment(tiny_model(tiny_stable_diffusion_params(use_flow_matching_scheduler=True)), path)
    with serving(DeploymentSpec(name="flow-sd", checkpoint=str(path)), max_inference_steps=50) as c:
        yield c


@pytest.mark.parametrize("scheduler", FLOW_SCHEDULERS)
def test_flow_models_take_the_flow_samplers_seeded_and_reproducible(flow_client, scheduler):
    first = draw(flow_client, scheduler=scheduler, seed=7, num_images=2)
    assert first.status_code == 200, first.text
    again = draw(flow_client, scheduler=scheduler, seed=7, num_images=2).json()
    assert first.json()["scheduler"] == scheduler and first.json()["images"] == again["images"]
    assert pixels(again["images"][0]["data"]).shape == (16, 16, 3)
    other_seed = draw(flow_client, scheduler=scheduler, seed=8).json()["images"][0]["data"]
    assert other_seed != again["images"][0]["data"]


def test_flow_models_list_their_samplers_and_refuse_ddpm_only_ones(flow_client):
    io_info = flow_client.get("/models/flow-sd").json()["io"]
    assert io_info["schedulers"] == ["training", *FLOW_SCHEDULERS] and io_info["default_scheduler"] == "dpmsolver++"
    e = error_of(draw(flow_client, scheduler="ddim"), 422)
    assert e["field"] == "scheduler" and "flow_euler, dpmsolver++, unipc, heun" in e["message"]


def test_concurrent_requests_equal_sequential_ones(tiny_checkpoints, tmp_path):
    """8 requests in flight at once (batched: mixed prompts, negative prompts and image counts) give the images the
    same requests give one at a time (to within one level in a few pixels); a request the model refuses fails
    alone."""
    args = ["--checkpoint", f"{tiny_checkpoints['stable_diffusion']}=sd"]
    bodies = [{"prompt": ["a red circle", "a blue square"][i % 2], "seed": 100 + 10 * i, "num_inference_steps": 4,
               "num_images": 1 + i % 3, "guidance_scale": 2.0, **({"negative_prompt": "green"} if i % 4 else {})}
              for i in range(8)]
    # too long a prompt, with the batch key of the requests without a negative prompt: it may share their call
    bodies.append({"prompt": "word " * 80, "seed": 1, "num_inference_steps": 4, "guidance_scale": 2.0})
    with live_server(args, tmp_path / "nodemo") as base:
        async def together():
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                return await asyncio.gather(*(c.post("/predict/stable_diffusion", json=b) for b in bodies))

        concurrent = asyncio.run(together())
        with httpx.Client(base_url=base, timeout=60) as c:
            sequential = [c.post("/predict/stable_diffusion", json=b) for b in bodies]
    assert concurrent[-1].status_code == sequential[-1].status_code == 422
    concurrent, sequential = concurrent[:-1], sequential[:-1]
    assert all(r.status_code == 200 for r in concurrent + sequential)
    got = [[im["data"] for im in r.json()["images"]] for r in concurrent]
    alone = [[im["data"] for im in r.json()["images"]] for r in sequential]
    assert [len(images) for images in got] == [len(images) for images in alone]
    # As README says: a batched image is the image alone to within one level in a few pixels (the UNet's CPU
    # kernels are not batch-invariant; with one torch thread one pixel of these tiny models moved).
    moved = 0
    for batched_image, alone_image in zip(sum(got, []), sum(alone, [])):
        a, b = pixels(batched_image).astype(int), pixels(alone_image).astype(int)
        assert np.abs(a - b).max() <= 1
        moved += int((a != b).sum())
    assert moved <= 0.001 * sum(pixels(data).size for data in sum(got, []))
    assert len({data for images in got for data in images}) == sum(len(images) for images in got) == 15
    assert max(r.json()["timing_ms"]["batch_size"] for r in concurrent) > 1


def test_steps_that_would_run_are_capped(tiny_checkpoints):
    """The cap applies to the steps that run: the training scheduler's T−1 and the default count too."""
    spec = DeploymentSpec(name="sd", checkpoint=str(tiny_checkpoints["stable_diffusion"]))
    with serving(spec, max_inference_steps=5) as c:
        e = error_of(c.post("/predict/stable_diffusion", json={"prompt": "x", "scheduler": "training"}), 422)
        assert e["field"] == "scheduler" and "9 sampler steps" in e["message"] and "limit of 5" in e["message"]
        e = error_of(c.post("/predict/stable_diffusion", json={"prompt": "x"}), 422)  # default: min(20, T) = 10
        assert e["field"] == "num_inference_steps"
        assert c.post("/predict/stable_diffusion", json={"prompt": "x", "num_inference_steps": 5}).status_code == 200


def test_guidance_is_reported_only_when_applied(client):
    unconditional = draw(client, guidance_scale=3.0, seed=1).json()
    assert unconditional["guidance_scale"] is None
    assert draw(client, prompt="a red circle", guidance_scale=3.0, seed=1).json()["guidance_scale"] == 3.0
    e = error_of(draw(client, prompt="x", guidance_scale=1e30), 422)
    assert e["field"] == "guidance_scale"


@pytest.mark.parametrize("accept, media_type", [
    ("image/png", "image/png"),
    ("image/*", "image/png"),
    ("image/png, */*", "image/png"),  # PNG named, JSON only let in by the wildcard
    ("application/json;q=0.5, image/png", "image/png"),
    ("*/*", "application/json"),
    ("image/png;q=0, application/json", "application/json"),  # q=0: PNG is not acceptable
    ("image/png;q=0", "application/json"),  # nothing acceptable: JSON, as without the header
    ("image/png;q=0.5, application/json", "application/json"),
    ("image/png, application/json", "application/json"),  # equal q: the server's preference, JSON
    ("image/png;q=0.5, application/msgpack", "application/msgpack"),
])
def test_accept_q_values_decide_whether_the_png_itself_comes_back(client, accept, media_type):
    response = client.post("/predict/stable_diffusion", json={"prompt": "a blue square", "seed": 5,
                                                               "num_inference_steps": 2}, headers={"accept": accept})
    assert response.status_code == 200 and response.headers["content-type"] == media_type, response.content[:80]
    assert (response.content[:8] == b"\x89PNG\r\n\x1a\n") == (media_type == "image/png")


def test_models_show_the_steps_a_request_without_them_gets(client, tiny_checkpoints):
    """io.defaults.num_inference_steps is what a request without the field runs; under a VLA_MAX_INFERENCE_STEPS
    below the model's default such a request is refused, not clamped, so /models shows no default there, and the
    cap itself in io.max_inference_steps."""
    io_info = client.get("/models/sd").json()["io"]
    ran = client.post("/predict/stable_diffusion", json={"prompt": "x", "seed": 1}).json()["num_inference_steps"]
    assert io_info["defaults"]["num_inference_steps"] == ran == 10 and io_info["max_inference_steps"] == 50
    spec = DeploymentSpec(name="sd", checkpoint=str(tiny_checkpoints["stable_diffusion"]))
    with serving(spec, max_inference_steps=5) as capped:
        io_info = capped.get("/models/sd").json()["io"]
        assert io_info["defaults"]["num_inference_steps"] is None and io_info["max_inference_steps"] == 5
        assert capped.get("/models").json()["deployments"][0]["io"] == io_info
        e = error_of(capped.post("/predict/stable_diffusion", json={"prompt": "x"}), 422)
        assert e["field"] == "num_inference_steps" and "limit of 5" in e["message"]


def test_a_grey_model_draws_and_evaluates(tmp_path):
    """A one-channel model (MNIST-style): it draws grey images, and its evaluation takes image files as it takes
    its own images, in grey (before, it was fed three channels: 500)."""
    from vla_foundry.checkpoint import save_experiment
    from vla_foundry.params.diffusion import UNetParams

    unet = UNetParams(channels=[8, 16, 16], time_emb_dim=16, text_emb_dim=0, image_size=16, in_channels=1,
                      out_channels=1)
    save_experiment(tiny_model(tiny_stable_diffusion_params(unet=unet)), tmp_path / "grey")
    with serving(DeploymentSpec(name="grey", checkpoint=str(tmp_path / "grey"))) as client:
        drawn = client.post("/predict/stable_diffusion", json={"num_inference_steps": 2, "seed": 1})
        assert drawn.status_code == 200, drawn.text
        scored = client.post("/evaluate/stable_diffusion", json={"images": [png_data_url(0), png_data_url(1)],
                                                                  "seed": 1})
        assert scored.status_code == 200 and scored.json()["loss"] > 0, scored.text


@pytest.mark.parametrize("model_type,check,body,field", [
    ("stable_diffusion", "plan", {"prompt": "robot " * 4000}, "prompt"),
    ("clip_hf", "check", {"texts": ["robot " * 4000]}, "texts"),
])
def test_a_prompt_too_long_is_refused_before_it_queues(tiny_checkpoints, monkeypatch, model_type, check, body, field):
    """Its tokenizing runs in the thread pool, not on the deployment's model thread, where a megabyte prompt held
    up every other request for seconds before its 422."""
    import threading

    with serving(DeploymentSpec(name="m", checkpoint=str(tiny_checkpoints[model_type]))) as client:
        pipeline, threads = client.app.state.manager.deployments["m"].pipeline, []
        original = getattr(pipeline, check)

        def recorded(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(pipeline, check, recorded)
        refused = client.post(f"/predict/{model_type}", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text
    assert threads and not [name for name in threads if name.startswith("model-")], threads


def test_a_request_is_planned_once_before_it_queues(tiny_checkpoints, monkeypatch):
    """Its check in the thread pool makes the plan its model call uses: its prompt is tokenized once, off the
    model thread (before, the model thread planned it again)."""
    import threading

    with serving(DeploymentSpec(name="m", checkpoint=str(tiny_checkpoints["stable_diffusion"]))) as client:
        pipeline, threads = client.app.state.manager.deployments["m"].pipeline, []
        original = pipeline.plan

        def recorded(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(pipeline, "plan", recorded)
        drawn = client.post("/predict/stable_diffusion", json={"prompt": "a red block", "num_inference_steps": 2,
                                                               "seed": 3})
    assert drawn.status_code == 200 and drawn.json()["seed"] == 3, drawn.text
    assert len(threads) == 1 and not threads[0].startswith("model-"), threads
