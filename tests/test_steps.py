"""The D and G steps on tiny networks: what each updates, what each must leave alone, and which way G moves."""
import copy
import dataclasses

import pytest
import torch
from accelerate import Accelerator

from sgan.losses import real_probability
from sgan.models import NetworkSpec, build_discriminator, build_generator
from sgan.losses import class_entropy
from sgan.steps import (EMA, Networks, StepBatch, StepSettings, bn_stats_frozen, d_step, discriminator_logits,
                        discriminator_loss, g_step)

SPEC = NetworkSpec("odena", (1, 12, 12), num_classes=3, formulation="k-logit", latent_dim=8, d_width=4, g_width=4)


def settings(**changes):
    base = StepSettings("k-logit", unlabeled_weight=1.0, real_rows="all", feature_matching=False,
                        freeze_bn_on_fakes=True, g_clip_norm=0.0, loss_backend="torch")
    return StepSettings(**{**base.__dict__, **changes})


def tiny_networks(ema_decay=0.0, lr=1e-3, spec=SPEC):
    torch.manual_seed(0)
    d, g = build_discriminator(spec), build_generator(spec)
    adam = lambda network: torch.optim.Adam(network.parameters(), lr=lr)  # noqa: E731
    return Networks(d, d, adam(d), g, g, adam(g), EMA(d, ema_decay) if ema_decay else None)


def a_batch(n=6):
    generator = torch.Generator().manual_seed(1)
    images = lambda: torch.rand(n, *SPEC.image_shape, generator=generator) * 2 - 1  # noqa: E731
    return StepBatch(images(), torch.arange(n) % SPEC.num_classes, unlabeled=images(), matching=images())


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(before, after):
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_g_step_moves_g_towards_fooling_d_and_leaves_d_alone(accelerator):
    nets, batch, step_settings = tiny_networks(lr=1e-4), a_batch(), settings()
    z = nets.plain_g.sample_latent(6, "cpu")

    def d_of_fakes():  # D(G(z)), the probability D gives fakes of being real, on fixed noise and dropout
        torch.manual_seed(5)
        with torch.no_grad(), bn_stats_frozen(nets.plain_d):
            return real_probability(nets.plain_d(nets.plain_g(z)), "k-logit").mean().item()

    before = d_of_fakes()
    d_before, g_before = state(nets.plain_d), state(nets.plain_g)
    torch.manual_seed(3)  # the step's own noise: another z than d_of_fakes's
    loss = g_step(accelerator, nets, batch, step_settings)
    assert loss.shape == () and not loss.requires_grad  # a detached device tensor: no host read
    assert_same(d_before, state(nets.plain_d))  # D's parameters and BatchNorm running statistics
    assert all(p.grad is None for p in nets.plain_d.parameters())  # no D gradient was even computed
    assert any(not torch.equal(g_before[k], v) for k, v in state(nets.plain_g).items())
    # one small Adam step along -sign(gradient) of -log D(G(z)) raises D(G(z)); a flipped loss would lower it
    assert d_of_fakes() > before


def test_d_step_updates_d_not_g_and_fakes_leave_the_running_statistics_alone(accelerator):
    nets, batch = tiny_networks(), a_batch()
    expected = copy.deepcopy(nets.plain_d)  # running statistics after the two real forwards only
    expected(batch.labeled)
    expected(batch.unlabeled)
    g_before, d_before = [p.clone() for p in nets.plain_g.parameters()], state(nets.plain_d)
    losses = d_step(accelerator, nets, batch, settings())
    assert set(losses) == {"d_loss", "supervised_ce"} and all(not v.requires_grad for v in losses.values())
    assert all(torch.equal(a, b) for a, b in zip(g_before, nets.plain_g.parameters()))  # G samples, not learns
    after = nets.plain_d.state_dict()
    changed = [k for k in d_before if not torch.equal(d_before[k], after[k])]
    assert any(k.endswith("weight") for k in changed)
    for key, value in expected.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_d_step_with_fakes_in_the_running_statistics_differs(accelerator):
    """The check above can fail: with --freeze-bn-on-fakes false, the generated batch moves them."""
    nets, batch = tiny_networks(), a_batch()
    expected = copy.deepcopy(nets.plain_d)
    expected(batch.labeled)
    expected(batch.unlabeled)
    d_step(accelerator, nets, batch, settings(freeze_bn_on_fakes=False))
    key = next(k for k in expected.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(nets.plain_d.state_dict()[key], expected.state_dict()[key])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_d_logits_are_per_batch_whatever_the_forwards(batchnorm):
    """Without BatchNorm D runs one forward over all the rows; each batch must get the logits it gets alone.
    With BatchNorm each batch is normalised by its own statistics: one forward over all rows would differ."""
    nets = tiny_networks(spec=dataclasses.replace(SPEC, d_batchnorm=batchnorm))
    nets.plain_d.train()
    nets.plain_d.dropout.p = 0.0  # no randomness, so the forwards can be compared
    batch = a_batch()
    images = [batch.labeled, batch.unlabeled, batch.matching[:4]]
    logits = discriminator_logits(nets, images, settings())
    assert [len(x) for x in logits] == [6, 6, 4]
    alone = [copy.deepcopy(nets.plain_d)(x) for x in images]
    for mine, expected in zip(logits, alone):
        torch.testing.assert_close(mine, expected)
    together = copy.deepcopy(nets.plain_d)(torch.cat(images))
    assert torch.allclose(together[:6], alone[0]) != batchnorm


def test_the_entropy_term_adds_its_weight_times_the_unlabeled_class_entropy(accelerator):
    torch.manual_seed(0)
    logits = [torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)]
    targets = [torch.arange(6) % 3, torch.full((6,), -1), torch.full((6,), -2)]
    base, _ = discriminator_loss(logits, targets, settings())
    weighted, _ = discriminator_loss(logits, targets, settings(entropy_weight=0.5))
    torch.testing.assert_close(weighted - base, 0.5 * class_entropy(logits[1], "k-logit"))
    uniform = torch.zeros(4, 3)
    torch.testing.assert_close(class_entropy(uniform, "k-logit"), torch.log(torch.tensor(3.0)))
    assert class_entropy(torch.tensor([[20.0, 0.0, 0.0]]), "k-logit") < 1e-6


def test_a_d_step_with_the_entropy_term_makes_unlabeled_predictions_more_confident(accelerator):
    entropies = {}
    for weight in (0.0, 10.0):
        nets, batch = tiny_networks(lr=1e-2), a_batch()
        nets.plain_d.dropout.p = 0.0
        for _ in range(5):
            d_step(accelerator, nets, batch, settings(entropy_weight=weight))
        with torch.no_grad():  # in training mode, as the step saw them (BatchNorm's running statistics are young)
            entropies[weight] = class_entropy(nets.plain_d(batch.unlabeled), "k-logit").item()
    assert entropies[10.0] < entropies[0.0] - 0.01, entropies  # a flipped sign would raise it


def test_supervised_d_step_uses_the_labeled_batch_only(accelerator):
    nets, batch = tiny_networks(), a_batch()
    supervised = StepBatch(batch.labeled, batch.labels)
    nets.generator = nets.plain_g = nets.opt_g = None
    losses = d_step(accelerator, nets, supervised, settings())
    torch.testing.assert_close(losses["d_loss"], losses["supervised_ce"])


def test_the_classifier_is_the_moving_average_and_differs_from_d(accelerator):
    nets, batch = tiny_networks(ema_decay=0.9, lr=1e-2), a_batch()
    assert nets.classifier is nets.ema.module
    d_step(accelerator, nets, batch, settings())
    first = state(nets.plain_d)
    assert_same(first, state(nets.ema.module))  # the first update copies D
    d_step(accelerator, nets, batch, settings())
    ema, raw = nets.ema.module.state_dict(), nets.plain_d.state_dict()
    for key, value in ema.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * first[key] + 0.1 * raw[key])
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    plain = tiny_networks()  # without a moving average, D itself
    assert plain.classifier is plain.plain_d


def test_feature_matching_pulls_the_fake_features_towards_the_real_ones(accelerator):
    spec = NetworkSpec("salimans", (1, 28, 28), 3, "k-logit")
    torch.manual_seed(0)
    d, g = build_discriminator(spec), build_generator(spec)
    nets = Networks(d, d, torch.optim.Adam(d.parameters()), g, g, torch.optim.Adam(g.parameters(), lr=1e-4))
    batch = StepBatch(*(torch.rand(8, 1, 28, 28) * 2 - 1, torch.zeros(8, dtype=torch.long)),
                      unlabeled=torch.rand(8, 1, 28, 28) * 2 - 1, matching=torch.rand(8, 1, 28, 28) * 2 - 1)
    fm = settings(feature_matching=True)
    torch.manual_seed(1)
    z = g.sample_latent(8, "cpu")  # the noise the step draws too

    def gap():  # squared distance of the mean features, computed here, not by the code under test
        d.eval()  # no noise: the same features before and after
        with torch.no_grad():
            value = (d.features(batch.matching).mean(0) - d.features(g(z)).mean(0)).square().mean().item()
        d.train()
        return value

    before = gap()
    torch.manual_seed(1)
    g_step(accelerator, nets, batch, fm)
    assert gap() < before


@pytest.mark.parametrize("recipe", ["odena", "salimans"])
def test_a_step_reads_nothing_back_from_the_device(tmp_path, mnist_root, monkeypatch, recipe):
    """Losses stay on the device between --log-every reads: host reads do not grow with the step count."""
    from sgan.config import parse_config
    from sgan.train import train

    import sys

    reads = {"n": 0}
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            # Adam keeps its step counts on the CPU, also for CUDA parameters: reading them waits for no device
            if "/torch/optim/" not in sys._getframe(1).f_code.co_filename:
                reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_in_a_run(steps):
        reads["n"] = 0
        train(parse_config(["--recipe", recipe, "--max-steps", str(steps), "--batch-size", "20", "--log-every",
                            "1000", "--checkpoint-every", "0", "--tracker", "none", "--cpu", "--data-root",
                            str(mnist_root), "--output-dir", str(tmp_path / str(steps))]))
        return reads["n"]

    few, many = reads_in_a_run(3), reads_in_a_run(13)
    assert few > 0  # the counter works: the final evaluation and the loss read count
    assert many == few, f"{(many - few) / 10:.1f} host reads per step"


def test_feature_matching_compares_the_chosen_layer(accelerator):
    from sgan.steps import generator_loss

    spec = NetworkSpec("salimans", (1, 28, 28), 3, "k-logit")
    torch.manual_seed(0)
    d, g = build_discriminator(spec).eval(), build_generator(spec)
    matching, z = torch.rand(8, 1, 28, 28) * 2 - 1, g.sample_latent(8, "cpu")
    for layer in (-1, -3):
        expected = (d.features(matching, layer).mean(0) - d.features(g(z), layer).mean(0)).square().mean()
        got = generator_loss(d, g, z, matching, settings(feature_matching=True, feature_layer=layer))
        torch.testing.assert_close(got, expected)
    assert not torch.equal(generator_loss(d, g, z, matching, settings(feature_matching=True, feature_layer=-3)),
                           generator_loss(d, g, z, matching, settings(feature_matching=True)))
