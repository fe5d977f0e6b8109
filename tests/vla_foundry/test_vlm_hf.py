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


# ----------------------------------------------------------------------------- processors laid out per token

def build_tiny_paligemma(out_dir, tokenizer):
    """A tiny PaliGemma (its processor gives token_type_ids, and it has no chat template)."""
    import copy

    import transformers as T

    from vla_foundry.demo import hf_models

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    image_processor = T.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = T.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    text = T.GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **ids)
    config = T.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
    hf_models._save(hf_models._seeded_model(T.PaliGemmaForConditionalGeneration, config, 0), ids, out_dir, processor)
    return sharpen(out_dir, std=0.5)


def hf_generate(hf_dir, image, text):
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(hf_dir)(text=[text], images=[[Image.fromarray(image)]], return_tensors="pt")
    inputs.pop("labels", None)
    out = model.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_prompts_of_different_lengths_get_their_own_tokens_where_inputs_are_laid_out_per_token(
        tmp_path, tiny_tokenizer, family):
    """Qwen2-VL's processor gives mm_token_type_ids, PaliGemma's token_type_ids, per token and padded its own way:
    a request of prompts of different lengths failed (Qwen2-VL: a RuntimeError, a 500) or got other tokens than
    each alone (PaliGemma; alone, HF's own greedy generate). Its rows now run apart. Such a model decodes with its
    cache only: use_cache false is refused, naming the field."""
    from vla_foundry.demo.hf_models import build_tiny_qwen2_vl
    from vla_foundry.errors import InvalidInputError

    build = build_tiny_qwen2_vl if family == "qwen2_vl" else build_tiny_paligemma
    hf_dir = build(tmp_path / family, tiny_tokenizer)
    if family == "qwen2_vl":
        hf_dir = sharpen(hf_dir)
    pipeline = load_pipeline(hf_dir)
    rows = [im for row in images(1) for im in row]
    prompts = ["describe", "what is the robot doing with the red block here"]
    solo = [pipeline.caption([[im]], [p], sampling=GREEDY, seed=0).completions[0].token_ids
            for im, p in zip(rows, prompts)]
    together = pipeline.caption([[im] for im in rows], prompts, sampling=GREEDY, seed=0)
    assert [c.token_ids for c in together.completions] == solo
    if family == "paligemma":  # (no chat template: the prompt is the image token and the text)
        def until_end(tokens):  # (HF's output holds the end token, a completion's does not)
            return next((tokens[:i] for i, t in enumerate(tokens) if t in pipeline.end_ids), tokens)

        assert solo == [until_end(hf_generate(hf_dir, im, "<image>" + p)) for im, p in zip(rows, prompts)]
    with pytest.raises(InvalidInputError) as refused:
        pipeline.caption([[rows[0]]], prompts[:1], sampling=GREEDY, seed=0, use_cache=False)
    assert refused.value.field == "use_cache"

    # Each row's images go through the processor once: before, a batch encoding came first and each row was then
    # encoded again alone (4 images here), and a continuous batcher's generation once more (6).
    counting = CountingImages(pipeline.processor.processor)
    pipeline.processor.processor = counting
    assert [c.token_ids for c in pipeline.caption([[im] for im in rows], prompts, sampling=GREEDY,
                                                  seed=0).completions] == solo
    assert counting.images == 2
    generation = pipeline.start_caption([[im] for im in rows], prompts, sampling=GREEDY, seed=0)
    assert not generation.shares_steps
    assert [c.token_ids for c in generation.alone().completions] == solo
    assert counting.images == 4

    # Rows of one length (here one prompt twice): still once each, their inputs joined are the batch's.
    alike = pipeline.processor.encode(["describe"] * 2, None, [[im] for im in rows])
    assert counting.images == 6 and alike.rows is None
    fresh = type(pipeline.processor)(pipeline.model, counting, "")  # (not yet known to lay out per token)
    batch = fresh.encode(["describe"] * 2, None, [[im] for im in rows])
    assert counting.images == 8 and alike.ids == batch.ids and alike.image_inputs.keys() == batch.image_inputs.keys()
    assert all(torch.equal(alike.image_inputs[k], batch.image_inputs[k]) for k in batch.image_inputs)
    alone = [pipeline.caption([[im]], ["describe"], sampling=GREEDY, seed=0).completions[0].token_ids for im in rows]
    together = pipeline.caption([[im] for im in rows], ["describe"] * 2, sampling=GREEDY, seed=0).completions
    assert [c.token_ids for c in together] == alone


class CountingImages:
    """An HF processor that counts the images it is given."""

    def __init__(self, processor):
        self.processor, self.images = processor, 0

    def __call__(self, *args, **kwargs):
        self.images += sum(len(row) for row in kwargs.get("images") or [])
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_a_tokenizer_without_a_pad_token_still_captions(tmp_path, tiny_tokenizer):
    """The processor pads a request's rows, and refused to without a pad token: every caption was refused (422,
    blaming the images) and such a deployment failed its warm-up."""
    hf_dir = build_tiny_idefics3(tmp_path / "idefics3", tiny_tokenizer)
    processor = AutoProcessor.from_pretrained(hf_dir)
    processor.tokenizer.pad_token = None
    processor.save_pretrained(hf_dir)
    pipeline = load_pipeline(sharpen(hf_dir))
    pipeline.warmup()
    together = pipeline.caption([[im] for row in images(2) for im in row], PROMPTS, sampling=GREEDY, seed=0)
    solo = [pipeline.caption([row], [p], sampling=GREEDY, seed=0).completions[0].token_ids
            for row, p in zip(images(2), PROMPTS)]
    assert [c.token_ids for c in together.completions] == solo


def pooled(*outs):
    return sum(o["loss"] * o["num_tokens"] for o in outs) / sum(o["num_tokens"] for o in outs)


def test_evaluations_where_inputs_are_laid_out_per_token(tmp_path, tiny_tokenizer):
    """Qwen2-VL's processor lays out mm_token_type_ids per token, in its own padding (here on the left, as many
    hub checkpoints ship it): captions of different lengths are scored each alone and pooled (before, the rows'
    padding here did not match the processor's, and the loss was another); ``input_ids`` alone lack that layout
    and are refused, naming ``texts`` (before, the model's own error asked for a field the API has not)."""
    import json

    from vla_foundry.demo.hf_models import build_tiny_qwen2_vl
    from vla_foundry.errors import InvalidInputError

    hf_dir = sharpen(build_tiny_qwen2_vl(tmp_path / "qwen2_vl", tiny_tokenizer))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    pipeline = load_pipeline(hf_dir)
    assert pipeline.processor.tokenizer.padding_side == "left"
    a, b = (im for row in images(3) for im in row)
    short, long = "a red block", "the quick brown fox jumps over the lazy dog again"
    alone = [pipeline.evaluate([[a]], texts=[short], seed=1), pipeline.evaluate([[b]], texts=[long], seed=1)]
    pair = pipeline.evaluate([[a], [b]], texts=[short, long], seed=1)
    assert pair["loss"] == pytest.approx(pooled(*alone), abs=1e-5)
    assert pair["num_tokens"] == sum(o["num_tokens"] for o in alone) and pair["seed"] == 1
    first = load_pipeline(hf_dir).evaluate([[a], [b]], texts=[short, long], seed=1)  # (its processor's first call)
    assert first["loss"] == pytest.approx(pair["loss"], abs=1e-6) and first["num_tokens"] == pair["num_tokens"]
    counting = CountingImages(pipeline.processor.processor)  # each row's image encoded once (before: twice)
    pipeline.processor.processor = counting
    assert pipeline.evaluate([[a], [b]], texts=[short, long], seed=1) == pair
    assert counting.images == 2
    ids = pipeline.processor.encode([short], None, [[a]], answers=True).ids
    with pytest.raises(InvalidInputError) as refused:
        pipeline.evaluate([[a]], input_ids=ids, seed=1)
    assert refused.value.field == "input_ids" and "texts" in str(refused.value)


def test_a_prefix_lm_s_caption_is_scored_as_its_suffix_with_hf_s_own_loss(tmp_path, tiny_tokenizer):
    """PaliGemma attends both ways over what its processor marks as the prefix (the image and the prompt), and
    decodes the caption after it causally. Evaluation scores a caption as that suffix: the loss HF's model gives
    for the processor's own training labels, over the caption's tokens and eos only, and no caption token sees the
    ones after it. Before, evaluation refused the model (scored as plain text, every token would be prefix and
    see the tokens it predicts). Token ids alone do not mark the suffix: they are refused, naming `texts`."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from vla_foundry.errors import InvalidInputError

    hf_dir = build_tiny_paligemma(tmp_path / "paligemma", tiny_tokenizer)
    pipeline = load_pipeline(hf_dir)
    assert pipeline.model.prefix_lm
    image = images(1)[0][0]
    captions = ["a red block on the table", "a cup"]
    got = pipeline.evaluate([[image]], texts=captions, seed=1)
    alone = [pipeline.evaluate([[image]], texts=[c], seed=1) for c in captions]

    model = PaliGemmaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    for caption, mine in zip(captions, alone):
        inputs = processor(text=["<image>"], images=[[Image.fromarray(image)]], suffix=[caption], return_tensors="pt")
        with torch.no_grad():
            theirs = model(**inputs)
        scored = int((inputs["labels"] != -100).sum())  # (the caption's tokens and eos; the prefix's are -100)
        assert mine["num_tokens"] == scored == len(processor.tokenizer(caption, add_special_tokens=False).input_ids) + 1
        assert mine["loss"] == pytest.approx(theirs.loss.item(), rel=1e-5, abs=1e-6)
    tokens = sum(a["num_tokens"] for a in alone)
    assert got["num_tokens"] == tokens  # rows of different lengths, each scored as alone, pooled over their tokens
    assert got["loss"] == pytest.approx(sum(a["loss"] * a["num_tokens"] for a in alone) / tokens, rel=1e-5)

    # Causal over the caption: two captions that differ only in their last word get the same logits before it.
    inputs = pipeline.processor.encode(["a red block on the mat", "a red block on the hat"], None,
                                       [[image], [image]], answers=True)
    assert len(inputs.ids[0]) == len(inputs.ids[1])
    batch = {"input_ids": torch.tensor(inputs.ids), "attention_mask": torch.ones(2, len(inputs.ids[0])),
             **inputs.image_inputs}
    with torch.no_grad():
        logits = pipeline.model(batch.pop("input_ids"), attention_mask=batch.pop("attention_mask"), **batch).logits
    types = inputs.image_inputs["token_type_ids"][0]
    differ = next(i for i, (a, b) in enumerate(zip(*inputs.ids)) if a != b)
    assert types[differ] == 1 and bool((types[:differ] == 0).any())
    torch.testing.assert_close(logits[0, :differ], logits[1, :differ], rtol=1e-5, atol=1e-5)

    with pytest.raises(InvalidInputError) as refused:
        pipeline.evaluate([[image]], input_ids=inputs.ids[:1], seed=1)
    assert refused.value.field == "input_ids" and "texts" in str(refused.value)
    assert pipeline.caption([[image]], ["describe"], sampling=GREEDY, seed=0).completions[0].token_ids


def test_the_video_token_in_a_text_is_blamed_on_the_text(tmp_path, tiny_tokenizer):
    """Qwen2-VL's processor refuses a video token with no video; that refusal named `images`, which were fine. The
    text that holds it is refused now, naming its field."""
    from vla_foundry.demo.hf_models import build_tiny_qwen2_vl
    from vla_foundry.errors import InvalidInputError

    pipeline = load_pipeline(build_tiny_qwen2_vl(tmp_path / "qwen2_vl", tiny_tokenizer))
    video = pipeline.processor.processor.video_token
    image = images(1)[0][0]
    for call, field in ((lambda: pipeline.evaluate([[image]], texts=[f"a {video} b"], seed=1), "texts"),
                        (lambda: pipeline.caption([[image]], [f"what is {video} here"], sampling=GREEDY, seed=0),
                         "prompt")):
        with pytest.raises(InvalidInputError) as refused:
            call()
        assert refused.value.field == field and "video token" in str(refused.value)


def test_input_ids_without_the_images_placeholders_are_refused_naming_the_placeholder(tmp_path, tiny_tokenizer):
    """Token ids sent for evaluation carry the image placeholders themselves; ids without them were refused with HF's
    own words alone ("Image features and image tokens do not match"). The refusal names the field and the
    placeholder's id."""
    from vla_foundry.errors import InvalidInputError

    pipeline = load_pipeline(sharpen(build_tiny_idefics3(tmp_path / "idefics3", tiny_tokenizer)))
    with pytest.raises(InvalidInputError) as refused:
        pipeline.evaluate([[images(1)[0][0]]], input_ids=[[1, 2, 3]], seed=1)
    assert refused.value.field == "input_ids"
    assert f"image placeholders in input_ids (id {pipeline.model.image_token_id})" in str(refused.value)


def test_the_image_token_in_a_text_is_blamed_on_the_text(tmp_path, tiny_tokenizer):
    """The processor counts image tokens against the images: one written in the text is the text's fault."""
    from vla_foundry.errors import InvalidInputError

    pipeline = load_pipeline(sharpen(build_tiny_idefics3(tmp_path / "idefics3", tiny_tokenizer)))
    image = images(1)[0][0]
    with pytest.raises(InvalidInputError) as refused:
        pipeline.evaluate([[image]], texts=["a <image> b"], seed=1)
    assert refused.value.field == "texts"
    with pytest.raises(InvalidInputError) as refused:
        pipeline.caption([[image]], ["what is <image> here"], sampling=GREEDY, seed=0)
    assert refused.value.field == "prompt"
    chat = pipeline.render_chat([{"role": "user", "content": [{"type": "image"},
                                                              {"type": "text", "text": "<image> what"}]}])
    with pytest.raises(InvalidInputError) as refused:  # a chat's: its template's one, and the text's
        pipeline.caption([[image]], [chat], sampling=GREEDY, seed=0, rendered=True)
    assert refused.value.field == "prompt"
    plain = pipeline.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}])
    assert pipeline.caption([[image]], [plain], sampling=GREEDY, seed=0, rendered=True).completions
