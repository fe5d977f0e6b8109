"""The static-cache decode step behind CUDA-graph decoding, checked eagerly on the CPU.

On CUDA the same step is captured and replayed (tests/test_gpu.py); here it must equal the
eager decode step of ``Transformer.forward``.
"""

import pytest
import torch

from vla_foundry.models.cuda_graph_decode import GraphDecoder, graph_decoder, length_bucket
from tests.factories import tiny_model, tiny_transformer_params


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "norm_type": "rms_norm"},
                                     {"positional_embedding_type": "none", "post_embed_norm": True}])
def test_static_cache_step_equals_eager_decode(variant):
    model = tiny_model(tiny_transformer_params(**variant))
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        out = model(prompt, attention_mask=mask, use_cache=True)
        decoder = GraphDecoder(model, batch_size=2, cache_len=16)
        decoder.prefill(out.past_key_values, mask)
        past, full_mask = out.past_key_values, mask
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for position in range(5, 12):
            static = decoder.step(token, position)
            full_mask = torch.cat([full_mask, torch.ones_like(token)], 1)
            eager = model(token, attention_mask=full_mask, past_key_values=past, use_cache=True)
            past = eager.past_key_values
            assert torch.allclose(static, eager.logits[:, -1], atol=1e-5)
            token = static.argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="past this decoder's cache"):
            decoder.step(token, 16)


def test_decoders_are_reused_by_shape_bucket():
    model = tiny_model(tiny_transformer_params())
    assert graph_decoder(model, 1, 20) is graph_decoder(model, 1, 60)  # both fit the 64 bucket
    assert graph_decoder(model, 2, 20) is not graph_decoder(model, 1, 20)
    assert [length_bucket(n, 64) for n in (1, 64, 65)] == [64, 64, 65]
    assert length_bucket(100, 2048) == 128


def test_oversized_static_caches_fall_back_to_eager(monkeypatch):
    from vla_foundry.models import cuda_graph_decode

    model = tiny_model(tiny_transformer_params())
    assert cuda_graph_decode.static_cache_bytes(model, 2, 64) == 2 * 2 * 2 * 64 * 32 * 4
    monkeypatch.setattr(cuda_graph_decode, "MAX_STATIC_CACHE_BYTES", 1024)
    assert graph_decoder(model, 2, 20) is None


def test_moving_the_model_drops_captured_decoders():
    model = tiny_model(tiny_transformer_params())
    first = graph_decoder(model, 1, 20)
    model.to(torch.float64)
    second = graph_decoder(model, 1, 20)
    assert second is not first and second.keys[0].dtype == torch.float64


@pytest.mark.parametrize("variant, dtype, atol", [({}, torch.float32, 1e-5),
                                                  ({"weight_tying": True, "cast_output_to_float32": True},
                                                   torch.float32, 1e-5),
                                                  ({}, torch.bfloat16, 2e-2)])
def test_a_reused_decoder_matches_eager_generation(variant, dtype, atol):
    """Longer then shorter prompts through one decoder, made under inference_mode, reused under no_grad."""
    model = tiny_model(tiny_transformer_params(**variant)).to(dtype)
    decoder = None
    for prompt, mask in [(torch.tensor([[3] * 30, [4] * 30]), None),
                         (torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))]:
        context = torch.inference_mode() if decoder is None else torch.no_grad()
        with context:
            out = model(prompt, attention_mask=mask, use_cache=True)
            decoder = decoder or graph_decoder(model, 2, 40)
            assert graph_decoder(model, 2, 40) is decoder
            decoder.prefill(out.past_key_values, mask)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            full_mask = mask if mask is not None else torch.ones_like(prompt)
            for position in range(prompt.shape[1], prompt.shape[1] + 6):
                static = decoder.step(token, position).clone()
                full_mask = torch.cat([full_mask, torch.ones_like(token)], 1)
                eager = model(token, attention_mask=full_mask, past_key_values=past, use_cache=True)
                past = eager.past_key_values
                assert torch.allclose(static.float(), eager.logits[:, -1].float(), atol=atol)
                token = eager.logits[:, -1].argmax(-1, keepdim=True)


def test_prefill_clears_rows_left_by_a_longer_call():
    model = tiny_model(tiny_transformer_params())
    decoder = graph_decoder(model, 1, 20)
    for cache in decoder.values:
        cache.fill_(float("nan"))  # e.g. an overflow in an earlier, longer generation
    with torch.inference_mode():
        out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        decoder.prefill(out.past_key_values, None)
        assert torch.isfinite(decoder.step(torch.tensor([[8]]), 3)).all()
