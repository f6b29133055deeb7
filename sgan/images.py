"""Your own images: a folder of image files, an .npz file, or in-memory arrays, as uint8 splits.

Folder layout (``open_folder(PATH, image_size)``, ``--dataset folder:PATH``):
  PATH/labeled/<class>/...   required; the class names are the folder names sorted by code point (Python's
                             sorted), spaces and unicode allowed; each class needs at least one image
  PATH/unlabeled/**          optional, any nesting, no labels
  PATH/val/<class>/...       optional, the same class folders as labeled/
  PATH/test/<class>/...      optional, the same class folders as labeled/
Class folders may nest too. Symlinks are followed; a link that leads back to a folder already scanned (a loop)
is an error. Hidden files and folders (".DS_Store", ".git"), files that are not PNG, JPEG, BMP, WebP or GIF (by
extension), and other entries of PATH are ignored and listed in ``ImageSource.skipped``.

Decoding (PNG, JPEG, BMP, WebP, GIF's first frame):
  - EXIF orientation is applied; a JPEG much larger than N is decoded at 1/2, 1/4 or 1/8 scale (never below N).
  - 16-bit grey (I;16, I) keeps its high byte (value >> 8); transparency (RGBA, LA, palette or grey with a
    transparent colour) is composited over black: colour x alpha / 255.
  - Fitting to N x N: the largest centred square is cut out (the longer side loses (long - short) // 2 pixels
    at the start and the rest at the end), then scaled to N x N (bilinear, antialiased when shrinking).
    A square image of N x N keeps its exact pixels.
  - channels: 1 (grey, ITU-R 601 luma of RGB, as PIL's convert("L")) or 3 (grey copied to R, G and B).
    Default None: 3 if any image has colour, else 1. An image has colour when some pixel of the fitted RGB image
    has R, G and B not all equal, so a grey picture saved as RGB counts as grey.
  - Images that cannot be decoded (corrupt, truncated, zero bytes, a broken link, not a regular file: a FIFO is
    never opened, it would wait for a writer; or more pixels than PIL.Image.MAX_IMAGE_PIXELS, which is refused
    from the header, before decoding) are an error naming them;
    ``skip_bad_images=True`` leaves them out and lists them in ``skipped``.

Cache: a folder is decoded once, in parallel, into one uint8 file per folder and settings, in ``cache_dir``
(default $SGAN_CACHE_DIR, else ~/.cache/sgan; never inside the data folder), named after the folder's real path,
the image size and the channels. Its header holds the key: every image file's split, relative path, size and
mtime, the settings and FORMAT_VERSION. An open whose key matches reuses the file without decoding; any changed,
added or removed file rebuilds it (in place: one file per folder and settings). The file is written under a
temporary name and renamed when complete, so a crash never leaves a cache that is read; a file whose trailer or
size does not check out is rebuilt. The images are memory-mapped from it (read-only), so a split never needs
more memory than its uint8 size, and only the pages read.

npz and arrays (``open_npz``, ``from_arrays``): x_labeled, y_labeled, x_unlabeled (required in an npz; may hold
0 images), optional x_val, y_val, x_test, y_test and class_names. Images are uint8, [N, H, W] (grey) or rank 4:
NCHW when dim 1 is 1 or 3, else NHWC (dim 3 must then be 1 or 3); images are at least 4 pixels high and wide,
so the two layouts cannot be confused. Labels are integers in [0, K), K = len(class_names) or max label + 1.
image_size None keeps the stored size (square images only); channels None keeps the stored channels (3 if any
array has 3). An npz is read into memory (its members cannot be memory-mapped) with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import signal
import stat
import struct
import time
import warnings
import zipfile
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

FORMAT_VERSION = 1  # bump when the decoded pixels or the cache layout change: old caches are then rebuilt
SPLITS = ("labeled", "unlabeled", "val", "test")
CLASS_SPLITS = ("labeled", "val", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF")  # Image.open tries no other decoder
RESAMPLE = Image.Resampling.BILINEAR
MAGIC = b"SGANIMG\x01"
TRAILER = struct.Struct("<8sQ")  # at the end of a cache file: magic, length of the JSON header before it
ARRAY_NAMES = ("x_labeled", "y_labeled", "x_unlabeled", "x_val", "y_val", "x_test", "y_test", "class_names")


class ImageError(ValueError):
    """Bad input: the message names the file or folder and the fix."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]; a read-only np.memmap for folder sources
    labels: np.ndarray | None  # int64 [N] indices into class_names; None for unlabeled images
    paths: list[str] | None  # the image files, for folder sources

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ImageSource:
    name: str  # "folder:PATH", "npz:FILE" or "arrays"
    class_names: tuple[str, ...]
    labeled: Split
    unlabeled: Split | None = None  # None: no separate unlabeled images
    val: Split | None = None
    test: Split | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): ignored files, skipped bad images
    sizes_seen: dict[str, int] = field(default_factory=dict)  # original "WxH" -> images
    modes_seen: dict[str, int] = field(default_factory=dict)  # original PIL mode (or array layout) -> images
    cache_file: str | None = None
    cache_hit: bool | None = None  # True: the cache was reused, no image decoded

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.labeled.images.shape[1:])

    def splits(self) -> dict[str, Split]:
        """The splits present, in the order labeled, unlabeled, val, test."""
        return {name: getattr(self, name) for name in SPLITS if getattr(self, name) is not None}


# ---------------------------------------------------------------- decoding one image (files and arrays alike)

def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """img as "L" or "RGB": 16-bit grey keeps its high byte, transparency is composited over black."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        img = Image.fromarray(((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


def _fit(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """img as uint8 [channels, image_size, image_size]: the centred square, scaled (the module's rule)."""
    img = _to_mode(img, "L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != image_size:
        img = img.resize((image_size, image_size), RESAMPLE)
    pixels = np.asarray(img)
    return pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _has_colour(pixels: np.ndarray) -> bool:
    return pixels.shape[0] == 3 and bool(np.any(pixels[0] != pixels[1]) or np.any(pixels[1] != pixels[2]))


class _Decoded(NamedTuple):
    pixels: np.ndarray | None  # uint8 [C, N, N]; None when only probed, or on error
    colour: bool
    size: str  # the file's "WxH"
    mode: str  # the file's PIL mode
    error: str | None


def _decode_file(task: tuple[str, int | None, int]) -> _Decoded:
    """(path, image_size, channels) -> the fitted pixels; image_size None only reads the header. Never raises."""
    path, image_size, channels = task
    try:
        problem = _not_a_file(os.stat(path))
        if problem:
            return _Decoded(None, False, "", "", problem)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
            with Image.open(path, formats=PIL_FORMATS) as img:  # checks the pixel count from the header
                size, mode = f"{img.width}x{img.height}", img.mode
                if image_size is None:
                    return _Decoded(None, False, size, mode, None)
                img.draft(None, (image_size, image_size))  # JPEG: decode at a reduced scale, still >= N
                ImageOps.exif_transpose(img, in_place=True)
                pixels = _fit(img, image_size, channels)
    except Exception as error:  # a user's file can make PIL raise anything; it is reported, not fatal here
        return _Decoded(None, False, "", "", f"{type(error).__name__}: {error}")
    return _Decoded(pixels, _has_colour(pixels), size, mode, None)


def load_image(image, image_size: int, channels: int) -> np.ndarray:
    """One image file (a path) or PIL image as uint8 [channels, image_size, image_size], decoded and fitted
    exactly as a folder's images are for training (the module's rules). ImageError, naming the file, when it
    cannot be decoded.

    A path gives the very pixels training saw. A PIL image gets the same orientation and fitting, but PIL has
    decoded it already: a JPEG more than twice the size (which a path decodes at a reduced scale) may then
    differ by a few levels."""
    _check_fit(image_size, channels)
    if isinstance(image, Image.Image):
        try:
            pixels = _fit(ImageOps.exif_transpose(image), image_size, channels)  # a copy: the caller's image stays
        except Exception as error:  # PIL raises many types for images it cannot convert
            raise ImageError(f"a PIL image ({image.mode}, {image.width}x{image.height}) cannot be converted to "
                             f"{channels} channel(s): {type(error).__name__}: {error}") from None
    else:
        path = os.fspath(image)
        decoded = _decode_file((path, image_size, channels))
        if decoded.error:
            raise ImageError(f"{path}: {_unreadable(decoded.error)}")
        pixels = decoded.pixels
    return np.array(pixels)  # a writable copy: PIL's pixels are read-only


def load_images(paths, image_size: int, channels: int, workers: int | None = None):
    """Image files decoded and fitted exactly as load_image does, in a pool of `workers` processes (default:
    the cores this process may use; 1: in this process). Yields, in the order of `paths`, (pixels, None) for a
    readable file and (None, why not) for one that is not: a bad file does not stop the others."""
    _check_fit(image_size, channels)
    tasks = [(os.fspath(path), image_size, channels) for path in paths]
    for decoded in _parallel_map(_decode_file, tasks, workers, "decode images", progress=False):
        yield (None, _unreadable(decoded.error)) if decoded.error else (np.array(decoded.pixels), None)


def _unreadable(error: str) -> str:
    return f"not a readable image ({error}); PNG, JPEG, BMP, WebP and GIF are read"


SERIAL_BELOW = 16  # fewer tasks than this run in this process: starting a pool would cost more


def usable_cores() -> int:
    """The cores this process may run on: all of them unless taskset or a cpuset limits it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ignore_interrupt() -> None:
    # Ctrl-C and SIGTERM are the parent's (a forked worker would inherit sgan.train's stop handler): not one
    # traceback per worker; the parent stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _map_chunk(func, chunk: list) -> list:
    return [func(task) for task in chunk]


def _parallel_map(func, tasks: list, workers: int | None, desc: str, progress: bool):
    """func over tasks, results in order, with a tqdm bar: in a pool of `workers` processes (default: the cores
    this process may use), or in this process for workers=1 or a few tasks. A few chunks per worker run ahead of
    the consumer, no more, so results do not pile up in memory. A worker that dies (the system killed it: out
    of memory?) is an ImageError, not a hang."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    workers = min(workers or usable_cores(), len(tasks))
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, mininterval=0.5) as bar:
        if workers <= 1 or len(tasks) < SERIAL_BELOW:
            for task in tasks:
                yield func(task)
                bar.update()
            return
        size = max(1, min(64, len(tasks) // (8 * workers)))
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_ignore_interrupt)
        ahead = deque()  # the chunks submitted, oldest first
        fewer = "workers=1 in Python, --workers 1 for sgan.predict"
        died = ImageError("a process decoding images died (the system killed it: out of memory?): decode with "
                          f"fewer processes ({fewer}) or free memory")

        def submit(chunk):
            try:
                ahead.append(pool.submit(_map_chunk, func, chunk))
            except BrokenProcessPool:
                raise died from None
            except OSError as error:  # fork failed: out of memory, or a container's limit on processes
                raise ImageError(f"could not start {workers} processes to decode images ({error}): decode in "
                                 f"this process ({fewer})") from None

        def oldest():
            try:
                results = ahead.popleft().result()
            except BrokenProcessPool:
                raise died from None
            for result in results:
                yield result
                bar.update()

        try:
            for start in range(0, len(tasks), size):
                submit(tasks[start:start + size])
                if len(ahead) == 2 * workers:
                    yield from oldest()
            while ahead:
                yield from oldest()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- scanning a folder

class _File(NamedTuple):
    split: str
    rel: str  # path relative to the folder
    label: int  # class index; -1 for unlabeled
    size: int
    mtime_ns: int


@dataclass
class _Scan:
    root: str
    class_names: tuple[str, ...]
    files: list[_File]  # the image files in cache order: split, class, path
    ignored: list[tuple[str, str]]  # (rel, reason)
    bad: list[tuple[str, str]]  # (rel, reason): zero bytes or a broken link, found without decoding


def _not_an_image(name: str) -> str | None:
    """Why a file is ignored, or None for an image file."""
    if name.startswith("."):
        return "hidden file, ignored"
    ext = os.path.splitext(name)[1].lower()
    if ext not in EXTENSIONS:
        return f"not an image file ({ext or 'no extension'}), ignored"
    return None


def _not_a_file(info: os.stat_result) -> str | None:
    """Why a path with this stat cannot be an image file, or None. Checked before any open: opening a FIFO
    waits for a writer, forever."""
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else \
            "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        return f"{kind}, not a regular file"
    return "empty file (0 bytes)" if info.st_size == 0 else None


def _walk(root: str, top: str, ignored: list, bad: list) -> list[tuple[str, int, int]]:
    """The image files below root/top, any depth, symlinks followed: sorted (rel, size, mtime_ns)."""
    def unreadable(error: OSError):
        raise ImageError(f"cannot read folder {error.filename}: {error.strerror}; check that it exists and "
                         "that you may read it")

    start = os.path.join(root, top)
    seen = {_folder_id(start): top}  # (device, inode) -> rel: a folder reached twice means a link loop
    found = []
    for dirpath, dirnames, filenames in os.walk(start, onerror=unreadable, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames.sort()
        for name in list(dirnames):
            rel = os.path.join(rel_dir, name)
            if name.startswith("."):
                ignored.append((rel, "hidden folder, ignored"))
                dirnames.remove(name)
                continue
            folder = _folder_id(os.path.join(dirpath, name))
            if folder in seen:
                raise ImageError(f"symlink loop: {os.path.join(root, rel)} leads back to "
                                 f"{os.path.join(root, seen[folder])}, which is already scanned; remove the link "
                                 "or point it at a folder outside this one")
            seen[folder] = rel
        for name in filenames:
            rel = os.path.join(rel_dir, name)
            reason = _not_an_image(name)
            if reason:
                ignored.append((rel, reason))
                continue
            try:
                info = os.stat(os.path.join(root, rel))
            except OSError as error:
                bad.append((rel, f"cannot open: {error.strerror} (a broken link?)"))
                continue
            problem = _not_a_file(info)
            if problem:
                bad.append((rel, problem))
            else:
                found.append((rel, info.st_size, info.st_mtime_ns))
    return sorted(found)


def _folder_id(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _class_folders(root: str, split: str, ignored: list) -> list[str]:
    """The class folder names of root/split; image files directly in it are an error."""
    names, loose = [], []
    for entry in sorted(os.scandir(os.path.join(root, split)), key=lambda e: e.name):
        rel = os.path.join(split, entry.name)
        if entry.name.startswith("."):
            ignored.append((rel, "hidden, ignored"))
        elif entry.is_dir():
            names.append(entry.name)
        elif _not_an_image(entry.name):
            ignored.append((rel, _not_an_image(entry.name)))
        else:
            loose.append(rel)
    if loose:
        more = f" (and {len(loose) - 1} more)" if len(loose) > 1 else ""
        raise ImageError(f"{os.path.join(root, loose[0])}{more} lies directly under {split}/: images there need "
                         f"a class; move each into its class folder, {split}/<class>/")
    return names


def _scan(root: str) -> _Scan:
    if not os.path.isdir(root):
        raise ImageError(f"folder {root} not found: give a folder holding labeled/<class>/ image folders")
    if not os.path.isdir(os.path.join(root, "labeled")):
        raise ImageError(f"{root} has no labeled/ folder: put the labeled images in {root}/labeled/<class>/ "
                         "(one folder per class), the unlabeled ones in unlabeled/")
    ignored, bad = [], []
    for entry in sorted(os.listdir(root)):
        if entry not in SPLITS:
            ignored.append((entry, "not labeled/, unlabeled/, val/ or test/; ignored"))
    classes = {split: _class_folders(root, split, ignored)
               for split in CLASS_SPLITS if os.path.isdir(os.path.join(root, split))}
    class_names = tuple(sorted(classes["labeled"]))
    if not class_names:
        raise ImageError(f"{root}/labeled/ has no class folders: put each class's images in labeled/<class>/")
    files = []
    for split in SPLITS:  # labeled/ first: an empty class folder there is named before val/ and test/ differ
        if not os.path.isdir(os.path.join(root, split)):
            continue
        if split in ("val", "test") and set(classes[split]) != set(class_names):
            extra, missing = set(classes[split]) - set(class_names), set(class_names) - set(classes[split])
            raise ImageError(f"{root}/{split}/ has other classes than labeled/: "
                             f"{'only in ' + split + '/: ' + ', '.join(sorted(extra)) if extra else ''}"
                             f"{'; ' if extra and missing else ''}"
                             f"{'missing from ' + split + '/: ' + ', '.join(sorted(missing)) if missing else ''}"
                             f"; {split}/ needs exactly labeled/'s class folders")
        folders = [(split, -1)] if split == "unlabeled" else [(os.path.join(split, c), i)
                                                               for i, c in enumerate(class_names)]
        for folder, label in folders:
            bad_before = len(bad)
            found = _walk(root, folder, ignored, bad)
            if not found and len(bad) == bad_before:
                raise ImageError(f"{os.path.join(root, folder)} has no image files (PNG, JPEG, BMP, WebP, GIF): "
                                 "add at least one, or remove the folder")
            files += [_File(split, rel, label, size, mtime) for rel, size, mtime in found]
    return _Scan(root, class_names, files, ignored, bad)


# ---------------------------------------------------------------- the cache file

def default_cache_dir() -> Path:
    return Path(os.environ.get("SGAN_CACHE_DIR") or Path.home() / ".cache" / "sgan").expanduser()


def _cache_file(root: str, image_size: int, channels: int | None, cache_dir) -> str:
    folder, cache = os.path.realpath(root), os.path.realpath(cache_dir or default_cache_dir())
    if cache == folder or cache.startswith(folder + os.sep):
        raise ImageError(f"cache folder {cache} is inside the data folder {folder}: choose another cache_dir "
                         "(or $SGAN_CACHE_DIR)")
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as error:
        raise ImageError(f"cannot create the cache folder {cache}: {error.strerror}; set $SGAN_CACHE_DIR (or "
                         "cache_dir) to a writable folder") from None
    return os.path.join(cache, f"{_folder_tag(folder)}_{image_size}px_{channels or 'auto'}ch.sgimg")


def _folder_tag(real_path: str) -> str:
    return hashlib.sha256(real_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _cache_key(files: list[_File], image_size: int, channels: int | None) -> dict:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.split}\0{f.rel}\0{f.label}\0{f.size}\0{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {"format": FORMAT_VERSION, "image_size": image_size, "channels": channels or "auto",
            "files": digest.hexdigest()}


def _read_cache(path: str, key: dict | None) -> dict | None:
    """The header of a complete cache file whose key is `key` (any key when None), else None."""
    try:
        with open(path, "rb") as f:
            total = f.seek(0, os.SEEK_END)
            if total < TRAILER.size:
                return None
            f.seek(total - TRAILER.size)
            magic, length = TRAILER.unpack(f.read(TRAILER.size))
            if magic != MAGIC or length > total - TRAILER.size:
                return None
            f.seek(total - TRAILER.size - length)
            header = json.loads(f.read(length))
        n, c, h, w = header["shape"]
        if (key is not None and header["key"] != key) or n * c * h * w + length + TRAILER.size != total:
            return None
        return header
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, foreign or corrupt: rebuilt


def _build_cache(scan: _Scan, image_size: int, channels: int | None, path: str, key: dict, workers: int | None,
                 progress: bool) -> dict:
    """Decode every image of the scan into the cache file `path`, atomically; returns its header."""
    started = time.perf_counter()
    _remove_orphans(path)
    tasks = [(os.path.join(scan.root, f.rel), image_size, channels or 3) for f in scan.files]
    kept, bad, colour, sizes, modes = [], [], False, Counter(), Counter()
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as out:  # the good images in order, written as they come back
            for f, result in zip(scan.files, _parallel_map(_decode_file, tasks, workers, "decode images", progress)):
                if result.error:
                    bad.append((f.rel, result.error))
                    continue
                out.write(result.pixels.tobytes())
                kept.append(f)
                colour |= result.colour
                sizes[result.size] += 1
                modes[result.mode] += 1
        pixels = image_size * image_size
        resolved = channels or (3 if colour else 1)
        if resolved == 1 and not channels:
            _keep_first_channel(tmp, len(kept), pixels)
        splits = {}
        for i, f in enumerate(kept):
            splits.setdefault(f.split, [i, i])[1] = i + 1
        header = {"key": key, "shape": [len(kept), resolved, image_size, image_size], "splits": splits,
                  "paths": [f.rel for f in kept], "labels": [f.label for f in kept], "bad": bad,
                  "sizes_seen": dict(sizes), "modes_seen": dict(modes),
                  "decode_seconds": round(time.perf_counter() - started, 3)}
        text = json.dumps(header).encode()
        with open(tmp, "r+b") as out:
            out.truncate(len(kept) * resolved * pixels)
            out.seek(0, os.SEEK_END)
            out.write(text + TRAILER.pack(MAGIC, len(text)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return header
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_orphans(path: str) -> None:
    """Delete the temporary files of builds of `path` whose process is gone (killed before its cleanup ran)."""
    for tmp in Path(path).parent.glob(Path(path).name + ".tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass  # not ours, or a live process of another user: leave it


def _keep_first_channel(path: str, n: int, pixels: int) -> None:
    """Rewrite a file of n grey images stored as RGB (R = G = B) as n one-channel images, in place: each chunk
    is read before it is written, and the writes stay behind the reads."""
    step = max(1, (64 << 20) // (3 * pixels))
    with open(path, "r+b") as f:
        for start in range(0, n, step):
            count = min(step, n - start)
            f.seek(start * 3 * pixels)
            rgb = np.frombuffer(f.read(count * 3 * pixels), np.uint8).reshape(count, 3, pixels)
            f.seek(start * pixels)
            f.write(rgb[:, 0].tobytes())


# ---------------------------------------------------------------- opening sources

def _check_settings(image_size, channels, required_size: bool) -> None:
    if image_size is None and required_size:
        raise ImageError("a folder needs image_size (--image-size N): its images are fitted to N x N")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 4):
        raise ImageError(f"image_size must be an integer >= 4, not {image_size!r}")
    if channels not in (None, 1, 3):
        raise ImageError(f"channels must be 1 (grey), 3 (RGB) or None (3 if any image has colour), not {channels!r}")


def _check_fit(image_size, channels) -> None:
    """The settings of load_image(s): a size, and the channels the classifier takes."""
    _check_settings(image_size, channels, required_size=True)
    if channels is None:
        raise ImageError("channels must be 1 (grey) or 3 (RGB): the classifier's image shape says which")


def _bad_images_error(root: str, bad: list[tuple[str, str]]) -> ImageError:
    (rel, reason), others = bad[0], len(bad) - 1
    message = f"{os.path.join(root, rel)} is not a readable image ({reason})"
    if others:
        listed = "; ".join(f"{r} ({why})" for r, why in bad[1:6]) + ("; ..." if others > 5 else "")
        message += f", and {others} other image{'s are' if others > 1 else ' is'} bad too: {listed}"
    return ImageError(message + "; replace or delete them, or pass skip_bad_images=True (--skip-bad-images) to "
                                "leave them out")


def _check_labels_cover(split: str, labels: np.ndarray, class_names: tuple[str, ...], where: str) -> None:
    """Every class needs an image in labeled/ (and in val/ and test/ when present)."""
    missing = [class_names[i] for i in np.flatnonzero(np.bincount(labels, minlength=len(class_names)) == 0)]
    if missing:
        raise ImageError(f"{where}: {split} has no image of class {', '.join(missing)} (bad images skipped): "
                         f"every class needs at least one image in {split}")


def open_folder(path, image_size: int, channels: int | None = None, *, cache_dir=None, skip_bad_images: bool = False,
                workers: int | None = None, progress: bool = True) -> ImageSource:
    """The folder's images at image_size x image_size, decoded once into the cache and memory-mapped from it
    (see the module's docstring for the layout, fitting, channel rule and cache)."""
    _check_settings(image_size, channels, required_size=True)
    root = os.fspath(path)
    scan = _scan(root)
    cache_file = _cache_file(root, image_size, channels, cache_dir)
    key = _cache_key(scan.files, image_size, channels)
    header = _read_cache(cache_file, key)
    hit = header is not None
    if not hit:
        header = _build_cache(scan, image_size, channels, cache_file, key, workers, progress)
    bad = scan.bad + [tuple(b) for b in header["bad"]]
    if bad and not skip_bad_images:
        raise _bad_images_error(root, bad)
    for split in SPLITS:
        if os.path.isdir(os.path.join(root, split)) and split not in header["splits"]:
            raise ImageError(f"{os.path.join(root, split)} has no readable image (all {split}'s images are bad): "
                             "replace them, or remove the folder")
    images = np.memmap(cache_file, np.uint8, "r", shape=tuple(header["shape"]))
    splits = {}
    for split, (start, stop) in header["splits"].items():
        labels = None if split == "unlabeled" else np.array(header["labels"][start:stop], np.int64)
        if labels is not None:
            _check_labels_cover(f"{split}/", labels, scan.class_names, root)
        splits[split] = Split(images[start:stop], labels, [os.path.join(root, r) for r in header["paths"][start:stop]])
    skipped = [(os.path.join(root, rel), reason) for rel, reason in scan.ignored]
    skipped += [(os.path.join(root, rel), f"bad image, skipped: {reason}") for rel, reason in bad]
    return ImageSource(f"folder:{root}", scan.class_names, skipped=skipped, sizes_seen=header["sizes_seen"],
                       modes_seen=header["modes_seen"], cache_file=cache_file, cache_hit=hit, **splits)


def _as_numpy(x):
    """numpy arrays as they are; torch tensors (or anything with .numpy()) without a copy when on the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)


def _nchw(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """An images array as uint8 NCHW (a view when possible), by the module's layout rule."""
    if x.dtype != np.uint8:
        raise ImageError(f"{where}: {name} is {x.dtype}, not uint8: store pixel values 0..255 as uint8 "
                         "(e.g. (x * 255).round().astype(np.uint8) for floats in 0..1)")
    if x.ndim == 3:
        x = x[:, np.newaxis]
    elif x.ndim == 4 and x.shape[1] not in (1, 3):
        if x.shape[3] not in (1, 3):
            raise ImageError(f"{where}: {name} has shape {x.shape}: neither NCHW nor NHWC with 1 or 3 channels; "
                             "store grey images as [N, H, W] or [N, 1, H, W], colour ones as [N, 3, H, W] or "
                             "[N, H, W, 3]")
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ImageError(f"{where}: {name} has rank {x.ndim} (shape {x.shape}); images are [N, H, W], "
                         "[N, C, H, W] or [N, H, W, C]")
    if min(x.shape[2:]) < 4:
        raise ImageError(f"{where}: {name} has shape {x.shape}: images must be at least 4 x 4 pixels (NCHW when "
                         "dim 1 is 1 or 3, else NHWC)")
    return x


def _labels(y, name: str, where: str, count: int) -> np.ndarray:
    y = _as_numpy(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ImageError(f"{where}: {name} has shape {y.shape} and dtype {y.dtype}; labels are a 1-D integer "
                         "array of class indices")
    if len(y) != count:
        raise ImageError(f"{where}: {name} has {len(y)} labels for {count} images in x_{name[2:]}: give one "
                         "label per image")
    if len(y) and y.min() < 0:
        raise ImageError(f"{where}: {name} holds the negative label {y.min()}: labels are class indices 0..K-1")
    if len(y) and y.max() > np.iinfo(np.int64).max:  # before the cast to int64, which would wrap it negative
        raise ImageError(f"{where}: {name} holds label {y.max()}, out of range: labels are class indices 0..K-1")
    return y.astype(np.int64)


def _class_name(name, where: str) -> str:
    """One of class_names as text: bytes (an npz's S dtype) are decoded as UTF-8, not shown as "b'cat'"."""
    if not isinstance(name, bytes):
        return str(name)
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{where}: class name {bytes(name)!r} is not UTF-8 text: store class_names as str, e.g. "
                         "np.array(['cat', 'dog'])") from None


def _resize_arrays(x: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """NCHW uint8 images fitted to [channels, image_size, image_size] by the same rule as image files."""
    if x.shape[1:] == (channels, image_size, image_size):
        return np.ascontiguousarray(x)  # a copy only when the input was NHWC
    out = np.empty((len(x), channels, image_size, image_size), np.uint8)
    for i, image in enumerate(x):
        out[i] = _fit(Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)),
                      image_size, channels)
    return out


def _from_named(arrays: dict, name: str, where: str, image_size, channels) -> ImageSource:
    _check_settings(image_size, channels, required_size=False)
    for x_name, y_name in (("x_labeled", "y_labeled"), ("x_val", "y_val"), ("x_test", "y_test")):
        if (arrays.get(x_name) is None) != (arrays.get(y_name) is None):
            given, needed = (x_name, y_name) if arrays.get(x_name) is not None else (y_name, x_name)
            raise ImageError(f"{where}: {given} is given without {needed}: give both or neither")
    if arrays.get("x_labeled") is None:
        raise ImageError(f"{where}: x_labeled and y_labeled are required (the labeled images and their labels)")
    xs = {s: _nchw(_as_numpy(arrays[f"x_{s}"]), f"x_{s}", where) for s in SPLITS if arrays.get(f"x_{s}") is not None}
    if image_size is None:
        shapes = {s: x.shape[2:] for s, x in xs.items()}
        if len(set(shapes.values())) > 1 or any(h != w for h, w in shapes.values()):
            raise ImageError(f"{where}: image sizes {shapes} are not one square size: pass image_size "
                             "(--image-size N) to fit them to N x N")
        image_size = xs["labeled"].shape[2]
    channels = channels or max(x.shape[1] for x in xs.values())
    ys = {s: _labels(arrays[f"y_{s}"], f"y_{s}", where, len(xs[s])) for s in CLASS_SPLITS if s in xs}
    if not len(ys["labeled"]):
        raise ImageError(f"{where}: x_labeled holds no images: give at least one labeled image per class")
    class_names = arrays.get("class_names")
    if class_names is None:
        most = int(ys["labeled"].max())
        if most >= len(ys["labeled"]):  # labels 0..most are that many classes, each needing a labeled image
            raise ImageError(f"{where}: y_labeled holds label {most}, out of range for {len(ys['labeled'])} labeled "
                             "images (every class needs one): labels are class indices 0..K-1")
        class_names = tuple(str(i) for i in range(most + 1))
    else:
        class_names = tuple(_class_name(c, where) for c in _as_numpy(class_names).reshape(-1))
        if len(set(class_names)) != len(class_names):
            raise ImageError(f"{where}: class_names {class_names} repeat a name: give each class a distinct name")
    for split, y in ys.items():
        if len(y) and y.max() >= len(class_names):
            raise ImageError(f"{where}: y_{split} holds label {y.max()}, but there are {len(class_names)} classes "
                             f"({', '.join(class_names)}): labels are 0..{len(class_names) - 1}")
    _check_labels_cover("y_labeled", ys["labeled"], class_names, where)
    splits = {s: Split(_resize_arrays(x, image_size, channels), ys.get(s), None)
              for s, x in xs.items() if len(x) or s == "labeled"}
    sizes = Counter()
    for x in xs.values():
        sizes[f"{x.shape[3]}x{x.shape[2]}"] += len(x)
    modes = Counter({f"{c} channel{'s' if c > 1 else ''}": sum(len(x) for x in xs.values() if x.shape[1] == c)
                     for c in (1, 3)})
    return ImageSource(name, class_names, sizes_seen=dict(sizes), modes_seen=dict(+modes), **splits)


def open_npz(file, image_size: int | None = None, channels: int | None = None) -> ImageSource:
    """The arrays of an .npz file (see the module's docstring), read with allow_pickle=False."""
    where = os.fspath(file)
    if not os.path.isfile(where):
        raise ImageError(f"npz file {where} not found")
    try:
        npz = np.load(where, allow_pickle=False)
    except zipfile.BadZipFile as error:  # it starts as a zip, but is not a whole one
        raise _damaged_npz(where, error) from None
    except (OSError, EOFError, ValueError) as error:  # ValueError: neither zip nor .npy (numpy calls it a pickle)
        raise ImageError(f"{where} is not a readable .npz file ({error}): save it with np.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ImageError(f"{where} holds one array (.npy), not named arrays: save it with "
                         "np.savez(FILE, x_labeled=..., y_labeled=..., x_unlabeled=...)")
    with npz:
        unknown = sorted(set(npz.files) - set(ARRAY_NAMES))
        if unknown:
            raise ImageError(f"{where}: unexpected arrays {', '.join(unknown)}; the names are {', '.join(ARRAY_NAMES)}")
        missing = [n for n in ARRAY_NAMES[:3] if n not in npz.files]
        if missing:
            raise ImageError(f"{where}: required arrays missing: {', '.join(missing)}; save x_labeled, y_labeled "
                             "and x_unlabeled (it may hold 0 images)")
        arrays = {}
        for name in npz.files:
            try:
                arrays[name] = npz[name]
            except ValueError as error:
                if "allow_pickle" not in str(error):  # numpy's refusal of an object array names the flag
                    raise _damaged_npz(where, error, name) from None
                raise ImageError(f"{where}: {name} holds Python objects (a pickle), refused: save plain numeric "
                                 f"arrays (uint8 images, integer labels, str class names) ({error})") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:  # a bad CRC, cut-short data
                raise _damaged_npz(where, error, name) from None
    return _from_named(arrays, f"npz:{where}", where, image_size, channels)


def _damaged_npz(where: str, error: Exception, name: str | None = None) -> ImageError:
    member = f"{name}: " if name else ""
    return ImageError(f"{where} is damaged, not a valid .npz ({member}{type(error).__name__}: {error}): it was cut "
                      "short or corrupted; copy it again, or save it again with np.savez")


def from_arrays(x_labeled, y_labeled, x_unlabeled=None, x_val=None, y_val=None, x_test=None, y_test=None,
                class_names=None, image_size: int | None = None, channels: int | None = None) -> ImageSource:
    """A source from numpy arrays or torch tensors (uint8 images, integer labels; see the module's docstring).
    Arrays already NCHW at the chosen size and channels are used as they are, without a copy."""
    arrays = {"x_labeled": x_labeled, "y_labeled": y_labeled, "x_unlabeled": x_unlabeled, "x_val": x_val,
              "y_val": y_val, "x_test": x_test, "y_test": y_test, "class_names": class_names}
    from .data import ARRAYS

    return _from_named(arrays, ARRAYS, "arrays", image_size, channels)


def _parse_spec(spec) -> tuple[str, str]:
    from .data import own_images_path  # the one parser of folder:/npz: specs (sgan.data imports this module)

    own = own_images_path(str(spec))
    if own is None or not own[1].strip():
        raise ImageError(f"unknown source {spec!r}: give folder:PATH (a folder with labeled/<class>/) or npz:FILE")
    return own


# ---------------------------------------------------------------- describe (python -m sgan.data inspect SOURCE)

def describe(source, *, cache_dir=None, workers: int | None = None, progress: bool = False) -> str:
    """What a source holds: images per split and class, sizes and modes seen, ignored and bad files, and the
    cache. `source` is an ImageSource, "folder:PATH" or "npz:FILE". A folder is only scanned (its image headers
    read), never decoded, and every cache of it in cache_dir is listed as current or stale."""
    if isinstance(source, ImageSource):
        counts = {s: (len(split), split.labels) for s, split in source.splits().items()}
        lines = _summary(source.name, source.class_names, counts, source.sizes_seen, source.modes_seen)
        lines.append(f"images: {'x'.join(map(str, source.image_shape))} (C x H x W) uint8, "
                     f"{_megabytes(sum(s.images.nbytes for s in source.splits().values()))}")
        lines += _listing("skipped", source.skipped)
        if source.cache_file:
            lines.append(f"cache: {source.cache_file}, {'reused' if source.cache_hit else 'built by this open'}")
        return "\n".join(lines)
    kind, path = _parse_spec(source)
    if kind == "npz":
        return describe(open_npz(path))
    scan = _scan(path)
    probes = _parallel_map(_decode_file, [(os.path.join(path, f.rel), None, 3) for f in scan.files], workers,
                           "read headers", progress)
    sizes, modes, bad = Counter(), Counter(), list(scan.bad)
    for f, probe in zip(scan.files, probes):
        if probe.error:
            bad.append((f.rel, probe.error))
        else:
            sizes[probe.size] += 1
            modes[probe.mode] += 1
    counts = {}
    for split in SPLITS:
        labels = np.array([f.label for f in scan.files if f.split == split], np.int64)
        if os.path.isdir(os.path.join(path, split)):
            counts[split] = (len(labels), None if split == "unlabeled" else labels)
    lines = _summary(f"folder:{path}", scan.class_names, counts, sizes, modes)
    lines += _listing("ignored", [(os.path.join(path, r), why) for r, why in scan.ignored])
    lines += _listing("bad (unreadable header or empty)", [(os.path.join(path, r), why) for r, why in bad])
    return "\n".join(lines + _cache_state(scan, cache_dir))


def _summary(name, class_names, counts, sizes, modes) -> list[str]:
    lines = [f"source: {name}", f"classes ({len(class_names)}): {', '.join(class_names)}"]
    for split in SPLITS:
        if split not in counts:
            lines.append(f"  {split:<10} none")
            continue
        total, labels = counts[split]
        per_class = "" if labels is None else "  " + ", ".join(
            f"{c}: {n}" for c, n in zip(class_names, np.bincount(labels, minlength=len(class_names))))
        lines.append(f"  {split:<10} {total:>8} images{per_class}")
    lines.append("sizes seen: " + (", ".join(f"{s} ({n})" for s, n in Counter(sizes).most_common()) or "-"))
    lines.append("modes seen: " + (", ".join(f"{m} ({n})" for m, n in Counter(modes).most_common()) or "-"))
    return lines


def _listing(title: str, entries: list[tuple[str, str]], most: int = 10) -> list[str]:
    if not entries:
        return []
    lines = [f"{title}: {len(entries)}"] + [f"  {path}: {why}" for path, why in entries[:most]]
    return lines + ([f"  ... and {len(entries) - most} more"] if len(entries) > most else [])


def _cache_state(scan: _Scan, cache_dir) -> list[str]:
    folder = os.path.realpath(scan.root)
    caches = sorted(Path(cache_dir or default_cache_dir()).glob(f"{_folder_tag(folder)}_*.sgimg"))
    if not caches:
        return [f"cache: none in {cache_dir or default_cache_dir()} (the first open decodes every image)"]
    lines = ["cache:"]
    for path in caches:
        header = _read_cache(str(path), None)
        if header is None:
            lines.append(f"  {path}: incomplete or corrupt, rebuilt on the next open")
            continue
        key = header["key"]
        current = key == _cache_key(scan.files, key["image_size"], None if key["channels"] == "auto" else
                                    key["channels"])
        n, c, h, w = header["shape"]
        lines.append(f"  {path}: {n} images {c}x{h}x{w}, {_megabytes(path.stat().st_size)}, "
                     f"{'current' if current else 'stale (files changed since; rebuilt on the next open)'}")
    return lines


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"
