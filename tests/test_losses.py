"""The plain-PyTorch loss reference against values computed by hand from each formulation's definition."""
import math

import pytest
import torch

from sgan.losses import (FORMULATIONS, GENERATED, UNLABELED, discriminator_loss_sums, num_logits,
                         real_probability)


def by_definition(row, target, formulation):
    """[CE, -log D, -log(1 - D)] for one row, straight from the definitions, in float64 Python math."""
    row = [float(v) for v in row]
    k = len(row) if formulation == "k-logit" else len(row) - 1
    exp = [math.exp(v) for v in row]
    if formulation == "two-head":
        d = 1 / (1 + math.exp(-row[k]))
        ce = -math.log(exp[target] / sum(exp[:k])) if target >= 0 else 0.0
    elif formulation == "k-plus-one":
        d = 1 - exp[k] / sum(exp)
        ce = -math.log(exp[target] / sum(exp)) if target >= 0 else 0.0
    else:
        z = sum(exp)
        d = z / (z + 1)
        ce = -math.log(exp[target] / z) if target >= 0 else 0.0
    real = -math.log(d) if target >= UNLABELED else 0.0
    fake = -math.log(1 - d) if target == GENERATED else 0.0
    return [ce, real, fake]


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_matches_definition_on_small_logits(formulation):
    torch.manual_seed(0)
    k = 4
    logits = torch.randn(9, num_logits(formulation, k), dtype=torch.float64) * 2
    target = torch.tensor([0, 3, 2, UNLABELED, UNLABELED, GENERATED, GENERATED, 1, GENERATED])
    expected = torch.tensor([sum(col) for col in zip(*(by_definition(r, int(t), formulation)
                                                        for r, t in zip(logits, target)))], dtype=torch.float32)
    got = discriminator_loss_sums(logits, target, formulation)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hand_computed_two_head_row():
    # logits [1, 2 | 0.5], class 1: CE = log(e + e^2) - 2, -log sigmoid(0.5) = log(1 + e^-0.5)
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    got = discriminator_loss_sums(logits, torch.tensor([1]), "two-head")
    expected = [math.log(math.e + math.e ** 2) - 2, math.log(1 + math.exp(-0.5)), 0.0]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_k_logit_zero_logits_give_known_probability():
    # K zero logits: Z = K, D = K / (K + 1)
    logits = torch.zeros(1, 10)
    assert real_probability(logits, "k-logit").item() == pytest.approx(10 / 11)
    got = discriminator_loss_sums(logits, torch.tensor([GENERATED]), "k-logit")
    assert got[2].item() == pytest.approx(math.log(11))


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_finite_values_and_gradients(formulation, scale):
    k = 10
    torch.manual_seed(1)
    logits = (torch.randn(6, num_logits(formulation, k)).sign() * scale).requires_grad_()
    target = torch.tensor([0, 5, UNLABELED, UNLABELED, GENERATED, GENERATED])
    sums = discriminator_loss_sums(logits, target, formulation)
    assert torch.isfinite(sums).all(), sums
    sums.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_masked_rows_do_not_contribute(formulation):
    logits = torch.randn(4, num_logits(formulation, 3))
    only_generated = discriminator_loss_sums(logits, torch.full((4,), GENERATED), formulation)
    assert only_generated[0] == 0 and only_generated[1] == 0 and only_generated[2] > 0
    only_unlabeled = discriminator_loss_sums(logits, torch.full((4,), UNLABELED), formulation)
    assert only_unlabeled[0] == 0 and only_unlabeled[2] == 0 and only_unlabeled[1] > 0


def test_nan_propagates():
    logits = torch.zeros(2, 11)
    logits[1, 3] = float("nan")
    sums = discriminator_loss_sums(logits, torch.tensor([0, UNLABELED]), "k-plus-one")
    assert torch.isnan(sums[1])


@pytest.mark.parametrize(
    "logits, target, formulation, message",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), "k-logit", "2-D"),
        (torch.zeros(3, 10), torch.zeros(2, dtype=torch.long), "k-logit", "one entry per logits row"),
        (torch.zeros(3, 10), torch.full((3,), 10), "k-logit", r"\[-2, 9\]"),
        (torch.zeros(3, 10), torch.full((3,), -3), "two-head", r"\[-2, 8\]"),
        (torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), "two-head", "2 or more logits"),
        (torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, dtype=torch.long), "k-logit", "floating-point"),
        (torch.zeros(3, 10), torch.zeros(3), "k-logit", "int64"),
        (torch.zeros(3, 10), torch.zeros(3, dtype=torch.long), "softmax", "unknown formulation"),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, target, formulation, message):
    with pytest.raises((ValueError, TypeError), match=message):
        discriminator_loss_sums(logits, target, formulation)


def test_empty_batch_gives_zeros():
    got = discriminator_loss_sums(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), "k-logit")
    assert torch.equal(got, torch.zeros(3))


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_reference_without_target_check_gives_nan_for_bad_targets(formulation):
    """check_targets=False reads nothing back to check the targets: valid ones give the checked result,
    out-of-range ones (never used as an index) make every sum NaN, as in the fused op."""
    torch.manual_seed(0)
    k = 4
    logits = torch.randn(6, num_logits(formulation, k))
    target = torch.tensor([0, 3, -1, -2, 2, -1])
    torch.testing.assert_close(discriminator_loss_sums(logits, target, formulation, check_targets=False),
                               discriminator_loss_sums(logits, target, formulation))
    for bad in (k, -3, 2**40):
        target[1] = bad
        with pytest.raises(ValueError, match="target values must lie"):
            discriminator_loss_sums(logits, target, formulation)
        assert torch.isnan(discriminator_loss_sums(logits, target, formulation, check_targets=False)).all()
