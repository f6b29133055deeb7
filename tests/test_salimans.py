"""The salimans recipe: its models, recipe defaults, feature matching, EMA and exact resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sgan.config import parse_config
from sgan.models import SalimansDiscriminator, SalimansGenerator, WNLinear
from sgan.train import train


def test_recipe_defaults_sit_below_config_files_and_flags(tmp_path):
    config = parse_config(["--recipe", "salimans"])
    assert (config.lr, config.beta1, config.adam_eps, config.formulation, config.real_rows, config.ema_decay,
            config.lr_decay, config.g_clip_norm, config.epochs, config.mixed_precision) == (
        0.003, 0.5, 1e-4, "k-logit", "unlabeled", 0.999, "none", 10.0, 100, "auto")
    assert parse_config(["--recipe", "salimans", "--lr", "0.001"]).lr == 0.001
    file = tmp_path / "s.yaml"
    file.write_text("recipe: salimans\nema_decay: 0.99\n")
    from_file = parse_config(["--config", str(file)])
    assert from_file.recipe == "salimans" and from_file.ema_decay == 0.99 and from_file.lr == 0.003
    assert parse_config([]).lr == 2e-4 and parse_config([]).epochs == 1  # the odena recipe keeps its own defaults
    assert parse_config(["--recipe", "salimans", "--epochs", "3"]).epochs == 3


def test_weight_norm_data_dependent_init_standardises_outputs():
    torch.manual_seed(0)
    layer = WNLinear(20, 7)
    x = torch.randn(256, 20) * 3 + 1
    layer.init_from(x)
    y = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(7), atol=1e-4, rtol=0)
    fixed = WNLinear(20, 7, train_scale=False)
    assert "g" not in dict(fixed.named_parameters()) and "g" in fixed.state_dict()


def test_salimans_models_shapes_and_noise():
    d, g = SalimansDiscriminator(10), SalimansGenerator()
    z = g.sample_latent(8, "cpu")
    assert z.min() >= 0 and z.max() <= 1  # uniform noise
    images = g(z)
    assert images.shape == (8, 1, 28, 28) and images.min() >= -1  # softplus pixels: [0, inf) -> [-1, inf)
    paper = SalimansGenerator(output="sigmoid")(z)
    assert paper.min() >= -1 and paper.max() <= 1
    with pytest.raises(ValueError, match="generator output"):
        SalimansGenerator(output="tanh")
    assert d(images).shape == (8, 10) and d.features(images).shape == (8, 250)
    d.eval()
    assert torch.equal(d(images), d(images))  # noise only in training mode
    d.train()
    assert not torch.equal(d(images), d(images))


def test_salimans_recipe_learns_and_saves_the_evaluated_ema(tmp_path, mnist_root):
    out = tmp_path / "salimans"
    metrics = train(parse_config(["--recipe", "salimans", "--max-steps", "150", "--tracker", "none", "--cpu",
                                  "--output-dir", str(out), "--data-root", str(mnist_root)]))
    assert metrics["test_accuracy"] > 0.3, metrics  # chance is 0.1
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(out), "--data-root", str(mnist_root), "--cpu"]) == 0
    evaluated = json.loads((out / "evaluation.json").read_text())
    assert round(evaluated["test_accuracy"] * 10000) == round(metrics["test_accuracy"] * 10000)
    assert (out / "checkpoints" / "step_00000150" / "ema.safetensors").is_file()


def test_salimans_resume_is_bit_identical_including_the_ema(tmp_path, mnist_root):
    def run(out, steps, *extra):
        return train(parse_config(["--recipe", "salimans", "--max-steps", str(steps), "--batch-size", "20",
                                   "--tracker", "none", "--cpu", "--output-dir", str(out), "--data-root",
                                   str(mnist_root), *extra]))

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, "--resume", "latest")
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    for name in ("discriminator", "generator"):
        a = load_file(str(tmp_path / "a" / "model" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "model" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_supervised_baseline_with_the_salimans_networks(tmp_path, mnist_root):
    out = tmp_path / "baseline"
    metrics = train(parse_config(["--recipe", "supervised", "--networks", "salimans", "--max-steps", "60",
                                  "--lr", "0.003", "--ema-decay", "0.9", "--tracker", "none", "--cpu",
                                  "--output-dir", str(out), "--data-root", str(mnist_root)]))
    assert metrics["test_accuracy"] > 0.3, metrics
    weights = load_file(str(out / "model" / "discriminator.safetensors"))
    assert weights["hidden.0.v"].shape == (1000, 784)  # the MLP D, not the conv one
    assert not (out / "model" / "generator.safetensors").exists()


def test_g_clip_norm_bounds_the_generator_step(tmp_path, mnist_root):
    def g_weights(name, steps, clip):
        out = tmp_path / f"{name}_{steps}"
        train(parse_config(["--recipe", "salimans", "--max-steps", str(steps), "--batch-size", "20",
                            "--g-clip-norm", clip, "--tracker", "none", "--cpu", "--output-dir", str(out),
                            "--data-root", str(mnist_root)]))
        weights = load_file(str(out / "model" / "generator.safetensors"))
        return {k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k}

    def largest_change(name, clip):  # of a G parameter in the second step
        one, two = g_weights(name, 1, clip), g_weights(name, 2, clip)
        return max((two[k] - one[k]).abs().max().item() for k in one)

    # Adam's step is about lr whatever the gradient's scale; a gradient clipped to 1e-12 is swamped by eps
    assert largest_change("free", "0") > 1e-3
    assert largest_change("clipped", "1e-12") < 1e-5


def test_adam_eps_reaches_both_optimisers(tmp_path, mnist_root):
    out = tmp_path / "eps"
    train(parse_config(["--recipe", "salimans", "--max-steps", "1", "--batch-size", "20", "--adam-eps", "1e-4",
                        "--tracker", "none", "--cpu", "--output-dir", str(out), "--data-root", str(mnist_root)]))
    checkpoint = next((out / "checkpoints").glob("step_*"))
    for name in ("optimizer.bin", "optimizer_1.bin"):  # D's, then G's
        state = torch.load(checkpoint / name, weights_only=True)
        assert [group["eps"] for group in state["param_groups"]] == [1e-4]


def test_the_saved_and_evaluated_classifier_is_the_moving_average(tmp_path, mnist_root):
    """metrics.json's accuracy and model/discriminator.safetensors are D's EMA, which differs from the raw D."""
    from safetensors.torch import load_file

    from sgan.data import load_split
    from sgan.models import SalimansDiscriminator

    out = tmp_path / "ema"
    metrics = train(parse_config(["--recipe", "salimans", "--max-steps", "30", "--tracker", "none", "--cpu",
                                  "--output-dir", str(out), "--data-root", str(mnist_root), "--batch-size", "50"]))
    saved = load_file(str(out / "model" / "discriminator.safetensors"))
    checkpoint = out / "checkpoints" / "step_00000030"
    ema, raw = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
    model = SalimansDiscriminator(10, "k-logit").eval()
    model.load_state_dict(saved)
    images, labels = load_split("mnist", train=False, root=mnist_root)
    with torch.no_grad():
        correct = int((model(images).argmax(1) == labels).sum())
    assert correct == round(metrics["test_accuracy"] * 10000)  # the very images the run scored right


def test_feature_layer_picks_a_hidden_layer_counted_back_from_the_last():
    torch.manual_seed(0)
    d = SalimansDiscriminator(10).eval()  # no noise: features are a function of the images
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    h, outputs = (images.flatten(1) + 1) / 2, []
    for layer in d.hidden:  # each hidden layer's output after its ReLU, computed here
        h = torch.relu(layer(h))
        outputs.append(h)
    for back in range(1, 6):
        torch.testing.assert_close(d.features(images, -back), outputs[-back])
    torch.testing.assert_close(d.features(images), outputs[-1])
    with pytest.raises(ValueError, match=r"--feature-layer -6: this D has 5 hidden layers.*-1 .* to -5"):
        d.features(images, -6)


def test_conv_feature_layer_pools_the_chosen_conv_layer():
    from sgan.models import SalimansConvDiscriminator, WNConv2d

    torch.manual_seed(0)
    d = SalimansConvDiscriminator(10, widths=(8, 16)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    h, pooled = images, []
    for layer in d.layers:
        h = torch.nn.functional.leaky_relu(layer(h), 0.2) if isinstance(layer, WNConv2d) else layer(h)
        if isinstance(layer, WNConv2d):
            pooled.append(h.mean(dim=(2, 3)))
    assert d.hidden_layer_count == len(pooled) == 9
    torch.testing.assert_close(d.features(images), pooled[-1])
    torch.testing.assert_close(d.features(images, -4), pooled[-4])
    assert d.features(images, -9).shape == (2, 8)  # the first stage is a wide


def test_a_feature_layer_the_network_lacks_stops_before_the_output_dir(tmp_path, mnist_root):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="this D has 5 hidden layers"):
        train(parse_config(["--recipe", "salimans", "--feature-layer", "-6", "--max-steps", "1", "--tracker", "none",
                            "--cpu", "--output-dir", str(out), "--data-root", str(mnist_root)]))
    assert not out.exists()


def test_g_steps_updates_g_that_many_times_per_d_step(tmp_path, mnist_root, monkeypatch):
    import sgan.train

    calls = {"d": 0, "g": 0}
    for name in ("d", "g"):
        original = getattr(sgan.train, f"{name}_step")

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(sgan.train, f"{name}_step", counted)
    train(parse_config(["--recipe", "salimans", "--g-steps", "3", "--max-steps", "4", "--tracker", "none", "--cpu",
                        "--output-dir", str(tmp_path / "run"), "--data-root", str(mnist_root)]))
    assert calls == {"d": 4, "g": 12}


def test_the_salimans_recipe_matches_features_of_the_odena_d_too(tmp_path, mnist_root):
    metrics = train(parse_config(["--recipe", "salimans", "--networks", "odena", "--feature-layer", "-2", "--max-steps",
                                  "2", "--tracker", "none", "--cpu", "--output-dir", str(tmp_path / "run"),
                                  "--data-root", str(mnist_root)]))
    assert metrics["steps"] == 2 and metrics["networks"] == "odena"
    assert "feature_layer: -2" in (tmp_path / "run" / "config.yaml").read_text()
