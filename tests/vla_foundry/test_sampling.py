"""Next-token draws: ``draw_runs`` (several generators' rows in one division and argmax) against ``draw``."""

import pytest
import torch

from vla_foundry.sampling import draw, draw_runs, drawable, token_distribution


@pytest.mark.parametrize("vocab,top_k", [(2, 0), (97, 0), (1024, 0), (1024, 50), (50257, 40)])
def test_draw_runs_gives_each_run_the_tokens_and_generator_state_of_its_own_draw(vocab, top_k):
    """Runs of 1-3 rows, each with its own seeded generator: the same tokens as ``draw`` on the run's rows alone
    (``torch.multinomial``), and each generator left where that draw leaves it (its next draws agree too)."""
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[4, : vocab // 2] = float("-inf")  # a row with half its vocabulary masked out
    probs, token_ids = token_distribution(logits, 0.8, top_k, 0.95 if top_k else 1.0)
    sizes = [1, 3, 2, 1, 2]
    for trial in range(20):
        seeds = [1000 * trial + i for i in range(len(sizes))]
        ours = [torch.Generator().manual_seed(s) for s in seeds]
        alone = [torch.Generator().manual_seed(s) for s in seeds]
        together = draw_runs(probs, token_ids, list(zip(sizes, ours)))
        first, expected = 0, []
        for size, generator in zip(sizes, alone):
            rows = slice(first, first + size)
            expected.append(draw(probs[rows], None if token_ids is None else token_ids[rows], generator))
            first += size
        assert torch.equal(together, torch.cat(expected))
        for a, b in zip(ours, alone):
            assert torch.equal(a.get_state(), b.get_state())


def test_draw_runs_must_cover_every_row():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="cover 2 rows of 3"):
        draw_runs(probs, None, [(2, torch.Generator())])


def test_drawable_says_which_rows_multinomial_accepts():
    probs = torch.tensor([[0.5, 0.5], [0.0, 0.0], [float("nan"), 1.0], [-0.1, 1.1], [float("inf"), 0.0]])
    assert drawable(probs).tolist() == [True, False, False, False, False]
    for row in range(1, 5):
        with pytest.raises(RuntimeError):
            torch.multinomial(probs[row:row + 1], 1)
