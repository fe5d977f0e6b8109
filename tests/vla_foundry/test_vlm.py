"""``vlm`` (format spec §5, §6): the conformance fixture, the pixel-shuffle projector, several cameras,
the B2 fix and the caption loss."""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vla_foundry import load_model
from vla_foundry.models.batch_handlers import CaptionBatchHandler
from vla_foundry.models.vlm import pixel_shuffle
from tests.factories import tiny_model, tiny_vlm_params

ATOL = 1e-5
IMG = 300  # image_token_id of tiny_vlm_params(300)


@pytest.fixture(scope="module")
def vlm_fixture(fixtures_dir):
    return fixtures_dir / "vlm_basic"


@pytest.fixture(scope="module")
def fixture_model(vlm_fixture):
    return load_model(vlm_fixture)


@pytest.fixture(scope="module")
def tiny_vlm():
    return tiny_model(tiny_vlm_params(300))


def expected(vlm_fixture, case):
    return load_file(vlm_fixture / "expected" / f"{case}.safetensors")


def pixels(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- fixture


def test_fixture_forward(fixture_model, vlm_fixture):
    e = expected(vlm_fixture, "forward")
    with torch.no_grad():
        out = fixture_model(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                            output_hidden_states=True)
        vit = fixture_model.vit(e["input.pixel_values"])
        image_embeddings = fixture_model.projection(vit)
    assert out.logits.shape == e["output.logits"].shape
    assert torch.allclose(out.logits, e["output.logits"], atol=ATOL)
    assert torch.allclose(vit, e["debug.vit_output"], atol=ATOL)
    assert torch.allclose(image_embeddings, e["debug.image_embeddings"], atol=ATOL)
    hidden = sorted(k for k in e if k.startswith("debug.hidden_state_"))
    assert len(out.hidden_states) == len(hidden) == fixture_model.transformer.params.n_layers
    for i, h in enumerate(out.hidden_states):
        assert torch.allclose(h, e[f"debug.hidden_state_{i}"], atol=ATOL)


def test_fixture_forward_text_only(fixture_model, vlm_fixture):
    e = expected(vlm_fixture, "forward_text_only")
    with torch.no_grad():
        logits = fixture_model(e["input.input_ids"]).logits
    assert torch.allclose(logits, e["output.logits"], atol=ATOL)


@pytest.mark.parametrize("use_cache", [True, False])
def test_fixture_generate(fixture_model, vlm_fixture, use_cache):
    e = expected(vlm_fixture, "generate")
    tokens = fixture_model.generate(e["input.input_ids"], e["input.pixel_values"], e["input.attention_mask"],
                                    max_new_tokens=6, temperature=0.0, top_p=0.9, top_k=50, use_cache=use_cache)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, e["output.tokens_use_cache" if use_cache else "output.tokens_no_cache"])


# ---------------------------------------------------------------------------------------------- projector


def grid(B, G, D):
    """(B, G², D) whose value encodes (batch, row, column, channel) of each patch."""
    b, r, c, ch = torch.meshgrid(torch.arange(B), torch.arange(G), torch.arange(G), torch.arange(D), indexing="ij")
    return (10000 * b + 100 * r + 10 * c + ch).reshape(B, G * G, D).float()


@pytest.mark.parametrize("G, s", [(4, 2), (6, 2), (6, 3), (4, 4)])
def test_pixel_shuffle_layout(G, s):
    B, D = 2, 3
    x = grid(B, G, D)
    out = pixel_shuffle(x, s)
    n = G // s
    assert out.shape == (B, n * n, D * s * s)
    for b in range(B):
        for bi in range(n):
            for bj in range(n):
                for di in range(s):
                    for dj in range(s):
                        for c in range(D):
                            row, col = bi * s + di, bj * s + dj
                            assert out[b, bi * n + bj, (di * s + dj) * D + c] == 10000 * b + 100 * row + 10 * col + c


def test_pixel_shuffle_cameras_are_concatenated_camera_major():
    B, N, G, D, s = 2, 3, 4, 3, 2
    x = torch.stack([grid(B, G, D) + 1000 * n for n in range(N)], dim=1)  # (B, N, P, D)
    out = pixel_shuffle(x, s)
    per_camera = (G // s) ** 2
    assert out.shape == (B, N * per_camera, D * s * s)
    for n in range(N):
        assert torch.equal(out[:, n * per_camera:(n + 1) * per_camera], pixel_shuffle(x[:, n], s))


def test_pixel_shuffle_identity_and_bad_grids():
    x = torch.randn(2, 5, 7)  # not a square number of patches
    assert torch.equal(pixel_shuffle(x, 1), x)
    x4 = torch.randn(2, 3, 16, 4)
    assert torch.equal(pixel_shuffle(x4, 1), x4.reshape(2, 48, 4))
    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 16, 3), 3)  # 4 patches per side is not divisible by 3
    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 15, 3), 2)  # not a square grid


# ---------------------------------------------------------------------------------------------- cameras


def test_two_cameras_fill_placeholders_camera_major(tiny_vlm):
    m = tiny_vlm
    n_tok = m.tokens_per_image
    assert n_tok == 4
    px = pixels(2, 2, 3, 32, 32)
    ids = torch.tensor([[7] + [IMG] * (2 * n_tok) + [10, 11], [8] + [IMG] * (2 * n_tok) + [12, 13]])
    with torch.no_grad():
        logits = m(ids, px).logits
        assert logits.shape == (2, ids.shape[1], m.vocab_size)
        # independent reconstruction: camera 0's tokens, then camera 1's, in the placeholders
        img = torch.cat([m.projection(m.vit(px[:, n])) for n in range(2)], dim=1)  # (B, 2·n_tok, H)
        emb = m.transformer.embed_tokens(ids.masked_fill(ids == IMG, 0))
        emb[:, 1:1 + 2 * n_tok] = img
        manual = m.transformer(inputs_embeds=emb).logits
        swapped = m(ids, px.flip(1)).logits
        assert torch.equal(m.vit(px), torch.stack([m.vit(px[:, n]) for n in range(2)], dim=1))
    assert torch.allclose(logits, manual, atol=ATOL)
    assert not torch.allclose(logits, swapped, atol=1e-3)
    new = m.generate(ids, px, max_new_tokens=3, temperature=0.0)
    assert new.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("placeholders", [7, 9])
def test_placeholder_count_mismatch_names_the_counts(tiny_vlm, placeholders):
    px = pixels(1, 2, 3, 32, 32)
    ids = torch.tensor([[7] + [IMG] * placeholders + [10]])
    with pytest.raises(ValueError) as err:
        with torch.no_grad():
            tiny_vlm(ids, px)
    message = str(err.value)
    assert re.search(rf"\b{placeholders}\b", message) and re.search(r"\b8\b", message), message


# ---------------------------------------------------------------------------------------------- B2


@pytest.fixture
def image_token_loving_vlm():
    """A tiny VLM whose LM head prefers the image placeholder id in some steps (reference bug B2's trigger)."""
    m = tiny_model(tiny_vlm_params(300))
    px = pixels(2, 3, 32, 32)
    ids = torch.tensor([[5] + [IMG] * 4 + [10, 11, 12], [6] + [IMG] * 4 + [13, 14, 15]])
    first = m.generate(ids, px, max_new_tokens=1, temperature=0.0)[0, -1]
    with torch.no_grad():
        W = m.transformer.output.weight
        W[IMG] = 2.0 * W[int(first)]  # the image id now wins wherever that token led with a positive logit
    return m, ids, px


def test_b2_generated_image_token_is_a_normal_token_without_cache(image_token_loving_vlm):
    m, ids, px = image_token_loving_vlm
    with_cache = m.generate(ids, px, max_new_tokens=8, temperature=0.0, use_cache=True)
    without = m.generate(ids, px, max_new_tokens=8, temperature=0.0, use_cache=False)
    new = with_cache[:, ids.shape[1]:]
    assert bool((new == IMG).any()), "the test model must generate the image token id"
    assert torch.equal(with_cache, without)
    # The reference's merge over prompt + generated ids would have counted the generated one as a placeholder.
    with pytest.raises(ValueError):
        with torch.no_grad():
            m(with_cache, px)


# ---------------------------------------------------------------------------------------------- loss


def test_caption_batch_handler_scores_text_targets_only(tiny_vlm):
    pad = 0
    ids = torch.tensor([[5] + [IMG] * 4 + [10, 11, 12],
                        [6] + [IMG] * 4 + [13, pad, pad]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    px = pixels(2, 3, 32, 32)
    out = CaptionBatchHandler().compute_loss(tiny_vlm, {"input_ids": ids, "attention_mask": mask,
                                                        "pixel_values": px})
    with torch.no_grad():
        logits = tiny_vlm(ids, px, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:]
    keep = (mask[:, 1:] == 1) & (targets != IMG)
    assert int(keep.sum()) == 4  # 10, 11, 12 and 13
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert out.loss.item() == pytest.approx(manual.item(), abs=1e-5)
    assert out.num_samples == 2 and out.metrics["num_tokens"] == 4
    # Scoring placeholders or padding as targets would give a different number.
    everything = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert abs(everything.item() - manual.item()) > 1e-3
