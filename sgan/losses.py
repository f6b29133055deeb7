"""Discriminator and generator losses for semi-supervised GANs, in plain PyTorch.

This is the reference implementation of the loss contract that the fused C++/CUDA op implements too:

    discriminator_loss_sums(logits[B, C], target[B]) -> Tensor[3]
        [0] sum of the supervised cross-entropy over labeled rows        (target >= 0)
        [1] sum of -log D(x) over real rows, labeled or not              (target >= -1)
        [2] sum of -log(1 - D(x)) over generated rows                    (target == -2)

target holds the class (0..K-1) for a labeled real image, UNLABELED (-1) for an unlabeled real image and
GENERATED (-2) for an image from G.

All three formulations reduce to two per-row numbers, which is what keeps them numerically stable:
    m = logsumexp of the K class logits
    r = the log-odds that x is real, logit(D(x)), so -log D = softplus(-r) and -log(1 - D) = softplus(r)
      two-head:   r = logits[:, K]                 (D = sigmoid of the real/fake logit)
      k-plus-one: r = m - logits[:, K]             (D = 1 - softmax(logits)[K])
      k-logit:    r = m                            (D = Z / (Z + 1), Z = sum exp(logits), log Z = m)
and the cross-entropy of a labeled row is m - logits[t], plus softplus(-r) for k-plus-one (whose softmax runs
over K + 1 logits: logsumexp over all of them is m + softplus(-r)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FORMULATIONS = ("two-head", "k-plus-one", "k-logit")
UNLABELED = -1
GENERATED = -2


def num_logits(formulation: str, num_classes: int) -> int:
    """How many logits D must output for a formulation: K + 1, except K for k-logit."""
    check_formulation(formulation)
    return num_classes if formulation == "k-logit" else num_classes + 1


def num_classes_from_logits(formulation: str, num_logits_: int) -> int:
    check_formulation(formulation)
    return num_logits_ if formulation == "k-logit" else num_logits_ - 1


def check_formulation(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}: choose one of {', '.join(FORMULATIONS)}")


def check_loss_inputs(logits: torch.Tensor, target: torch.Tensor, formulation: str, check_values: bool = True) -> int:
    """Validate the loss inputs; return K. Raises ValueError/TypeError that say what to fix.

    check_values=False skips the range check of the target values, the one check that reads the device."""
    check_formulation(formulation)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, C], got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be 1-D with one entry per logits row ({logits.shape[0]}), got shape {tuple(target.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 or int32 tensor, got {target.dtype}")
    if logits.device != target.device:
        raise ValueError(f"logits are on {logits.device} but target is on {target.device}: move both to one device")
    k = num_classes_from_logits(formulation, logits.shape[1])
    if k < 1:
        raise ValueError(
            f"{formulation} needs {num_logits(formulation, 1)} or more logits per row (K classes"
            f"{'' if formulation == 'k-logit' else ' + 1'}), got {logits.shape[1]}"
        )
    if check_values and target.numel() and (int(target.min()) < GENERATED or int(target.max()) >= k):
        raise ValueError(
            f"target values must lie in [-2, {k - 1}] (class, -1 unlabeled, -2 generated), "
            f"got min {int(target.min())} max {int(target.max())}"
        )
    return k


def class_lse_and_real_logit(logits: torch.Tensor, formulation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: m = logsumexp of the K class logits and r = logit(D(x)), both float32."""
    x = logits.float()
    k = num_classes_from_logits(formulation, x.shape[1])
    m = torch.logsumexp(x[:, :k], dim=1)
    if formulation == "two-head":
        r = x[:, k]
    elif formulation == "k-plus-one":
        r = m - x[:, k]
    else:
        r = m
    return m, r


def real_probability(logits: torch.Tensor, formulation: str) -> torch.Tensor:
    """D(x), the probability that each row's image is real."""
    return torch.sigmoid(class_lse_and_real_logit(logits, formulation)[1])


def class_logits(logits: torch.Tensor, formulation: str) -> torch.Tensor:
    """The K class logits (argmax gives the predicted class for every formulation)."""
    return logits[:, : num_classes_from_logits(formulation, logits.shape[1])]


def class_entropy(logits: torch.Tensor, formulation: str) -> torch.Tensor:
    """The mean over rows of the entropy of D's class posterior p(y | x, real) = softmax(class logits)."""
    log_p = torch.log_softmax(class_logits(logits, formulation).float(), dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def discriminator_loss_sums(logits: torch.Tensor, target: torch.Tensor, formulation: str,
                            check_targets: bool = True) -> torch.Tensor:
    """Reference loss sums [supervised CE, -log D over real, -log(1-D) over generated] as float32[3].

    check_targets=False skips the value check of target (a host read); a target outside [-2, K) then makes
    every sum NaN, as in the fused op."""
    k = check_loss_inputs(logits, target, formulation, check_values=check_targets)
    m, r = class_lse_and_real_logit(logits, formulation)
    labeled = target >= 0
    real = target >= UNLABELED
    generated = target == GENERATED

    picked = logits.float().gather(1, target.clamp(0, k - 1).long().unsqueeze(1)).squeeze(1)
    ce = m - picked
    if formulation == "k-plus-one":
        ce = ce + F.softplus(-r)
    # torch.where, not multiplication by a mask: a masked-out row must not turn inf * 0 into NaN,
    # while a NaN in a selected row still propagates.
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    sums = torch.stack(
        [
            torch.where(labeled, ce, zero).sum(),
            torch.where(real, F.softplus(-r), zero).sum(),
            torch.where(generated, F.softplus(r), zero).sum(),
        ]
    )
    if check_targets:
        return sums
    out_of_range = ((target < GENERATED) | (target >= k)).any()
    return torch.where(out_of_range, torch.full_like(sums, float("nan")), sums)
