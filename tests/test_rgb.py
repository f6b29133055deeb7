"""32x32 RGB data (CIFAR-10, SVHN): Salimans et al.'s conv models, the loaders on synthetic files in the real
on-disk formats (pickled python batches, MATLAB .mat), untrusted-file handling, and short training runs."""
import dataclasses
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from sgan import data
from sgan.config import parse_config
from sgan.data import DATASETS, DataError, load_split, prepare, read_split
from sgan.losses import FORMULATIONS, num_logits
from sgan.models import (Discriminator, Generator, SalimansConvDiscriminator, SalimansConvGenerator,
                         SalimansDiscriminator, SalimansGenerator, WNConv2d, WNConvTranspose2d, build_discriminator,
                         build_generator)

N_TRAIN, N_TEST = 50, 20  # per split in the synthetic datasets: 5 / 2 images per class


@pytest.fixture
def small_sizes(monkeypatch):
    """Make cifar10 and svhn expect the synthetic datasets' sizes (the loaders check the official counts)."""
    for name in ("cifar10", "svhn"):
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], train_size=N_TRAIN, test_size=N_TEST))


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 3, 32, 32] images whose colour depends on the class, and labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    base = np.stack([labels * 25, 255 - labels * 25, (labels * 80) % 256], axis=1)[:, :, None, None]
    images = np.clip(base + rng.integers(-20, 21, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
    return images, labels


def write_cifar(root, protocol: int = 2, bytes_keys: bool = True):
    """A tiny cifar-10-batches-py: data_batch_1..5 and test_batch, dicts of data [n, 3072] uint8 and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    train_x, train_y = synthetic_images(N_TRAIN, 0)
    test_x, test_y = synthetic_images(N_TEST, 1)
    per = N_TRAIN // 5
    parts = {f"data_batch_{i + 1}": (train_x[i * per:(i + 1) * per], train_y[i * per:(i + 1) * per]) for i in range(5)}
    parts["test_batch"] = (test_x, test_y)
    for name, (x, y) in parts.items():
        batch = {key("batch_label"): key(name), key("labels"): [int(v) for v in y],
                 key("data"): x.reshape(len(x), -1), key("filenames"): [key(f"{i}.png") for i in range(len(x))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return (train_x, train_y), (test_x, test_y)


def write_svhn(root):
    """A tiny train_32x32.mat / test_32x32.mat: X uint8 [32, 32, 3, n], y uint8 [n, 1] in 1..10 (10 = digit 0)."""
    savemat = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy: pip install scipy").savemat
    arrays = {}
    for split, n, seed in (("train", N_TRAIN, 2), ("test", N_TEST, 3)):
        images, labels = synthetic_images(n, seed)
        mat_labels = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        savemat(str(root / f"{split}_32x32.mat"), {"X": images.transpose(2, 3, 1, 0), "y": mat_labels})
        arrays[split] = (images, labels)
    return arrays


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_conv_models_shapes(formulation):
    torch.manual_seed(0)
    d, g = SalimansConvDiscriminator(10, formulation), SalimansConvGenerator()
    z = g.sample_latent(6, "cpu")
    assert z.shape == (6, 100) and z.min() >= 0 and z.max() <= 1  # uniform noise
    images = g(z)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert d(images).shape == (6, num_logits(formulation, 10))
    assert d.features(images).shape == (6, 192)
    d.eval()
    assert torch.equal(d(images), d(images))  # dropout only in training mode
    d.train()
    assert not torch.equal(d(images), d(images))


@pytest.mark.parametrize("layer, x", [
    (WNConv2d(3, 8, 3, stride=2, padding=1), torch.randn(32, 3, 9, 9) * 3 + 1),
    (WNConvTranspose2d(6, 4, 5, stride=2, padding=2, output_padding=1, init_scale=0.1), torch.randn(32, 6, 4, 4)),
])
def test_weight_normalised_convs(layer, x):
    torch.manual_seed(0)
    out = layer.init_from(x)
    y = layer(x)
    torch.testing.assert_close(out, y, atol=1e-5, rtol=0)  # init_from returns the new outputs
    per_channel = y.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(len(per_channel)), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.full((len(per_channel),), layer.init_scale), atol=1e-4, rtol=0)
    # the same as torch's conv with weight g * v / ||v|| per output channel
    is_transpose = isinstance(layer, WNConvTranspose2d)
    reference = (torch.nn.ConvTranspose2d(6, 4, 5, 2, 2, output_padding=1) if is_transpose
                 else torch.nn.Conv2d(3, 8, 3, 2, 1))
    kernel = layer.v.view(layer.out_channels, layer.in_channels, layer.kernel_size, layer.kernel_size)
    kernel = kernel * (layer.g / kernel.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    with torch.no_grad():
        reference.weight.copy_(kernel.transpose(0, 1) if is_transpose else kernel)
        reference.bias.copy_(layer.b)
    torch.testing.assert_close(reference(x), y, atol=1e-5, rtol=1e-5)


def spec_of(*flags):
    config = parse_config(list(flags))
    info = DATASETS[config.dataset]
    return config.network_spec(info.image_shape, info.num_classes)


def test_recipes_pick_models_by_the_datasets_image_shape():
    for dataset, d_type, g_type in (("mnist", SalimansDiscriminator, SalimansGenerator),
                                    ("cifar10", SalimansConvDiscriminator, SalimansConvGenerator),
                                    ("svhn", SalimansConvDiscriminator, SalimansConvGenerator)):
        spec = spec_of("--recipe", "salimans", "--dataset", dataset)
        assert type(build_discriminator(spec)) is d_type and type(build_generator(spec)) is g_type
    svhn = spec_of("--recipe", "salimans", "--dataset", "svhn")  # the paper's narrower SVHN D
    assert build_discriminator(svhn).features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    for recipe in ("odena", "supervised"):  # the odena conv pair, sized for 32x32 RGB
        spec = spec_of("--recipe", recipe, "--dataset", "cifar10")
        d, g = build_discriminator(spec), build_generator(spec)
        assert isinstance(d, Discriminator) and isinstance(g, Generator)
        images = g(g.sample_latent(4, "cpu"))
        assert images.shape == (4, 3, 32, 32) and d(images).shape == (4, 10)
    mnist = spec_of("--dataset", "mnist")  # MNIST's odena models are unchanged
    assert build_discriminator(mnist).state_dict().keys() == Discriminator(10, "k-logit").state_dict().keys()
    assert build_generator(mnist)(torch.zeros(2, 100)).shape == (2, 1, 28, 28)


# -------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("protocol, bytes_keys", [(2, True), (2, False), (5, True)])
def test_cifar_batches_load(tmp_path, small_sizes, protocol, bytes_keys):
    (train_x, train_y), (test_x, test_y) = write_cifar(tmp_path, protocol, bytes_keys)
    assert data.is_prepared(tmp_path, DATASETS["cifar10"])
    for train, (x, y) in ((True, (train_x, train_y)), (False, (test_x, test_y))):
        images, labels = load_split("cifar10", train=train, root=tmp_path)
        assert images.dtype == torch.float32 and images.shape == (len(x), 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()  # data_batch_1..5 in order
        assert images.min() >= -1 and images.max() <= 1
        torch.testing.assert_close(images, torch.from_numpy(x).float() / 127.5 - 1)
    assert data.main(["prepare", "--dataset", "cifar10", "--root", str(tmp_path)]) == 0  # validates the files


def test_cifar_counts_are_checked(tmp_path):
    write_cifar(tmp_path)  # 50 training images, not CIFAR-10's 50000
    with pytest.raises(DataError, match=r"hold 50 images, cifar10's train split has 50000.*prepare --dataset cifar10"):
        load_split("cifar10", train=True, root=tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update({b"labels": [10] * 10}), r"data_batch_2: 'labels': labels 10..10 fall outside 0..9"),
    (lambda b: b.update({b"labels": [1] * 9}), r"'labels': the labels are .*expected 10 integers"),
    (lambda b: b.update({b"data": np.zeros((10, 3072), np.float32)}), r"'data' is a float32 array.*expected uint8"),
    (lambda b: b.update({b"data": np.zeros((10, 1024), np.uint8)}), r"shape \[10, 1024\], expected uint8 \[N, 3072\]"),
    (lambda b: b.pop(b"data"), "'data' is missing"),
])
def test_bad_cifar_batches_are_named(tmp_path, small_sizes, change, message):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    change(batch)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message):
        load_split("cifar10", train=True, root=tmp_path)


def test_truncated_or_foreign_cifar_files_are_named(tmp_path, small_sizes):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="test_batch: cannot read it as a CIFAR-10 batch"):
        load_split("cifar10", train=False, root=tmp_path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="test_batch: holds a list, not a CIFAR-10 batch"):
        load_split("cifar10", train=False, root=tmp_path)


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch boom-marker",))


def test_cifar_pickle_with_code_is_refused_without_running_it(tmp_path, small_sizes, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Boom(), b"labels": [0] * 10}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1: .*refuses to load '(posix|os).system'"):
        load_split("cifar10", train=True, root=tmp_path)
    assert not (tmp_path / "boom-marker").exists()
    path.write_bytes(pickle.dumps({b"data": np.array([{"a": 1}], dtype=object), b"labels": [0]}, protocol=5))
    with pytest.raises(DataError, match="not allowed"):  # object arrays would unpickle arbitrary objects
        load_split("cifar10", train=True, root=tmp_path)


def test_missing_cifar_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match="cifar10 has no offline source.*cifar-10-batches-py.*data_batch_1"):
        prepare("cifar10", tmp_path, source="offline", quiet=True)
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 missing for cifar10's train split"):
        read_split(tmp_path, DATASETS["cifar10"], "train")


def test_svhn_mat_files_load(tmp_path, small_sizes):
    arrays = write_svhn(tmp_path)
    for train, split in ((True, "train"), (False, "test")):
        images, labels = load_split("svhn", train=train, root=tmp_path)
        x, y = arrays[split]
        assert images.dtype == torch.float32 and images.shape == (len(x), 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()  # 10 -> 0
        assert 0 in labels.tolist()
        torch.testing.assert_close(images, torch.from_numpy(x).float() / 127.5 - 1)  # [H, W, C, N] -> [N, C, H, W]


def test_bad_svhn_files_are_named(tmp_path, small_sizes):
    savemat = pytest.importorskip("scipy.io").savemat
    write_svhn(tmp_path)
    images = np.zeros((32, 32, 3, N_TEST), np.uint8)
    savemat(str(tmp_path / "test_32x32.mat"), {"X": images, "y": np.full((N_TEST, 1), 11, np.uint8)})
    with pytest.raises(DataError, match=r"test_32x32.mat: 'y': labels 11..11 fall outside 1..10"):
        load_split("svhn", train=False, root=tmp_path)
    savemat(str(tmp_path / "test_32x32.mat"), {"X": images[:, :, :1], "y": np.ones((N_TEST, 1), np.uint8)})
    with pytest.raises(DataError, match=r"'X' is a uint8 array of shape \[32, 32, 1, 20\], expected uint8 "
                                        r"\[32, 32, 3, N\]"):
        load_split("svhn", train=False, root=tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(DataError, match="test_32x32.mat: cannot read it as a MATLAB 5 .mat file"):
        load_split("svhn", train=False, root=tmp_path)


def test_svhn_without_scipy_says_how_to_install_it(tmp_path, small_sizes, monkeypatch):
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now fails, as without scipy
    with pytest.raises(DataError, match="needs scipy, which is not installed: `pip install scipy`"):
        load_split("svhn", train=True, root=tmp_path)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("recipe", ["salimans", "odena"])
def test_short_training_run_on_32x32_rgb(tmp_path, small_sizes, recipe):
    root = tmp_path / "data"
    write_cifar(root)
    out = tmp_path / "run"
    from sgan.train import main

    assert main(["--dataset", "cifar10", "--recipe", recipe, "--num-labels", "20", "--batch-size", "10",
                 "--max-steps", "3", "--tracker", "none", "--cpu", "--output-dir", str(out),
                 "--data-root", str(root)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "cifar10" and metrics["recipe"] == recipe and metrics["steps"] == 3
    assert 0 <= metrics["test_accuracy"] <= 1
    from PIL import Image

    with Image.open(out / "samples.png") as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 10 * 32
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(out), "--cpu"]) == 0  # rebuilds the same models from config.yaml
    evaluated = json.loads((out / "evaluation.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert evaluated["class_names"][:2] == ["airplane", "automobile"]
