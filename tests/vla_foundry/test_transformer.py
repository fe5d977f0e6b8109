import pytest
import torch
from safetensors.torch import load_file

from vla_foundry import load_model
from vla_foundry.models.transformer import swiglu_width
from vla_foundry.sampling import filter_logits, select_next_token
from tests.factories import tiny_model, tiny_transformer_params

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture_model(transformer_fixture):
    return load_model(transformer_fixture)


def expected(transformer_fixture, case):
    return load_file(transformer_fixture / "expected" / f"{case}.safetensors")


def test_fixture_forward(fixture_model, transformer_fixture):
    e = expected(transformer_fixture, "forward")
    out = fixture_model(input_ids=e["input.input_ids"], output_hidden_states=True)
    assert torch.allclose(out.logits, e["output.logits"], atol=ATOL)
    for i, h in enumerate(out.hidden_states):
        assert torch.allclose(h, e[f"debug.hidden_state_{i}"], atol=ATOL)


@pytest.mark.parametrize("use_cache", [True, False])
def test_fixture_forward_masked(fixture_model, transformer_fixture, use_cache):
    e = expected(transformer_fixture, "forward_masked")
    out = fixture_model(e["input.input_ids"], attention_mask=e["input.attention_mask"], use_cache=use_cache)
    key = "output.logits_use_cache" if use_cache else "output.logits_no_cache"
    assert torch.allclose(out.logits, e[key], atol=ATOL)
    if use_cache:
        for i, (k, v) in enumerate(out.past_key_values):
            assert torch.allclose(k, e[f"debug.past_key_{i}"], atol=ATOL)
            assert torch.allclose(v, e[f"debug.past_value_{i}"], atol=ATOL)


@pytest.mark.parametrize("case", ["generate", "generate_padded"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_fixture_generate(fixture_model, transformer_fixture, case, use_cache):
    e = expected(transformer_fixture, case)
    tokens = fixture_model.generate(e["input.input_ids"], e["input.attention_mask"], max_new_tokens=8,
                                    temperature=0.0, top_p=0.9, top_k=50, eos_token_id=None, use_cache=use_cache)
    assert torch.equal(tokens, e["output.tokens_use_cache" if use_cache else "output.tokens_no_cache"])


VARIANTS = {
    "gelu": dict(ffn_type="gelu"),
    "rms_norm_qk_norm": dict(norm_type="rms_norm", qk_norm=True),
    "gain_only": dict(norm_type="gain_only_layer_norm", post_embed_norm=True),
    "no_wb": dict(norm_type="no_wb_layer_norm"),
    "tied": dict(weight_tying=True),
    "no_positions": dict(positional_embedding_type="none"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_cache_matches_no_cache(name):
    model = tiny_model(tiny_transformer_params(**VARIANTS[name]))
    prompt = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    with_cache = model.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=True)
    without = model.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    full = model(with_cache).logits[:, 4:-1]
    stepwise = []
    out = model(with_cache[:, :5], use_cache=True)
    stepwise.append(out.logits[:, -1])
    past = out.past_key_values
    for t in range(5, with_cache.shape[1] - 1):
        out = model(with_cache[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        stepwise.append(out.logits[:, -1])
    assert torch.allclose(full, torch.stack(stepwise, dim=1), atol=1e-5)


def test_state_dict_keys_follow_the_spec():
    keys = set(tiny_model(tiny_transformer_params(ffn_type="gelu", qk_norm=True, post_embed_norm=True)).state_dict())
    assert {"embeddings.weight", "post_embed_norm.weight", "post_embed_norm.bias", "norm.weight", "output.weight",
            "layers.0.attention.in_proj.weight", "layers.0.attention.out_proj.weight",
            "layers.0.attention.pos_embed.inv_freq", "layers.0.attention.q_norm.weight",
            "layers.0.feed_forward.0.weight", "layers.0.feed_forward.2.weight", "layers.1.ffn_norm.bias"} <= keys
    assert not any(k.endswith("in_proj.bias") for k in keys)
    none_params = tiny_transformer_params(positional_embedding_type="none", norm_type="no_wb_layer_norm")
    none_keys = set(tiny_model(none_params).state_dict())
    assert not any("inv_freq" in k or "norm" in k for k in none_keys)
    assert [swiglu_width(h) for h in (32, 64, 96, 512, 2048)] == [256, 256, 256, 1536, 5632]


def test_bidirectional_model_sees_the_future():
    model = tiny_model(tiny_transformer_params(is_causal=False))
    ids = torch.tensor([[1, 2, 3, 4]])
    changed = ids.clone()
    changed[0, 3] = 9
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])
    causal = tiny_model(tiny_transformer_params())
    assert torch.allclose(causal(ids).logits[0, 0], causal(changed).logits[0, 0])


def test_seeded_sampling_is_reproducible():
    model = tiny_model(tiny_transformer_params())
    prompt = torch.tensor([[1, 2, 3]])

    def sample(seed):
        return model.generate(prompt, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_eos_and_stopping_end_generation():
    model = tiny_model(tiny_transformer_params())
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    first_new = int(greedy[0, 3])
    stopped = model.generate(prompt, max_new_tokens=6, temperature=0.0, eos_token_id=first_new)
    assert stopped.shape[1] == 4
    stopped = model.generate(prompt, max_new_tokens=6, temperature=0.0,
                             stopping=lambda new: new.shape[1] >= torch.ones(1) * 2)
    assert stopped.shape[1] == 5


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, :2]).any()
    probs = torch.softmax(logits, -1)[0]  # ≈ 0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]  # the token crossing top_p stays
    assert probs[0] < 0.7
    assert not torch.isinf(filter_logits(logits, 1.0, 0, 0.01)[0, 0])  # the first token is always kept
    assert select_next_token(torch.tensor([[0.0, 5.0, 1.0]]), 0.0, 50, 0.9).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {select_next_token(logits, 1.0, 2, 1.0, g).item() for _ in range(50)}
    assert draws == {0, 1}
