"""Next-token draws (vla_foundry/sampling.py): ``draw`` and ``draw_groups`` pick exactly the tokens
``torch.multinomial`` picks from the same generators (what VLA Foundry's own generate uses), several requests' rows
drawn together each from its own generator, and unfit probabilities fail only their own request."""

from __future__ import annotations

import pytest
import torch

from vla_foundry.sampling import INVALID_PROBABILITIES, draw, draw_groups, token_distribution


def distribution(rows: int, vocab: int, seed: int, top_k: int = 0, top_p: float = 1.0):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return token_distribution(logits, 1.0, top_k, top_p)


@pytest.mark.parametrize("rows,vocab,top_k,top_p", [(1, 1024, 0, 1.0), (3, 97, 0, 1.0), (2, 1024, 20, 1.0),
                                                    (4, 300, 0, 0.9)])
def test_a_draw_picks_what_torch_multinomial_picks_and_leaves_the_generator_where_it_does(rows, vocab, top_k, top_p):
    for seed in range(200):
        probs, token_ids = distribution(rows, vocab, seed, top_k, top_p)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):  # later draws from the same generators too
            expected = torch.multinomial(probs, 1, generator=theirs).squeeze(-1)
            if token_ids is not None:
                expected = token_ids.gather(-1, expected[:, None]).squeeze(-1)
            assert torch.equal(draw(probs, token_ids, ours), expected)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_requests_drawn_together_each_get_the_tokens_of_their_own_generator_alone():
    rows_per_request = [1, 3, 1, 2]
    probs, _ = distribution(sum(rows_per_request), 1024, seed=7)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(rows_per_request))]
    alone, start = [], 0
    for i, rows in enumerate(rows_per_request):
        own = torch.Generator().manual_seed(100 + i)
        alone.append(torch.multinomial(probs[start:start + rows], 1, generator=own).squeeze(-1))
        start += rows
    tokens, valid = draw_groups(probs, None, list(zip(generators, rows_per_request)))
    assert valid == [True] * 4
    assert torch.equal(tokens, torch.cat(alone))


@pytest.mark.parametrize("fault", ["nan", "inf", "zeros"])
def test_unfit_probabilities_fail_their_own_request_only(fault):
    probs, _ = distribution(4, 64, seed=3)
    if fault == "zeros":
        probs[2] = 0.0  # no positive mass
    else:
        probs[2, 5] = float(fault)  # one bad probability among fit ones
    groups = [(torch.Generator().manual_seed(i), rows) for i, rows in enumerate([2, 1, 1])]
    tokens, valid = draw_groups(probs, None, groups)
    assert valid == [True, False, True]
    fit = torch.multinomial(probs[3:], 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
    assert torch.equal(tokens[3:], fit)
    with pytest.raises(RuntimeError, match="probability tensor"):
        draw(probs[2:3], None, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):  # torch.multinomial refuses the same row
        torch.multinomial(probs[2:3], 1)
    assert "inf" in INVALID_PROBABILITIES and "nan" in INVALID_PROBABILITIES
