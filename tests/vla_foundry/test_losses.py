import pytest
import torch
import torch.nn.functional as F

from vla_foundry.losses import IGNORE_INDEX, cross_entropy_loss, masked_mse_loss
from vla_foundry.models import create_batch_handler
from tests.factories import tiny_model, tiny_transformer_params


def test_cross_entropy_with_ignore_and_z_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, 4]])
    valid = targets != IGNORE_INDEX
    plain = F.cross_entropy(logits[valid], targets[valid])
    assert torch.allclose(cross_entropy_loss(logits, targets), plain)
    z = torch.logsumexp(logits[valid], -1).pow(2).mean()
    assert torch.allclose(cross_entropy_loss(logits, targets, z_loss_coefficient=1e-2), plain + 1e-2 * z)
    with pytest.raises(ValueError, match="no token"):
        cross_entropy_loss(logits, torch.full_like(targets, IGNORE_INDEX))


def test_masked_mse():
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    target[0, 0] = 5.0
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(1.0)
    assert masked_mse_loss(pred, target).item() == pytest.approx((2 * 25 + 10) / 12)
    with pytest.raises(ValueError, match="selects no element"):
        masked_mse_loss(pred, target, torch.zeros(2, 3, dtype=torch.bool))


def test_language_model_handler_shifts_and_masks_padding():
    model = tiny_model(tiny_transformer_params())
    handler = create_batch_handler("transformer")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = handler.compute_loss(model, {"input_ids": ids, "attention_mask": mask})
    logits = model(ids[:, :-1]).logits
    manual = F.cross_entropy(torch.cat([logits[0], logits[1, :1]]), torch.tensor([6, 7, 8, 10]))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert out.num_samples == 2 and out.metrics["num_tokens"] == 4
    out.loss.backward()  # differentiable: the demo pack trains through the same handler
    assert model.output.weight.grad is not None


def test_a_bidirectional_models_loss_ignores_padding_and_the_rows_beside_it():
    """``is_causal: false``: a row's tokens attended to its padding (the handler passed no mask), so its loss moved
    with the padding after it and with the other rows sharing the forward pass."""
    model = tiny_model(tiny_transformer_params(is_causal=False, vocab_size=64))
    handler = create_batch_handler("transformer")
    alone = handler.compute_loss(model, {"input_ids": torch.tensor([[3, 4, 5, 6]])})
    padded = handler.compute_loss(model, {"input_ids": torch.tensor([[3, 4, 5, 6, 0, 0, 0, 0]]),
                                          "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])})
    assert torch.allclose(alone.loss, padded.loss, atol=1e-6)
    together = handler.compute_loss_each(
        model, {"input_ids": torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])}, [1, 1])
    assert torch.allclose(together[0].loss, alone.loss, atol=1e-6)
