"""``vlm`` with a timm vision tower (``vit: {type: vit_hf}``, format spec §6): built by name with no classifier,
every token of ``forward_features`` kept (a class token included), weights from the checkpoint only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import build_tiny_tokenizer, tiny_model, tiny_transformer_params
from vla_foundry import load_model
from vla_foundry.checkpoint import save_experiment
from vla_foundry.models import create_model
from vla_foundry.params import parse_params
from vla_foundry.params.vision import ViTHFParams, VLMParams
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams

# timm's smallest ViT at 32 px: a class token and a 2×2 patch grid, 192 wide.
TOWER = dict(hf_pretrained="vit_tiny_patch16_224", hidden_dim=192, img_size=32)


def vlm_params(vocab: int, **tower) -> VLMParams:
    return VLMParams(vit=ViTHFParams(**{**TOWER, **tower}), transformer=tiny_transformer_params(vocab_size=vocab + 1),
                     image_token_id=vocab)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    path = tmp_path_factory.mktemp("vlm_vit_hf")
    model = tiny_model(vlm_params(len(tokenizer)))
    save_experiment(model, path, tokenizer=tokenizer)
    return path, model


def test_the_tower_keeps_every_token_after_timms_final_norm(saved):
    import timm

    path, built = saved
    model = load_model(path)
    assert model.tokens_per_image == 5 and model.image_size == 32  # the class token and 4 patches
    state = torch.load(path / "checkpoints" / "checkpoint_1.pt", weights_only=True)["state_dict"]
    assert "vit.model.pos_embed" in state and not any(k.startswith("vit.model.head.") for k in state)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    reference.load_state_dict({k[len("vit.model."):]: v for k, v in state.items() if k.startswith("vit.model.")})
    x = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, N cameras, 3, H, W)
    with torch.no_grad():
        got = model.vit(x)
        assert got.shape == (2, 3, 5, 192)
        torch.testing.assert_close(got, reference.forward_features(x.flatten(0, 1)).view(2, 3, 5, 192), rtol=0,
                                   atol=0)
        # and the loaded model is the saved one
        torch.testing.assert_close(model.vit(x), built.vit(x), rtol=0, atol=0)


def test_a_caption_fills_the_towers_tokens(saved):
    path, _ = saved
    pipeline = load_pipeline(path)
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = pipeline.caption([[image, image]], ["a robot"], sampling=SamplingParams(max_new_tokens=3, temperature=0.0),
                           seed=0)
    again = pipeline.caption([[image, image]], ["a robot"], sampling=SamplingParams(max_new_tokens=3,
                                                                                     temperature=0.0), seed=1)
    tokens = [c.token_ids for c in out.completions]
    assert tokens == [c.token_ids for c in again.completions] and len(tokens[0]) == 3  # greedy: the same tokens
    row = out.prompt_token_ids[0]  # 5 placeholders per image, then the prompt
    assert row[:10] == [300] * 10 and 300 not in row[10:] and len(row) > 10
    assert pipeline.io()["tokens_per_image"] == 5


def test_a_reference_vit_hf_block_parses_and_bad_ones_name_the_fix():
    params = parse_params({"type": "vlm", "image_token_id": 300, "transformer": {"vocab_size": 301},
                           "vit": {"type": "vit_hf", "hf_pretrained": "vit_tiny_patch16_224", "hidden_dim": 192,
                                   "projector_pixel_shuffle_factor": 1}})
    assert isinstance(params.vit, ViTHFParams) and params.vit.img_size is None  # the name sets the size
    with pytest.raises(ValueError, match="set hidden_dim: 192"):
        create_model(vlm_params(300, hidden_dim=768), load_pretrained=False)
    with pytest.raises(ValueError, match="takes only factor 1"):  # 5 tokens (class + 2×2) cannot be shuffled by 2
        create_model(vlm_params(300, projector_pixel_shuffle_factor=2), load_pretrained=False)
    with pytest.raises(ValueError, match="timm model name"):
        create_model(vlm_params(300, hf_pretrained="google/siglip-so400m-patch14-384"), load_pretrained=False)
    with pytest.raises(ValueError, match="timm's own list"):
        create_model(vlm_params(300, hf_pretrained="hf-hub:timm/vit_tiny_patch16_224"), load_pretrained=False)
    with pytest.raises(ValueError, match="not a vision transformer"):
        create_model(vlm_params(300, hf_pretrained="resnet18", hidden_dim=512, img_size=None), load_pretrained=False)
    # As VLA Foundry builds it (no img_size): the name's own size, the class token kept
    built = create_model(vlm_params(300, img_size=None), load_pretrained=False)
    assert (built.image_size, built.tokens_per_image) == (224, 197)
