"""The README's claims as long real-data runs (marked slow: `make test-all` or `pytest -m slow`)."""
import pytest

from sgan.config import parse_config
from sgan.train import train

pytestmark = pytest.mark.slow


def accuracy(tmp_path, root, name, *flags):
    config = parse_config(["--tracker", "none", "--cpu", "--output-dir", str(tmp_path / name), "--data-root",
                           str(root), "--seed", "11", *flags])
    return train(config)["test_accuracy"]


def test_half_the_labels_reach_98_percent_in_3_epochs(tmp_path, mnist_root):
    assert accuracy(tmp_path, mnist_root, "half", "--num-labels", "30000", "--epochs", "3") >= 0.98


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_sgan_beats_supervised_with_100_labels(tmp_path, data_root, dataset, request):
    root = request.getfixturevalue("mnist_root" if dataset == "mnist" else "fashion_root")
    sgan = accuracy(tmp_path, root, "sgan", "--dataset", dataset, "--epochs", "1")
    supervised = accuracy(tmp_path, root, "supervised", "--dataset", dataset, "--epochs", "1", "--recipe", "supervised")
    assert sgan > supervised + 0.02, (sgan, supervised)
