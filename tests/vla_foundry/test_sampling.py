"""Next-token draws (vla_foundry/sampling.py): ``draw`` and ``draw_groups`` pick exactly the tokens
``torch.multinomial`` picks from the same generators (what VLA Foundry's own generate uses), several requests' rows
drawn together each from its own generator, and unfit probabilities fail only their own request."""

from __future__ import annotations

import pytest
import torch

from vla_foundry.sampling import INVALID_PROBABILITIES, _fit_row, draw, draw_groups, token_distribution


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
    for i, generator in enumerate(generators):  # each moved on as far as its own draw moves it
        own = torch.Generator().manual_seed(100 + i)
        torch.multinomial(probs[:rows_per_request[i]], 1, generator=own)
        assert torch.equal(generator.get_state(), own.get_state())


@pytest.mark.parametrize("fault", ["nan", "inf", "-inf", "negative", "zeros"])
def test_unfit_probabilities_fail_their_own_request_only(fault):
    probs, _ = distribution(4, 64, seed=3)
    if fault == "zeros":
        probs[2] = 0.0  # no positive mass
    else:
        probs[2, 5] = -0.1 if fault == "negative" else float(fault)  # one bad probability among fit ones
    rows = [2, 1, 1]
    groups = [(torch.Generator().manual_seed(i), n) for i, n in enumerate(rows)]
    tokens, valid = draw_groups(probs, None, groups)
    assert valid == [True, False, True]
    for i, (start, n) in enumerate(((0, 2), (3, 1))):  # the fit groups: multinomial's tokens
        own = torch.Generator().manual_seed((0, 2)[i])
        assert torch.equal(tokens[start:start + n], torch.multinomial(probs[start:start + n], 1, generator=own)[:, 0])
    with pytest.raises(RuntimeError, match="probability tensor"):
        draw(probs[2:3], None, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):  # torch.multinomial refuses the same row
        torch.multinomial(probs[2:3], 1)
    assert "inf" in INVALID_PROBABILITIES and "nan" in INVALID_PROBABILITIES


def test_a_row_is_fit_as_torch_multinomial_judges_it():
    """``_fit_row`` decides a row whose pick looked unfit (an exponential draw of exactly 0 can pick a zero from a
    fit row): it must accept what multinomial accepts and refuse what it refuses."""
    rows = {"fit": [0.0, 0.25, 0.75], "nan": [0.5, float("nan"), 0.5], "inf": [0.5, float("inf"), 0.0],
            "negative": [0.5, -0.1, 0.6], "zeros": [0.0, 0.0, 0.0]}
    for name, row in rows.items():
        row = torch.tensor(row)
        try:
            torch.multinomial(row[None], 1)
            accepted = True
        except RuntimeError:
            accepted = False
        assert _fit_row(row) == accepted == (name == "fit"), name


def test_groups_must_cover_every_row_and_probabilities_be_two_dimensional():
    probs, _ = distribution(3, 16, seed=1)
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    with pytest.raises(ValueError, match="the groups hold 2 rows; probs has 3"):
        draw_groups(probs, None, [(generator, 2)])
    with pytest.raises(ValueError, match="the groups hold 4 rows; probs has 3"):
        draw_groups(probs, None, [(generator, 4)])
    assert torch.equal(generator.get_state(), before)  # refused before drawing
    with pytest.raises(ValueError, match=r"\(rows, tokens\)"):
        draw(probs[0], None, torch.Generator())
