"""sgan.images: folders, npz files and arrays as uint8 splits; the decode cache; every bad input. Each test makes
its own small images with PIL."""
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgan import images
from sgan.images import ImageError, describe, from_arrays, open_folder, open_npz

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test's caches go to its own folder (the default location, via $SGAN_CACHE_DIR)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SGAN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The files decoded in this process (open with workers=1)."""
    calls = []
    real = images._decode_file

    def counting(task):
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(images, "_decode_file", counting)
    return calls


def save(path: Path, image: Image.Image | np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **options)
    return path


def solid(colour, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def make_folder(root: Path, classes=("cat", "dog"), per_class=(3, 2), unlabeled=4, val=True, test=False) -> Path:
    """Solid-colour 8x8 PNGs: class i has grey level 10 * (i + 1) + j in its j-th image."""
    for i, (name, count) in enumerate(zip(classes, per_class)):
        for j in range(count):
            save(root / "labeled" / name / f"{j}.png", solid((10 * (i + 1) + j,) * 3))
        for split, wanted in (("val", val), ("test", test)):
            if wanted:
                save(root / split / name / "0.png", solid((10 * (i + 1),) * 3))
    for j in range(unlabeled):
        save(root / "unlabeled" / f"part{j % 2}" / "deeper" / f"{j}.png", solid((200 + j, 0, 0)))
    return root


def open_test_folder(root, image_size=8, **options):
    return open_folder(root, image_size, workers=options.pop("workers", 1), progress=False, **options)


# ---------------------------------------------------------------- layout, labels, pixels

def test_folder_splits_classes_and_labels(tmp_path):
    root = make_folder(tmp_path / "data", classes=("dog", "a cat", "été"), per_class=(1, 3, 2), test=True)
    source = open_test_folder(root)
    assert source.name == f"folder:{root}"
    assert source.class_names == ("a cat", "dog", "été")  # sorted by code point; spaces and unicode kept
    assert [len(s) for s in (source.labeled, source.unlabeled, source.val, source.test)] == [6, 4, 3, 3]
    assert source.labeled.labels.tolist() == [0, 0, 0, 1, 2, 2] and source.labeled.labels.dtype == np.int64
    assert source.unlabeled.labels is None
    assert source.labeled.paths[3] == os.path.join(str(root), "labeled", "dog", "0.png")
    assert source.image_shape == (3, 8, 8) and source.labeled.images.dtype == np.uint8
    assert isinstance(source.unlabeled.images, np.memmap) and not source.unlabeled.images.flags.writeable
    # "a cat" images 0, 1, 2 have grey 20, 21, 22; "dog" has 10; unlabeled red 200..203 from nested folders
    assert source.labeled.images[:4, 0, 0, 0].tolist() == [20, 21, 22, 10]
    assert sorted(source.unlabeled.images[:, 0, 3, 3].tolist()) == [200, 201, 202, 203]
    assert source.unlabeled.images[:, 1].max() == 0


def test_without_unlabeled_val_and_test_those_splits_are_none(tmp_path):
    source = open_test_folder(make_folder(tmp_path / "d", unlabeled=0, val=False))
    assert (source.unlabeled, source.val, source.test) == (None, None, None)
    assert list(source.splits()) == ["labeled"]


def test_formats_and_modes_convert_to_known_pixels(tmp_path):
    c = tmp_path / "d" / "labeled" / "c"
    save(c / "rgb.png", solid(RED))
    save(c / "grey.png", solid(77, mode="L"))
    save(c / "rgba.png", solid((200, 100, 50, 128), mode="RGBA"))  # over black: colour * 128 / 255
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))  # left half: index 0, transparent red
    save(c / "palette.png", palette, transparency=0)
    save(c / "deep.png", Image.fromarray(np.full((8, 8), 0x8040, np.uint16)))  # 16-bit grey: high byte 0x80
    save(c / "anim.gif", solid(RED), save_all=True, append_images=[solid(BLUE)])  # first frame counts
    save(c / "bitmap.bmp", solid(BLUE))
    save(c / "lossless.webp", solid(GREEN), lossless=True)
    save(c / "photo.JPG", solid((90, 160, 30)), quality=95)
    assert Image.open(c / "deep.png").mode in ("I;16", "I")
    source = open_test_folder(tmp_path / "d")
    pixel = {Path(p).name: source.labeled.images[i, :, 6, 6].tolist() for i, p in enumerate(source.labeled.paths)}
    assert pixel["rgb.png"] == [255, 0, 0] and pixel["grey.png"] == [77, 77, 77]
    assert pixel["rgba.png"] == [100, 50, 25]
    assert pixel["palette.png"] == [0, 255, 0]
    assert source.labeled.images[source.labeled.paths.index(str(c / "palette.png")), :, 1, 1].tolist() == [0, 0, 0]
    assert pixel["deep.png"] == [128, 128, 128]
    assert pixel["anim.gif"] == [255, 0, 0] and pixel["bitmap.bmp"] == [0, 0, 255]
    assert pixel["lossless.webp"] == [0, 255, 0]
    assert np.abs(np.array(pixel["photo.JPG"]) - [90, 160, 30]).max() <= 6
    assert source.modes_seen["RGB"] >= 3 and source.sizes_seen == {"8x8": 9}


def test_channels_1_is_pil_luma_and_3_copies_grey(tmp_path):
    c = tmp_path / "d" / "labeled" / "c"
    save(c / "a_red.png", solid(RED))
    save(c / "b_grey.png", solid(77, mode="L"))
    grey = open_test_folder(tmp_path / "d", channels=1)
    assert grey.image_shape == (1, 8, 8)
    assert grey.labeled.images[:, 0, 0, 0].tolist() == [76, 77]  # 255 * 299 / 1000 rounds to 76
    colour = open_test_folder(tmp_path / "d", channels=3)
    assert colour.labeled.images[1, :, 0, 0].tolist() == [77, 77, 77]


def test_default_channels_are_3_only_when_some_pixel_has_colour(tmp_path):
    c = tmp_path / "d" / "labeled" / "c"
    save(c / "grey_as_rgb.png", solid((90, 90, 90)))  # RGB mode, but grey: counts as grey
    save(c / "grey.png", solid(40, mode="L"))
    source = open_test_folder(tmp_path / "d")
    assert source.image_shape == (1, 8, 8)
    assert source.labeled.images[:, 0, 5, 5].tolist() == [40, 90]
    image = np.full((8, 8, 3), 90, np.uint8)
    image[7, 7] = (90, 91, 90)  # one pixel with colour
    save(c / "grey_as_rgb.png", image)
    assert open_test_folder(tmp_path / "d").image_shape == (3, 8, 8)


def test_non_square_images_lose_equal_margins_then_scale(tmp_path):
    c = tmp_path / "d" / "labeled" / "c"
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = RED, GREEN, BLUE
    save(c / "a_wide.png", wide)
    save(c / "b_tall.png", wide.transpose(1, 0, 2).copy())
    ramp = np.tile(np.arange(0, 110, 10, dtype=np.uint8), (8, 1))  # 11 wide, 8 high: columns 0, 10, ..., 100
    save(c / "c_odd.png", ramp)
    source = open_test_folder(tmp_path / "d", image_size=10)
    assert (source.labeled.images[0].transpose(1, 2, 0) == GREEN).all()  # the middle third, no resampling
    assert (source.labeled.images[1].transpose(1, 2, 0) == GREEN).all()
    odd = open_test_folder(tmp_path / "d", image_size=8, channels=1).labeled.images[2, 0]
    assert odd[0].tolist() == list(range(10, 90, 10))  # (11 - 8) // 2 = 1 column off the left, 2 off the right
    scaled = open_test_folder(tmp_path / "d", image_size=5).labeled.images[0]  # 10 x 10 green, scaled down
    assert (scaled.transpose(1, 2, 0) == GREEN).all()


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4], image[:, 4:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the red left half ends on top
    save(tmp_path / "d" / "labeled" / "c" / "x.png", image, exif=exif)
    view = open_test_folder(tmp_path / "d").labeled.images[0].transpose(1, 2, 0)
    assert (view[:4] == RED).all() and (view[4:] == BLUE).all()


# ---------------------------------------------------------------- the cache

def test_second_open_reuses_the_cache_without_decoding(tmp_path, decodes, cache_dir):
    root = make_folder(tmp_path / "d")
    first = open_test_folder(root)
    assert len(decodes) == 11 and first.cache_hit is False
    cache_file = Path(first.cache_file)
    assert cache_file.parent == cache_dir and not str(cache_file).startswith(str(root))
    written = cache_file.stat().st_mtime_ns
    decodes.clear()
    second = open_test_folder(root)
    assert decodes == [] and second.cache_hit is True and cache_file.stat().st_mtime_ns == written
    for name in ("labeled", "unlabeled", "val"):
        assert np.array_equal(getattr(first, name).images, getattr(second, name).images)
    assert second.labeled.labels.tolist() == first.labeled.labels.tolist()
    open_test_folder(root, image_size=4)  # other settings: another cache file
    assert len(decodes) == 11 and len(list(cache_dir.glob("*.sgimg"))) == 2


def test_changed_added_or_removed_file_rebuilds_the_cache(tmp_path, decodes, cache_dir):
    root = make_folder(tmp_path / "d")
    open_test_folder(root)
    changed = root / "labeled" / "cat" / "0.png"
    save(changed, solid((99, 99, 99)))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    decodes.clear()
    source = open_test_folder(root)
    assert len(decodes) == 11 and not source.cache_hit and source.labeled.images[0, 0, 0, 0] == 99
    save(root / "unlabeled" / "new.png", solid(GREEN))
    assert len(open_test_folder(root).unlabeled) == 5
    (root / "labeled" / "cat" / "1.png").unlink()
    assert len(open_test_folder(root).labeled) == 4
    assert len(list(cache_dir.iterdir())) == 1  # rebuilt in place: one file per folder and settings


def test_truncated_or_foreign_cache_is_rebuilt_not_trusted(tmp_path, decodes):
    root = make_folder(tmp_path / "d")
    cache_file = Path(open_test_folder(root).cache_file)
    expected = open_test_folder(root).labeled.images.copy()
    for damage in (lambda data: data[:-100], lambda data: data[:1000] + data[1100:], lambda data: b"x" * 50):
        cache_file.write_bytes(damage(cache_file.read_bytes()))
        decodes.clear()
        source = open_test_folder(root)
        assert len(decodes) == 11 and not source.cache_hit
        assert np.array_equal(source.labeled.images, expected)


def test_a_crash_while_decoding_leaves_no_cache_behind(tmp_path, monkeypatch, cache_dir):
    root = make_folder(tmp_path / "d")
    real, calls = images._decode_file, []

    def crash(task):
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(images, "_decode_file", crash)
    with pytest.raises(KeyboardInterrupt):
        open_test_folder(root)
    assert list(cache_dir.iterdir()) == []  # no cache file, no temporary file
    monkeypatch.setattr(images, "_decode_file", real)
    orphan = Path(f"{images._cache_file(str(root), 8, None, None)}.tmp-999999999-abcd")  # a killed build's file
    orphan.write_bytes(b"half")
    assert len(open_test_folder(root).labeled) == 5
    assert not orphan.exists() and [p.suffix for p in cache_dir.iterdir()] == [".sgimg"]


def test_process_pool_decodes_the_same_pixels(tmp_path):
    root = make_folder(tmp_path / "d", per_class=(12, 9), unlabeled=30)
    pooled = open_folder(root, 8, workers=2, progress=False, cache_dir=tmp_path / "pool")
    single = open_folder(root, 8, workers=1, progress=False, cache_dir=tmp_path / "one")
    for name in ("labeled", "unlabeled", "val"):
        assert np.array_equal(getattr(pooled, name).images, getattr(single, name).images)
        assert getattr(pooled, name).paths == getattr(single, name).paths


def test_cache_location_default_and_never_inside_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("SGAN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert images.default_cache_dir() == tmp_path / "home" / ".cache" / "sgan"
    root = make_folder(tmp_path / "d")
    with pytest.raises(ImageError, match="inside the data folder"):
        open_test_folder(root, cache_dir=root / "unlabeled" / ".cache")


# ---------------------------------------------------------------- bad folders

def test_corrupt_and_truncated_images_are_named_or_skipped(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "unlabeled" / "noise.png").write_bytes(os.urandom(300))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    (root / "labeled" / "cat" / "cut.jpg").write_bytes(jpeg.getvalue()[:1500])
    png = (root / "labeled" / "dog" / "0.png").read_bytes()
    (root / "labeled" / "dog" / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageError, match=r"labeled/cat/cut\.jpg is not a readable image .*and 2 other images "
                                         r"are bad too.*skip_bad_images=True") as error:
        open_test_folder(root)
    assert "labeled/dog/cut.png" in str(error.value) and "unlabeled/noise.png" in str(error.value)
    source = open_test_folder(root, skip_bad_images=True)
    assert len(source.labeled) == 5 and source.labeled.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(source.unlabeled) == 4
    skipped = dict(source.skipped)
    assert set(skipped) == {str(root / p) for p in ("labeled/cat/cut.jpg", "labeled/dog/cut.png",
                                                    "unlabeled/noise.png")}
    assert all(reason.startswith("bad image, skipped") for reason in skipped.values())
    assert "truncated" in skipped[str(root / "labeled/cat/cut.jpg")]


def test_zero_byte_file_is_a_bad_image(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "labeled" / "dog" / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"labeled/dog/empty\.png is not a readable image \(empty file \(0 bytes\)"):
        open_test_folder(root)
    assert len(open_test_folder(root, skip_bad_images=True).labeled) == 5


def test_a_fifo_is_a_bad_image_never_opened(tmp_path):
    root = make_folder(tmp_path / "d")
    os.mkfifo(root / "labeled" / "dog" / "pipe.png")  # opening it would wait for a writer
    with pytest.raises(ImageError, match=r"labeled/dog/pipe\.png is not a readable image \(a FIFO, not a regular "
                                         r"file\)"):
        open_test_folder(root)
    assert len(open_test_folder(root, skip_bad_images=True).labeled) == 5


def png_claiming_size(side: int) -> bytes:
    """A tiny PNG whose header claims side x side pixels (its data is a 1x1 image's)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, side, side)  # IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bombs_are_refused_from_the_header(tmp_path, decodes):
    root = make_folder(tmp_path / "d")
    (root / "unlabeled" / "bomb.png").write_bytes(png_claiming_size(20000))  # 400 Mpx: PIL's error
    (root / "unlabeled" / "big.png").write_bytes(png_claiming_size(10000))  # 100 Mpx: PIL's warning, refused too
    with pytest.raises(ImageError, match=r"unlabeled/big\.png is not a readable image \(DecompressionBomb"):
        open_test_folder(root)
    skipped = dict(open_test_folder(root, skip_bad_images=True).skipped)
    assert "DecompressionBombError" in skipped[str(root / "unlabeled/bomb.png")]


@pytest.mark.parametrize("val", [False, True])
def test_empty_class_folder_is_an_error(tmp_path, val):
    root = make_folder(tmp_path / "d", val=val)  # with val/: the empty folder is named, not val/'s missing class
    (root / "labeled" / "owl").mkdir()
    (root / "labeled" / "owl" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageError, match=r"labeled/owl has no image files .*add at least one"):
        open_test_folder(root)


def test_class_whose_images_are_all_bad_is_an_error_even_when_skipping(tmp_path):
    root = make_folder(tmp_path / "d", val=False)
    for path in (root / "labeled" / "dog").iterdir():
        path.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="labeled/ has no image of class dog"):
        open_test_folder(root, skip_bad_images=True)


def test_images_directly_under_labeled_are_an_error(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "labeled" / ".DS_Store").write_bytes(b"\0")  # ignored
    save(root / "labeled" / "stray.png", solid(RED))
    with pytest.raises(ImageError, match=r"labeled/stray\.png lies directly under labeled/.*labeled/<class>/"):
        open_test_folder(root)


def test_missing_labeled_folder_or_no_classes(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        open_test_folder(tmp_path / "nowhere")
    (tmp_path / "d" / "unlabeled").mkdir(parents=True)
    with pytest.raises(ImageError, match="has no labeled/ folder"):
        open_test_folder(tmp_path / "d")
    (tmp_path / "d" / "labeled").mkdir()
    with pytest.raises(ImageError, match="no class folders"):
        open_test_folder(tmp_path / "d")


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_and_test_need_labeleds_classes(tmp_path, split):
    root = make_folder(tmp_path / "d", val=False)
    save(root / split / "cat" / "0.png", solid(RED))
    save(root / split / "cow" / "0.png", solid(RED))
    with pytest.raises(ImageError, match=rf"{split}/ has other classes than labeled/: only in {split}/: cow; "
                                         rf"missing from {split}/: dog"):
        open_test_folder(root)


def test_symlink_loop_is_an_error_not_a_hang(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "unlabeled" / "part0" / "loop").symlink_to(root / "unlabeled")
    with pytest.raises(ImageError, match=r"symlink loop: .*unlabeled/part0/loop leads back to .*unlabeled"):
        open_test_folder(root)
    (root / "unlabeled" / "part0" / "loop").unlink()
    (root / "labeled" / "cat" / "up").symlink_to(root / "labeled")  # through the class folders too
    with pytest.raises(ImageError, match="symlink loop"):
        open_test_folder(root)


def test_symlinked_files_and_folders_are_followed(tmp_path):
    root = make_folder(tmp_path / "d", unlabeled=0)
    save(tmp_path / "elsewhere" / "x.png", solid(GREEN))
    (root / "unlabeled").symlink_to(tmp_path / "elsewhere")
    (root / "labeled" / "dog" / "link.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    source = open_test_folder(root)
    assert len(source.unlabeled) == 1 and len(source.labeled) == 6


def test_non_image_files_are_ignored_and_listed(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "unlabeled" / "notes.txt").write_text("hello")
    (root / "unlabeled" / ".DS_Store").write_bytes(b"\0\1")
    (root / "labeled" / "cat" / "._0.png").write_bytes(b"\0")  # macOS metadata, not an image
    (root / "unlabeled" / ".git").mkdir()
    (root / "README.md").write_text("my data")
    source = open_test_folder(root)
    assert len(source.labeled) == 5 and len(source.unlabeled) == 4
    reasons = {os.path.relpath(path, root): why for path, why in source.skipped}
    assert reasons == {"README.md": "not labeled/, unlabeled/, val/ or test/; ignored",
                       "unlabeled/notes.txt": "not an image file (.txt), ignored",
                       "unlabeled/.DS_Store": "hidden file, ignored", "labeled/cat/._0.png": "hidden file, ignored",
                       "unlabeled/.git": "hidden folder, ignored"}


def test_bad_settings(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(ImageError, match="channels must be 1"):
        open_test_folder(root, channels=4)
    with pytest.raises(ImageError, match="image_size must be an integer"):
        open_test_folder(root, image_size=2)


# ---------------------------------------------------------------- npz and arrays

def arrays(n=6, size=8, rng=np.random.default_rng(0)):
    x = rng.integers(0, 256, (n, size, size, 3), np.uint8)  # NHWC
    return x, np.arange(n, dtype=np.int64) % 3


def test_npz_nhwc_and_nchw_give_the_same_source(tmp_path):
    x, y = arrays()
    u = arrays(4)[0]
    np.savez(tmp_path / "hwc.npz", x_labeled=x, y_labeled=y, x_unlabeled=u, x_val=x[:3], y_val=y[:3],
             class_names=np.array(["ant", "bee", "cow"]))
    np.savez(tmp_path / "chw.npz", x_labeled=x.transpose(0, 3, 1, 2), y_labeled=y, x_unlabeled=u.transpose(0, 3, 1, 2),
             x_val=x[:3].transpose(0, 3, 1, 2), y_val=y[:3], class_names=np.array(["ant", "bee", "cow"]))
    hwc, chw = open_npz(tmp_path / "hwc.npz"), open_npz(tmp_path / "chw.npz")
    assert hwc.class_names == ("ant", "bee", "cow") and hwc.name == f"npz:{tmp_path / 'hwc.npz'}"
    assert hwc.image_shape == (3, 8, 8) and hwc.test is None and hwc.labeled.paths is None
    assert np.array_equal(hwc.labeled.images, x.transpose(0, 3, 1, 2))
    assert np.array_equal(chw.labeled.images, hwc.labeled.images) and np.array_equal(chw.val.images, hwc.val.images)
    assert hwc.labeled.labels.tolist() == y.tolist() and hwc.unlabeled.labels is None and len(hwc.unlabeled) == 4


def test_npz_resize_and_channels_use_the_folder_rule(tmp_path):
    x = np.zeros((3, 10, 30, 3), np.uint8)
    x[:, :, 10:20] = RED
    np.savez(tmp_path / "a.npz", x_labeled=x, y_labeled=np.array([0, 1, 1]), x_unlabeled=x[:0])
    source = open_npz(tmp_path / "a.npz", image_size=10, channels=1)
    assert source.image_shape == (1, 10, 10) and (source.labeled.images == 76).all()
    assert source.unlabeled is None and source.class_names == ("0", "1")
    with pytest.raises(ImageError, match="not one square size: pass image_size"):
        open_npz(tmp_path / "a.npz")


def test_npz_class_names_stored_as_bytes_are_decoded(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "a.npz", x_labeled=x, y_labeled=y, x_unlabeled=x[:0],
             class_names=np.array([b"ant", b"bee", "cône".encode()]))  # dtype S: bytes
    assert open_npz(tmp_path / "a.npz").class_names == ("ant", "bee", "cône")
    npz_error(tmp_path, r"class name b'\\xff' is not UTF-8 text", x_labeled=x, y_labeled=y, x_unlabeled=x[:0],
              class_names=np.array([b"ant", b"bee", b"\xff"]))


def npz_error(tmp_path, match, **arrays_):
    np.savez(tmp_path / "bad.npz", **arrays_)
    with pytest.raises(ImageError, match=match) as error:
        open_npz(tmp_path / "bad.npz")
    assert str(tmp_path / "bad.npz") in str(error.value)


def test_npz_bad_arrays(tmp_path):
    x, y = arrays()
    u = x[:2]
    npz_error(tmp_path, "x_labeled is float32, not uint8", x_labeled=x.astype(np.float32), y_labeled=y, x_unlabeled=u)
    npz_error(tmp_path, "x_labeled has rank 2", x_labeled=x[:, 0, 0], y_labeled=y, x_unlabeled=u)
    npz_error(tmp_path, r"neither NCHW nor NHWC", x_labeled=x[..., :2], y_labeled=y, x_unlabeled=u)
    npz_error(tmp_path, "at least 4 x 4", x_labeled=x[:, :3, :3], y_labeled=y, x_unlabeled=u)
    npz_error(tmp_path, r"y_labeled has 5 labels for 6 images", x_labeled=x, y_labeled=y[:5], x_unlabeled=u)
    npz_error(tmp_path, "1-D integer array", x_labeled=x, y_labeled=y.astype(np.float64), x_unlabeled=u)
    npz_error(tmp_path, r"y_val holds label 7, but there are 3 classes", x_labeled=x, y_labeled=y, x_unlabeled=u,
              x_val=x[:1], y_val=np.array([7]))
    npz_error(tmp_path, "negative label -1", x_labeled=x, y_labeled=y - 1, x_unlabeled=u)
    npz_error(tmp_path, f"y_test holds label {2 ** 64 - 1}, out of range", x_labeled=x, y_labeled=y.astype(np.uint64),
              x_unlabeled=u, x_test=x[:2], y_test=np.array([0, 2 ** 64 - 1], np.uint64))  # not wrapped to -1
    # without class_names, K = max label + 1: not a million class names to build, then list as missing
    npz_error(tmp_path, f"y_labeled holds label {10 ** 6}, out of range for 6 labeled images", x_labeled=x,
              y_labeled=np.append(y[:5], 10 ** 6), x_unlabeled=u)
    npz_error(tmp_path, "y_labeled has no image of class cow", x_labeled=x, y_labeled=y % 2, x_unlabeled=u,
              class_names=np.array(["ant", "bee", "cow"]))
    npz_error(tmp_path, "required arrays missing: x_unlabeled", x_labeled=x, y_labeled=y)
    npz_error(tmp_path, "unexpected arrays x_valid", x_labeled=x, y_labeled=y, x_unlabeled=u, x_valid=x)
    npz_error(tmp_path, "x_test is given without y_test", x_labeled=x, y_labeled=y, x_unlabeled=u, x_test=x)
    npz_error(tmp_path, r"holds Python objects \(a pickle\), refused", x_labeled=x, y_labeled=y, x_unlabeled=u,
              class_names=np.array([{"a": 1}, "b", "c"], dtype=object))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ImageError, match="not a readable .npz"):
        open_npz(tmp_path / "text.npz")
    with pytest.raises(ImageError, match="not found"):
        open_npz(tmp_path / "missing.npz")


def test_a_damaged_npz_says_so_and_is_not_called_a_pickle(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "good.npz", x_labeled=x, y_labeled=y, x_unlabeled=x[:2])
    whole = (tmp_path / "good.npz").read_bytes()
    flipped = bytearray(whole)
    flipped[whole.index(b"\x93NUMPY") + 200] ^= 0xFF  # in x_labeled's pixels: its CRC no longer matches
    header = io.BytesIO()
    np.lib.format.write_array(header, x[:3])  # a member holding 3 images under a header that claims 6
    short = header.getvalue().replace(b"(3, 8, 8, 3)", b"(6, 8, 8, 3)")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as npz:
        npz.writestr("x_labeled.npy", short)
        for name, array in (("y_labeled", y), ("x_unlabeled", x[:2])):
            member = io.BytesIO()
            np.lib.format.write_array(member, array)
            npz.writestr(f"{name}.npy", member.getvalue())
    for name, data, why in (("half.npz", whole[:len(whole) // 2], "File is not a zip file"),
                            ("flipped.npz", bytes(flipped), "x_labeled: BadZipFile: Bad CRC-32"),
                            ("short.npz", None, "x_labeled: ValueError: EOF")):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError) as error:
            open_npz(tmp_path / name)
        assert str(error.value).startswith(f"{tmp_path / name} is damaged, not a valid .npz (")
        assert why in str(error.value) and "copy it again" in str(error.value) and "pickle" not in str(error.value)


def test_from_arrays_takes_tensors_without_copying(tmp_path):
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    source = from_arrays(x, torch.tensor([0, 1, 0, 1, 0, 1]), x_unlabeled=x[:2].numpy(), class_names=["a", "b"])
    assert np.shares_memory(source.labeled.images, x.numpy()) and source.image_shape == (1, 8, 8)
    assert source.name == "arrays" and source.class_names == ("a", "b") and source.val is None
    assert source.labeled.labels.dtype == np.int64
    rgb = from_arrays(x, torch.tensor([0, 1, 0, 1, 0, 1]), channels=3)
    assert rgb.image_shape == (3, 8, 8) and np.array_equal(rgb.labeled.images[:, 2], x.numpy()[:, 0])
    with pytest.raises(ImageError, match="arrays: y_labeled has 2 labels for 6 images"):
        from_arrays(x, torch.tensor([0, 1]))


# ---------------------------------------------------------------- describe

def test_describe_folder_before_and_after_decoding(tmp_path):
    root = make_folder(tmp_path / "d", test=True)
    (root / "unlabeled" / "notes.txt").write_text("x")
    save(root / "unlabeled" / "wide.png", solid(RED, size=(12, 8)))
    text = describe(f"folder:{root}")
    assert "labeled           5 images  cat: 3, dog: 2" in text
    assert "unlabeled         5 images" in text and "test              2 images  cat: 1, dog: 1" in text
    assert "sizes seen: 8x8 (13), 12x8 (1)" in text and "modes seen: RGB (14)" in text
    assert "notes.txt: not an image file (.txt), ignored" in text and "cache: none" in text
    source = open_test_folder(root)
    assert "current" in describe(f"folder:{root}")
    assert "images: 3x8x8 (C x H x W) uint8" in describe(source) and "built by this open" in describe(source)
    assert "reused" in describe(open_test_folder(root))
    save(root / "unlabeled" / "more.png", solid(RED))
    assert "stale (files changed since" in describe(f"folder:{root}")


def test_describe_npz_and_unknown_source(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "a.npz", x_labeled=x, y_labeled=y, x_unlabeled=x)
    text = describe(f"npz:{tmp_path / 'a.npz'}")
    assert "labeled           6 images  0: 2, 1: 2, 2: 2" in text and "val        none" in text
    with pytest.raises(ImageError, match="give folder:PATH"):
        describe(str(tmp_path))


def test_describe_expands_a_home_path(tmp_path, monkeypatch):
    """folder:~/x reached describe unexpanded (no shell expands it after the colon), unlike training."""
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder(tmp_path / "pets", test=True)
    assert "labeled           5 images  cat: 3, dog: 2" in describe("folder:~/pets")
