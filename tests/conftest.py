import os
from pathlib import Path

import pytest

from sgan.data import DATASETS, is_prepared, prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root the project uses (make setup prepares MNIST there; Fashion-MNIST on first use)."""
    return Path(os.environ.get("SGAN_DATA_ROOT", REPO / "data"))


@pytest.fixture(scope="session")
def mnist_root(data_root) -> Path:
    prepare("mnist", data_root, quiet=True)
    return data_root


@pytest.fixture(scope="session")
def fashion_root(data_root) -> Path:
    from sgan.data import FASHION_DEBIAN_DIR

    if not is_prepared(data_root, DATASETS["fashion-mnist"]) and not FASHION_DEBIAN_DIR.is_dir():
        pytest.skip("Fashion-MNIST source missing: apt-get install dataset-fashion-mnist (.ci/run installs it)")
    prepare("fashion-mnist", data_root, quiet=True)
    return data_root
