"""``clip_openclip``: an OpenCLIP model as a registered, servable encoder (offline, random weights)."""

import numpy as np
import pytest
import torch

from vla_foundry import load_model
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.clip_hf import l2normalize
from vla_foundry.pipelines import load_pipeline

IMAGES = [np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8) for i in range(2)]


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(tiny_checkpoints["clip_openclip"])


def test_checkpoint_keys_and_relative_architecture(model, tiny_checkpoints):
    assert all(k.startswith("model.") for k in model.state_dict())
    assert model.params.architecture == str((tiny_checkpoints["clip_openclip"] / "tiny-openclip.json").resolve())
    assert model.embedding_dim == 32 and model.max_text_length == 16


def test_embeddings_are_open_clips_normalized(model):
    texts = ["a red circle", "a blue square"]
    with torch.no_grad():
        ids = model.tokenize(texts, 16)
        expected_text = model.model.encode_text(ids)
        expected_image = model.model.encode_image(model.pixel_values(IMAGES))
        assert torch.allclose(model.embed_texts(texts), l2normalize(expected_text), atol=1e-6)
        assert torch.allclose(model.embed_images(IMAGES), l2normalize(expected_image), atol=1e-6)
    assert ids.shape == (2, 16)


def test_over_long_text_is_refused(model):
    with pytest.raises(InvalidInputError) as error:
        model.tokenize(["word " * 40], 16)
    assert error.value.field == "texts" and "at most 16" in str(error.value)


def test_pipeline_similarity_and_contrastive_loss(tiny_checkpoints):
    pipeline = load_pipeline(tiny_checkpoints["clip_openclip"])
    out = pipeline.embed(["a red circle", "a blue square"], IMAGES)
    assert np.allclose(np.linalg.norm(out["text_embeds"], axis=1), 1, atol=1e-5)
    assert np.allclose(out["similarity"], out["text_embeds"] @ out["image_embeds"].T, atol=1e-6)
    a = pipeline.evaluate(["a red circle", "a blue square"], IMAGES, seed=0)
    assert a["loss"] > 0 and a["num_samples"] == 2 and 0 <= a["text_to_image_accuracy"] <= 1


def test_vit_b_32_with_random_weights_embeds_offline():
    from vla_foundry.models import create_model
    from vla_foundry.params.clip import ClipOpenClipParams

    model = create_model(ClipOpenClipParams(architecture="ViT-B-32"), load_pretrained=True).eval()
    with torch.no_grad():
        text, image = model.embed_texts(["a photo of a robot"]), model.embed_images(IMAGES[:1])
    assert text.shape == image.shape == (1, 512)
    assert torch.allclose(text.norm(dim=-1), torch.ones(1), atol=1e-5)
