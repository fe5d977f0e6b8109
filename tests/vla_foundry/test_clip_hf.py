"""``clip_hf`` (format spec §7): the wrapper's forward against ``transformers.CLIPModel``'s towers, tokenization,
the text hidden states stable diffusion uses, the encoder pipeline and the contrastive loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vla_foundry import load_model
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.batch_handlers import ContrastiveBatchHandler

TEXTS = ["a red block", "the quick brown fox", "a robot"]  # 9, 13 and 7 ids with the tiny tokenizer
LONG = " ".join(["the quick brown fox"] * 20)


@pytest.fixture(scope="module")
def clip(tiny_checkpoints):
    return load_model(tiny_checkpoints["clip_hf"])


@pytest.fixture(scope="module")
def pixels(clip):
    size = clip.model.config.vision_config.image_size
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def text_pooled_by_hand(clip, ids):
    """last_hidden_state at each row's first eos (the text config's eos id is not 2, so not the argmax rule)."""
    eos = clip.model.config.text_config.eos_token_id
    assert eos != 2
    hidden = clip.model.text_model(input_ids=ids).last_hidden_state
    positions = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else 0 for row in ids]
    return hidden[torch.arange(ids.shape[0]), positions]


def test_forward_matches_clip_model(clip, pixels):
    ids = clip.tokenize(TEXTS[:2], 20)
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out = clip(input_ids=ids, pixel_values=pixels, attention_mask_images=mask)
        hf = clip.model
        text = hf.text_projection(unit(text_pooled_by_hand(clip, ids)))  # normalized BEFORE projecting
        vision_pooled = hf.vision_model(pixel_values=pixels).pooler_output
        image = unit(hf.visual_projection(vision_pooled)).view(2, 2, hf.config.projection_dim)
    assert out["text_embeds"].shape == (2, hf.config.projection_dim)
    assert torch.allclose(out["text_embeds"], text, atol=1e-5)
    assert out["image_embeds"].shape == (2, 2, hf.config.projection_dim)
    assert torch.allclose(out["image_embeds"], image * mask[..., None], atol=1e-5)
    assert torch.equal(out["image_embeds"][1, 1], torch.zeros(hf.config.projection_dim))
    # The text embedding is not unit length (projection after normalization); images are.
    assert not torch.allclose(out["text_embeds"].norm(dim=-1), torch.ones(2), atol=1e-3)
    assert torch.allclose(out["image_embeds"][0].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_forward_pools_at_the_first_eos(clip):
    """Padding after the eos changes nothing (causal text tower, pooled at the eos)."""
    short = clip.tokenize(TEXTS[:1], 12)
    trimmed = short[:, : (short[0] == clip.model.config.text_config.eos_token_id).nonzero()[0, 0] + 1]
    with torch.no_grad():
        a = clip(input_ids=short)["text_embeds"]
        b = clip(input_ids=trimmed)["text_embeds"]
        c = clip(input_ids=clip.tokenize(TEXTS[:1], 32))["text_embeds"]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_forward_refuses_bad_inputs(clip, pixels):
    too_long = torch.zeros(1, clip.max_text_length + 1, dtype=torch.long)
    with pytest.raises(ValueError):
        clip(input_ids=too_long)
    with pytest.raises(ValueError):
        clip(input_ids=clip.tokenize(TEXTS[:2], 16), pixel_values=pixels.view(2, 2, *pixels.shape[1:]))


def test_tokenize(clip):
    ids = clip.tokenize(TEXTS, 20)
    assert ids.shape == (3, 20) and ids.dtype == torch.long
    tok = clip.tokenizer
    pad = tok.pad_token_id
    for row, text in zip(ids, TEXTS):
        raw = tok(text)["input_ids"]
        assert raw[0] == tok.bos_token_id and raw[-1] == tok.eos_token_id
        assert row[: len(raw)].tolist() == raw
        assert (row[len(raw):] == pad).all()
    assert clip.tokenize(["a"], 1000).shape == (1, clip.max_text_length)  # capped at max_position_embeddings


def test_tokenize_refuses_over_long_text(clip):
    with pytest.raises(InvalidInputError) as info:
        clip.tokenize([LONG], 64, field="texts")
    assert info.value.field == "texts"
    with pytest.raises(InvalidInputError) as info:
        clip.tokenize(["a red block"], 8)  # 9 ids with bos and eos
    assert info.value.field == "prompt"


def test_text_hidden_states(clip):
    ids = clip.tokenize(TEXTS, 16)
    with torch.no_grad():
        ours = clip.text_hidden_states(ids)
        ref = clip.model.text_model(ids).last_hidden_state
    assert ours.shape == (3, 16, clip.text_hidden_size)
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- encoder pipeline

@pytest.fixture(scope="module")
def encoder(tiny_checkpoints):
    from vla_foundry.pipelines import load_pipeline

    return load_pipeline(tiny_checkpoints["clip_hf"])


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def test_encoder_embed(encoder):
    out = encoder.embed(texts=TEXTS, images=images(2))
    d = encoder.model.embedding_dim
    assert out["text_embeds"].shape == (3, d) and out["image_embeds"].shape == (2, d)
    assert np.allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1, atol=1e-5)
    assert out["similarity"].shape == (3, 2)
    assert np.allclose(out["similarity"], out["text_embeds"] @ out["image_embeds"].T, atol=1e-6)
    # Text embeddings are the normalized §7 text_embeds of the (padded) ids.
    with torch.no_grad():
        ref = unit(encoder.model(input_ids=encoder.model.tokenize(TEXTS, 32))["text_embeds"])
    assert np.allclose(out["text_embeds"], ref.numpy(), atol=1e-5)
    only_texts = encoder.embed(texts=TEXTS[:1])
    assert set(only_texts) == {"text_embeds"} and np.allclose(only_texts["text_embeds"], out["text_embeds"][:1],
                                                                atol=1e-6)
    with pytest.raises(InvalidInputError):
        encoder.embed()
    with pytest.raises(InvalidInputError) as info:
        encoder.embed(texts=[LONG])
    assert info.value.field == "texts"


# ----------------------------------------------------------------------------- contrastive loss

def test_contrastive_loss_matches_hand_computation(clip, pixels):
    ids = clip.tokenize(TEXTS[:2] + ["a robot"] + ["a blue square"], 16)
    batch = {"input_ids": ids, "pixel_values": pixels}
    with torch.no_grad():
        out = ContrastiveBatchHandler().compute_loss(clip, batch)
        hf = clip.model
        text = unit(hf.text_projection(unit(text_pooled_by_hand(clip, ids))))
        image = unit(hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output))
        logits = hf.logit_scale.exp() * text @ image.T
        labels = torch.arange(4)
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert out.num_samples == 4
    assert out.loss.item() >= 0
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.metrics["text_to_image_accuracy"] == (logits.argmax(1) == labels).float().mean().item()
    with pytest.raises(InvalidInputError):
        ContrastiveBatchHandler().compute_loss(clip, {"input_ids": ids[:1], "pixel_values": pixels[:1]})


@pytest.mark.parametrize("height", [1, 3, 4, 24])
def test_images_a_few_pixels_tall_are_read_as_the_rgb_images_they_are(clip, height):
    """Decoded images are (H, W, 3); the image processor guessed the layout from the shape and read one 1, 3 or 4
    pixels tall as channels first (a wrong embedding, silently). A PIL image leaves it nothing to guess."""
    from PIL import Image

    image = np.random.default_rng(height).integers(0, 256, (height, 40, 3), dtype=np.uint8)
    pil = clip.image_processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    assert torch.equal(clip.pixel_values([image]), pil)
