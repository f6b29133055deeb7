"""One training step, phase by phase: D's loss and update, then G's (the loop in sgan/train.py calls them).

D step (every recipe): D's logits for the labeled, unlabeled and generated batches (one forward per kind when D
has BatchNorm, so that each kind is normalised by its own statistics; else one forward over all the rows); then
one loss over all rows, with per-row targets (the class, UNLABELED or GENERATED):
    loss = CE / n_labeled + w * (real / n_real + fake / n_generated) [+ e * mean class entropy of unlabeled rows]
The supervised recipe has the labeled batch only: loss = CE / n_labeled.
G step (--g-steps per D step): the non-saturating -log D(G(z)) (odena), or feature matching (salimans): the
squared gap between the mean features one D layer gives a real batch and a generated one, means taken over
all processes.

Nothing here reads a value back to the host: losses are returned as tensors on the device, so on a GPU a
step is queued without waiting for the previous one (the loop reads them every --log-every steps).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .losses import GENERATED, UNLABELED, class_entropy

LOSS_TERMS = ("supervised", "real", "fake")  # the loss op's three sums, in its order (see sgan/losses.py)


@dataclass(frozen=True)
class StepSettings:
    """The settings a step uses (sgan.train.step_settings makes them from a run's flags)."""

    formulation: str
    unlabeled_weight: float
    real_rows: str  # "all" or "unlabeled": the real images D's real term covers
    feature_matching: bool  # G's loss: feature matching (salimans), else the non-saturating loss
    freeze_bn_on_fakes: bool  # generated batches leave D's BatchNorm running statistics alone
    g_clip_norm: float  # 0: G's gradient is not clipped
    loss_backend: str  # resolved: cpp, cuda or torch
    entropy_weight: float = 0.0  # weight of the class entropy on unlabeled rows (0: off)
    feature_layer: int = -1  # the D layer feature matching compares (-1: the last hidden layer)


@dataclass
class StepBatch:
    """One step's real images, on the training device."""

    labeled: Tensor
    labels: Tensor
    unlabeled: Tensor | None = None  # None in the supervised recipe
    matching: Tensor | None = None  # the real batch feature matching compares G's with (salimans)


class EMA:
    """An exponential moving average of a network's parameters and buffers: the classifier the salimans
    recipe evaluates. The first update copies the network; each later one moves every tensor 1 - decay of
    the way towards the network's. (torch.optim.swa_utils.AveragedModel computes the same, but reads its
    update count back from the device at every update.)"""

    def __init__(self, network: nn.Module, decay: float):
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.decay = decay
        self.started = False  # set when a run resumes with a saved average

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*network.parameters(), *network.buffers()]))
        if not self.started:
            self.started = True
            for mine, theirs in pairs:
                mine.copy_(theirs)
            return
        floats = [(mine, theirs) for mine, theirs in pairs if mine.is_floating_point()]
        torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], 1.0 - self.decay)
        for mine, theirs in pairs:
            if not mine.is_floating_point():  # BatchNorm's batch counters
                mine.copy_(theirs)


@dataclass
class Networks:
    """D and G with their optimisers. `discriminator` and `generator` are as accelerate prepared them
    (DDP-wrapped with several processes); `plain_d` and `plain_g` are the same modules unwrapped."""

    discriminator: nn.Module
    plain_d: nn.Module
    opt_d: torch.optim.Optimizer
    generator: nn.Module | None = None  # None in the supervised recipe
    plain_g: nn.Module | None = None
    opt_g: torch.optim.Optimizer | None = None
    ema: EMA | None = None

    @property
    def classifier(self) -> nn.Module:
        """The network that is evaluated and saved: D's moving average when there is one, else D."""
        return self.ema.module if self.ema is not None else self.plain_d


def batch_norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def bn_stats_frozen(module: nn.Module, enabled: bool = True):
    """BatchNorm still normalises by the batch's statistics but leaves its running statistics and batch
    counter alone (in training mode, track_running_stats=False does exactly that).

    Used for generated batches, so that the running statistics used at test time describe real images."""
    saved = [m for m in batch_norm_layers(module) if m.track_running_stats] if enabled else []
    for m in saved:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in saved:
            m.track_running_stats = True


@contextmanager
def frozen(module: nn.Module):
    """Parameters excluded from autograd for a while (no gradients computed or stored for them)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def loss_sums(logits: Tensor, targets: Tensor, settings: StepSettings) -> dict[str, Tensor]:
    """The loss op's three sums by name: supervised (CE over labeled rows), real, fake.

    The steps build their targets themselves, so the op's value check of them (a host sync on CUDA) is off."""
    sums = ops.discriminator_loss_sums(logits, targets, settings.formulation, backend=settings.loss_backend,
                                       check_targets=False)
    return dict(zip(LOSS_TERMS, sums.unbind()))


def discriminator_loss(logits: list[Tensor], targets: list[Tensor], settings: StepSettings):
    """D's loss from its forwards' logits and targets, [labeled] or [labeled, unlabeled, generated]:
    CE / n_labeled + w * (real / n_real + fake / n_generated). Returns it and the named loss sums.

    One loss call over all rows; with real_rows "unlabeled" (the paper's code) the labeled rows get a call of
    their own, so that they enter the cross-entropy only."""
    n_labeled = len(targets[0])
    if len(logits) == 1:  # supervised
        sums = loss_sums(logits[0], targets[0], settings)
        return sums["supervised"] / n_labeled, sums
    if settings.real_rows == "unlabeled":
        sums = {**loss_sums(torch.cat(logits[1:]), torch.cat(targets[1:]), settings),
                "supervised": loss_sums(logits[0], targets[0], settings)["supervised"]}
        n_real = len(targets[1])
    else:
        sums, n_real = loss_sums(torch.cat(logits), torch.cat(targets), settings), n_labeled + len(targets[1])
    unsupervised = sums["real"] / n_real + sums["fake"] / len(targets[2])
    loss = sums["supervised"] / n_labeled + settings.unlabeled_weight * unsupervised
    if settings.entropy_weight > 0:  # confident class predictions on unlabeled images (Grandvalet & Bengio 2005)
        loss = loss + settings.entropy_weight * class_entropy(logits[1], settings.formulation)
    return loss, sums


def discriminator_logits(nets: Networks, images: list[Tensor], settings: StepSettings) -> list[Tensor]:
    """D's logits for each batch of `images`: [labeled] or [labeled, unlabeled, generated].

    With BatchNorm, one forward per batch, so that each kind is normalised by its own statistics (and the
    generated one leaves the running statistics alone). Without it (the salimans D, or --d-batchnorm false),
    each row's output depends on that row only, so one forward over all the rows computes the same, faster:
    bigger matrix products, and each layer's weight norms and noise calls once per step, not three times."""
    d = nets.discriminator
    if len(images) == 1:
        return [d(images[0])]
    if not batch_norm_layers(nets.plain_d):
        return list(d(torch.cat(images)).split([len(x) for x in images]))
    logits = [d(x) for x in images[:-1]]
    with bn_stats_frozen(d, settings.freeze_bn_on_fakes):
        logits.append(d(images[-1]))
    return logits


def d_step(accelerator, nets: Networks, batch: StepBatch, settings: StepSettings) -> dict[str, Tensor]:
    """One update of D (and of its moving average). Returns {"d_loss", "supervised_ce"} on the device."""
    images, targets = [batch.labeled], [batch.labels]
    if batch.unlabeled is not None:
        device = batch.unlabeled.device
        z = nets.plain_g.sample_latent(len(batch.unlabeled), device)
        with torch.no_grad():  # G is not updated here: no graph for it
            fake = nets.plain_g(z)
        images += [batch.unlabeled, fake]
        targets += [torch.full((len(batch.unlabeled),), UNLABELED, device=device),
                    torch.full((len(fake),), GENERATED, device=device)]
    loss, sums = discriminator_loss(discriminator_logits(nets, images, settings), targets, settings)
    nets.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss)  # accelerate: scales the loss under fp16; DDP averages D's gradients
    nets.opt_d.step()
    if nets.ema is not None:
        nets.ema.update(nets.plain_d)
    return {"d_loss": loss.detach(), "supervised_ce": sums["supervised"].detach() / len(batch.labels)}


def mean_over_processes(features: Tensor) -> Tensor:
    """The mean over the batch and over all processes' batches (equal sizes), differentiable: the gradient of
    a loss of it reaches every process's rows, as with one process holding the global batch."""
    mean = features.mean(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            from torch.distributed.nn.functional import all_reduce  # its backward all-reduces the gradient

            mean = all_reduce(mean) / world_size
    return mean


def generator_loss(plain_d: nn.Module, generator: nn.Module, z: Tensor, matching: Tensor | None,
                   settings: StepSettings) -> Tensor:
    """G's loss on G(z) against the unwrapped D: feature matching (salimans; `matching` is the real batch it
    compares with) or the non-saturating -log D(G(z)), a mean over the rows."""
    if settings.feature_matching:  # squared gap of the mean features of one D layer (the last hidden one: -1)
        real = mean_over_processes(plain_d.features(matching, settings.feature_layer))
        fake = mean_over_processes(plain_d.features(generator(z), settings.feature_layer))
        return (real - fake).square().mean()
    fake_logits = plain_d(generator(z))
    targets = torch.full((len(fake_logits),), UNLABELED, device=fake_logits.device)  # G wants fakes taken as real
    return loss_sums(fake_logits, targets, settings)["real"] / len(fake_logits)


def g_step(accelerator, nets: Networks, batch: StepBatch, settings: StepSettings) -> Tensor:
    """One update of G. Returns its loss on the device.

    It runs the *unwrapped* D with its parameters frozen: D is not updated here, so DDP has no D gradients to
    synchronise (none are computed), and a G loss that leaves some D parameters unused (feature matching)
    needs no find_unused_parameters. D's BatchNorm running statistics are left alone."""
    z = nets.plain_g.sample_latent(len(batch.unlabeled), batch.unlabeled.device)
    with bn_stats_frozen(nets.plain_d, settings.freeze_bn_on_fakes), frozen(nets.plain_d), accelerator.autocast():
        loss = generator_loss(nets.plain_d, nets.generator, z, batch.matching, settings)
    nets.opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss)  # DDP averages G's gradients
    if settings.g_clip_norm > 0:
        accelerator.clip_grad_norm_(nets.generator.parameters(), settings.g_clip_norm)  # unscales under fp16 first
    nets.opt_g.step()
    return loss.detach()
