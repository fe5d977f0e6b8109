import json

import pytest

from vla_foundry.demo import DEMO_MEMBERS, is_built
from vla_foundry.demo import transformer as transformer_demo
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams


@pytest.mark.slow
def test_demo_transformer_trains_and_serves_text(tmp_path):
    target = tmp_path / "demo-transformer"
    transformer_demo.build(target, progress=False, steps=40)
    assert is_built(target)
    card = json.loads((target / "demo.json").read_text())
    assert card["random_weights"] is False and card["train_steps"] == 40
    assert card["final_train_loss"] < 6.0  # it learned something from ln(1024) ≈ 6.9
    pipeline = load_pipeline(target)
    result = pipeline.complete(["Shall I compare thee"], sampling=SamplingParams(max_new_tokens=12, temperature=0.0))
    assert result.completions[0].text and len(result.completions[0].token_ids) > 0
    assert "demo-transformer" in DEMO_MEMBERS


def test_corpus_is_public_domain_text():
    docs = transformer_demo.corpus_documents()
    assert len(docs) > 20
    assert any("Four score and seven years ago" in d for d in docs)
