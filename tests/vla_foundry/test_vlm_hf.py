"""``vlm_hf``: Hugging Face image-text-to-text models (Idefics3, LLaVA) behind the ``vlm`` interface
(format spec §1.3, B2, B8) and the caption pipeline on top."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vla_foundry.demo.hf_models import build_tiny_idefics3, build_tiny_llava
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.caption import CaptionPipeline
from vla_foundry.sampling import SamplingParams
from tests.factories import sharpen_hf

ATOL = 1e-5
BUILDERS = {"idefics3": build_tiny_idefics3, "llava": build_tiny_llava}
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
PROMPTS = ["a robot", "the quick brown fox jumps over"]


def sharpen(hf_dir, seed=0, std=0.2):
    return sharpen_hf(hf_dir, "AutoModelForImageTextToText", seed, std)


def images(seed=0):
    """Two captions' single images, (H, W, 3) uint8, of different sizes."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)], [rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)]]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("vlm_hf")
    return {name: sharpen(build(root / name, tiny_tokenizer)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pipelines(hf_dirs):
    return {name: load_pipeline(d) for name, d in hf_dirs.items()}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    return request.param


def tokens(result):
    return [c.token_ids for c in result.completions]


# ---------------------------------------------------------------------------------------------- forward


def test_forward_logits_equal_hf(family, hf_dirs, pipelines):
    model = pipelines[family].model
    assert model.params.type == "vlm_hf"
    processor = AutoProcessor.from_pretrained(hf_dirs[family])
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": p}]}],
                                           add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    pil = [[Image.fromarray(im) for im in row] for row in images()]
    inputs = processor(text=texts, images=pil, return_tensors="pt", padding=True)
    assert bool((inputs["input_ids"] == model.image_token_id).any())
    reference = AutoModelForImageTextToText.from_pretrained(hf_dirs[family]).eval()
    with torch.no_grad():
        theirs = reference(**inputs).logits
        ours = model(**inputs).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=ATOL)


# ---------------------------------------------------------------------------------------------- generate


def test_greedy_cache_equals_no_cache_and_padded_batch_equals_solo(family, pipelines):
    pipeline = pipelines[family]
    assert isinstance(pipeline, CaptionPipeline)
    imgs = images()
    batch = pipeline.caption(imgs, PROMPTS, sampling=GREEDY, use_cache=True)
    assert len({len(r) for r in batch.prompt_token_ids}) == 2  # the rows are padded
    no_cache = pipeline.caption(imgs, PROMPTS, sampling=GREEDY, use_cache=False)
    solos = [tokens(pipeline.caption([im], [p], sampling=GREEDY))[0] for im, p in zip(imgs, PROMPTS)]
    assert tokens(batch) == tokens(no_cache) == solos
    assert solos[0] != solos[1]  # the rows really differ


def test_seeded_sampling_is_reproducible(family, pipelines):
    pipeline = pipelines[family]
    imgs = images()
    a = pipeline.caption(imgs, PROMPTS, sampling=SAMPLED, seed=3)
    b = pipeline.caption(imgs, PROMPTS, sampling=SAMPLED, seed=3)
    c = pipeline.caption(imgs, PROMPTS, sampling=SAMPLED, seed=4)
    assert a.seed == 3 and c.seed == 4
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_image_placeholder_is_never_generated(family, pipelines):
    pipeline = pipelines[family]
    model = pipeline.model
    image_token = model.image_token_id

    def force(module, args, output):  # the placeholder's logit becomes the highest everywhere
        output = output.clone()
        output[..., image_token] = output.max() + 100.0
        return output

    handle = model.model.get_output_embeddings().register_forward_hook(force)
    try:
        imgs = images()
        inputs = pipeline.processor.encode(PROMPTS[:1], None, imgs[:1])
        with torch.no_grad():
            logits = model(torch.tensor(inputs.ids), **inputs.image_inputs).logits
        assert int(logits[0, -1].argmax()) == image_token  # the hook works
        for use_cache in (True, False):
            for sampling in (GREEDY, SAMPLED):
                result = pipeline.caption(imgs, PROMPTS, sampling=sampling, seed=0, use_cache=use_cache)
                for row, completion in zip(tokens(result), result.completions):
                    assert image_token not in row
                    assert len(row) == sampling.max_new_tokens or completion.finish_reason == "stop"
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_texts(family, pipelines):
    pipeline = pipelines[family]
    imgs = images()
    texts = ["a red block", "the quick fox"]
    out = pipeline.evaluate(imgs, texts=texts, seed=1)
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert out["num_samples"] == 2 and out["seed"] == 1
    # image placeholders and padding are never targets
    ids = pipeline.processor.encode(texts, None, imgs, answers=True).ids
    at_most = sum(sum(1 for t in row[1:] if t != pipeline.model.image_token_id) for row in ids)
    assert 0 < out["num_tokens"] <= at_most


def test_chat_templated_text_gets_no_second_set_of_special_tokens(family, pipelines, monkeypatch):
    """The template writes bos & co. itself; the processor must not add them again (it would for a Llama)."""
    processor = pipelines[family].processor
    seen = []
    real = type(processor.processor).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("add_special_tokens"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(processor.processor), "__call__", spy)
    processor.encode(["what is it"], None, images()[:1])  # rendered through the chat template
    processor.encode([processor.render_chat([{"role": "user", "content": "hi"}])], None, [[]], rendered=True)
    assert processor.has_chat_template and seen == [False, False]


def test_the_data_configs_processor_kind_is_loaded(hf_dirs, pipelines):
    """``use_hf_fast_tokenizer: false`` in the training config's data block: the captioner's processor is the PIL
    kind, as VLA Foundry's ``use_fast=False`` loads it (default: the fast kind)."""
    from vla_foundry.caption_inputs import HFCaptionProcessor

    model = pipelines["idefics3"].model
    slow = HFCaptionProcessor.from_experiment(model, hf_dirs["idefics3"], {"data": {"use_hf_fast_tokenizer": False}})
    fast = HFCaptionProcessor.from_experiment(model, hf_dirs["idefics3"], {})
    kinds = {use_fast: type(AutoProcessor.from_pretrained(hf_dirs["idefics3"], use_fast=use_fast).image_processor)
             for use_fast in (False, True)}  # (named per transformers version)
    assert kinds[False] is not kinds[True]
    assert type(slow.processor.image_processor) is kinds[False] and type(fast.processor.image_processor) is kinds[True]
