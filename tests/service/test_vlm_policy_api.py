"""Policies conditioned by a whole VLM (spec §8.4) behind the HTTP API: ``/models`` describes them, and robots
with different instructions, sent at once so the deployment batches them, each get their solo chunk."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service import DeploymentSpec
from tests.factories import build_tiny_tokenizer, policy_observation, vlm_foundry_policy, vlm_hf_policy
from tests.service.conftest import serving

INSTRUCTIONS = ["pick", "pick up the red block", "place the red block in the bin", "pick"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-policies")
    vlm_foundry_policy(root / "foundry", build_tiny_tokenizer())
    vlm_hf_policy(root / "hf", build_tiny_tokenizer())
    specs = [DeploymentSpec(name="foundry", checkpoint=str(root / "foundry")),
             DeploymentSpec(name="hf", checkpoint=str(root / "hf"))]
    # (sampling traced as served by default; the test suite turns it off elsewhere, tests/conftest.py)
    with serving(*specs, max_batch_size=4, batch_wait_ms=50, traced_sampling=True) as c:
        yield c


def body(model: str, i: int) -> dict:
    observation = {**policy_observation(seed=i), "language_instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)]}
    return {"model": model, "observation": observation, "seed": 100 + i, "num_inference_steps": 3}


@pytest.mark.parametrize("model", ["foundry", "hf"])
def test_models_describes_the_policy(client, model):
    entry = client.get(f"/models/{model}").json()
    assert entry["type"] == "diffusion_policy" and entry["io"]["uses_language"] is True
    assert entry["io"]["sampling_graphs"] == "traced"  # the denoising steps after the (eager) VLM
    graphs = client.app.state.manager.get(model).pipeline.graphs
    assert len(graphs) == 4 and not graphs._refused  # captured at warm-up, batch sizes 1…4, none refused


@pytest.mark.parametrize("model", ["foundry", "hf"])
def test_robots_batched_together_get_their_solo_chunks(client, model):
    alone = [client.post("/predict/diffusion_policy", json=body(model, i)) for i in range(4)]
    assert all(r.status_code == 200 for r in alone), alone[0].text
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: client.post("/predict/diffusion_policy", json=body(model, i)), range(4)))
    assert all(r.status_code == 200 for r in together), together[0].text
    assert max(r.json()["timing_ms"]["batch_size"] for r in together) > 1  # some of them did share a call
    for a, b in zip(alone, together):
        np.testing.assert_allclose(np.array(b.json()["action_chunk"]), np.array(a.json()["action_chunk"]), atol=1e-5)
