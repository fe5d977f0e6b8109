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


@pytest.mark.slow
def test_demo_vlm_learns_to_name_colours(tmp_path):
    import random

    from vla_foundry.demo import vlm as vlm_demo

    target = tmp_path / "demo-vlm"
    vlm_demo.build(target, progress=False, steps=120)
    card = json.loads((target / "demo.json").read_text())
    assert card["random_weights"] is False and card["final_train_loss"] < 1.5  # from ln(321) ≈ 5.8
    pipeline = load_pipeline(target)
    rng = random.Random(7)
    samples = [vlm_demo.sample(rng) for _ in range(12)]
    result = pipeline.caption([[image] for image, _ in samples], sampling=SamplingParams(max_new_tokens=8,
                                                                                         temperature=0.0))
    colours = [caption.split()[1] for _, caption in samples]
    named = sum(c.text.split()[1:2] == [colour] for c, colour in zip(result.completions, colours))
    assert named >= 6, [c.text for c in result.completions]


@pytest.mark.parametrize("member", ["demo-transformer_hf", "demo-vlm_hf"])
def test_demo_hf_members_are_random_and_movable(tmp_path, member):
    import shutil

    from vla_foundry.demo import BUILDERS

    BUILDERS[member](tmp_path / "built" / member, False)
    moved = tmp_path / "moved" / member
    shutil.copytree(tmp_path / "built" / member, moved)
    shutil.rmtree(tmp_path / "built")  # the member must not point back at where it was built
    assert is_built(moved) and json.loads((moved / "demo.json").read_text())["random_weights"] is True
    pipeline = load_pipeline(moved)
    assert pipeline.tokenizer is not None and str(moved) in pipeline.tokenizer_source


@pytest.mark.slow
def test_demo_stable_diffusion_trains_and_draws(tmp_path):
    """A short run of the real recipe: the denoising loss falls from ~1 (predicting zero noise) and the model
    serves PNG-able images. (Prompt fidelity needs the full 3000 steps: see docs/demo_stable_diffusion.png.)"""
    from vla_foundry.demo import stable_diffusion as sd_demo

    target = tmp_path / "demo-stable_diffusion"
    sd_demo.build(target, progress=False, steps=150)
    card = json.loads((target / "demo.json").read_text())
    assert card["random_weights"] is False and card["train_steps"] == 150
    assert card["final_train_loss"] < 0.3
    pipeline = load_pipeline(target)
    assert (target / "clip").is_dir() and pipeline.model.has_text
    result = pipeline.generate("a red square", num_images=2, seed=0)
    assert [im.shape for im in result.images] == [(16, 16, 3)] * 2 and result.scheduler == "dpmsolver++"
    sheet = sd_demo.contact_sheet(target, tmp_path / "sheet.png", prompts=("a red circle",), per_prompt=2)
    assert sheet.stat().st_size > 0


def test_concurrent_builds_of_one_pack_build_each_member_once(tmp_path, monkeypatch):
    """Two builders sharing a folder (replicas on one host) take turns: the second finds the members
    built. A pack already built is returned without a lock file (its folder may be read-only)."""
    import threading
    import time

    import vla_foundry.demo as demo

    calls, second_started = [], threading.Event()

    def build(path, progress):
        calls.append(path.name)
        second_started.wait(10)  # the second builder is on its way while this one builds
        time.sleep(0.1)
        (path / "checkpoints").mkdir(parents=True)
        (path / "config_model.yaml").write_text("type: transformer\n")
        (path / "checkpoints" / "checkpoint_1.pt").write_bytes(b"")

    def second():
        second_started.set()
        demo.ensure_demo_pack(tmp_path, progress=False)

    monkeypatch.setattr(demo, "BUILDERS", {"member-a": build, "member-b": build})
    first = threading.Thread(target=demo.ensure_demo_pack, args=(tmp_path,), kwargs={"progress": False})
    first.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the first builder is inside member-a
        time.sleep(0.01)
    other = threading.Thread(target=second)
    other.start()
    first.join()
    other.join()
    assert sorted(calls) == ["member-a", "member-b"]
    assert all(demo.is_built(tmp_path / name) for name in ("member-a", "member-b"))
    (tmp_path / ".build.lock").unlink()
    demo.ensure_demo_pack(tmp_path, progress=False)
    assert not (tmp_path / ".build.lock").exists() and len(calls) == 2
