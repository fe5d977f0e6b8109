"""/evaluate requests queued together share one model call (timing_ms.batch_size > 1) and each keeps the loss it
gets alone; a bad one fails alone. Batched: diffusion_policy, transformer, transformer_hf."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service import DeploymentSpec
from tests.factories import EVALUATE_REQUESTS
from tests.service.conftest import serving
from tests.service.test_deadlines import busy


def policy_bodies() -> tuple[list[dict], int]:
    base = EVALUATE_REQUESTS["diffusion_policy"]
    bodies = [{**base, "seed": 7 + i, "condition_on_past": i % 2 == 0} for i in range(5)]
    overflowing = {**base["samples"][0], "actions": {"arm__delta": [[1e20, 0.0]] * 4, "gripper": [[0.0]] * 4}}
    bodies[3] = {**bodies[3], "samples": [overflowing]}  # its loss overflows: 422, its neighbours unaffected
    return bodies, 3


def text_bodies() -> tuple[list[dict], int]:
    bodies = [{"input_ids": [[5, 6, 7, 8, 9, 10, 11]], "seed": 1},
              {"input_ids": [[3, 4, 5], [9, 8, 7, 6]], "attention_mask": [[1, 1, 0], [1, 1, 1, 1]], "seed": 2},
              {"input_ids": [[1]], "seed": 3},  # too short to score: 422
              {"texts": ["the robot picks up the red block"], "seed": 4},
              {"input_ids": [[4, 4, 4, 4]], "seed": 5}]
    return bodies, 2


@pytest.mark.parametrize("model_type, make", [("diffusion_policy", policy_bodies), ("transformer", text_bodies),
                                              ("transformer_hf", text_bodies)])
def test_concurrent_evaluations_share_a_call_and_keep_their_own_losses(tiny_checkpoints, model_type, make):
    bodies, bad = make()
    with serving(DeploymentSpec(name="m", checkpoint=str(tiny_checkpoints[model_type]))) as client:
        executor = client.app.state.manager.get("m").executor
        with ThreadPoolExecutor(len(bodies)) as pool:
            with busy(executor):  # the model thread is taken: all of them queue, then share a call
                futures = [pool.submit(client.post, f"/evaluate/{model_type}", json=b) for b in bodies]
                time.sleep(0.5)
            together = [f.result() for f in futures]
        alone = [client.post(f"/evaluate/{model_type}", json=b) for b in bodies]
    assert together[bad].status_code == alone[bad].status_code == 422
    assert together[bad].json()["error"]["field"] == alone[bad].json()["error"]["field"]
    good = [i for i in range(len(bodies)) if i != bad]
    assert max(together[i].json()["timing_ms"]["batch_size"] for i in good) > 1
    for i in good:
        mine, solo = together[i].json(), alone[i].json()
        assert solo["timing_ms"]["batch_size"] == 1
        assert mine["loss"] == pytest.approx(solo["loss"], abs=1e-5) and mine["seed"] == solo["seed"]
        assert {k: v for k, v in mine.items() if k not in ("loss", "timing_ms", "perplexity")} == \
               {k: v for k, v in solo.items() if k not in ("loss", "timing_ms", "perplexity")}


def test_only_small_evaluations_share_a_call():
    """A shared call of max_batch_size evaluations stays no larger than one request may be alone: a large
    evaluation (more than 8 policy samples, over 2,048 tokens) runs by itself (no batch key)."""
    from service.modalities import action, text

    small = text.TextEvaluateRequest(input_ids=[[1] * 1000, [1] * 1048])
    large = text.TextEvaluateRequest(input_ids=[[1] * 1000, [1] * 1049])
    assert text.evaluate_batch_key(small) == "evaluate" and text.evaluate_batch_key(large) is None
    assert text.evaluate_batch_key(text.TextEvaluateRequest(texts=["x" * 2049])) is None
    sample = EVALUATE_REQUESTS["diffusion_policy"]["samples"][0]
    assert action.evaluate_batch_key(action.ActionEvaluateRequest(samples=[sample] * 8)) == "evaluate"
    assert action.evaluate_batch_key(action.ActionEvaluateRequest(samples=[sample] * 9)) is None


def test_a_left_padded_evaluation_fails_alone_in_a_batch(tiny_checkpoints):
    """Its mask is its own fault: the evaluations batched with it get their losses, it gets its refusal."""
    from vla_foundry.errors import InvalidInputError
    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.pipelines.text import TextEvaluation

    pipeline = load_pipeline(tiny_checkpoints["transformer"])
    good = TextEvaluation([[5, 6, 7, 8]], None, None, 0)
    bad = TextEvaluation([[0, 6, 7, 8]], [[0, 1, 1, 1]], None, 0)
    together = pipeline.evaluate_each([good, bad])
    assert isinstance(together[1], InvalidInputError) and together[1].field == "attention_mask"
    assert together[0]["loss"] == pytest.approx(pipeline.evaluate_each([good])[0]["loss"], abs=1e-6)
