"""python -m sgan.predict and sgan.load_classifier: the CSV's accuracy on a labeled folder is the run's own, the
Python API agrees with the CSV for every kind of input, and bad files or inputs give messages."""
import concurrent.futures
import csv
import json
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sgan
from sgan.config import parse_config
from sgan.data import read_builtin_split, to_model_scale
from sgan.images import ImageError, _parallel_map, load_image
from sgan.predict import main
from sgan.train import train

CLASSES = [str(k) for k in range(10)]


def write_images(folder, images, labels):
    """uint8 [N, 1, H, W] images as folder/<class>/<i>.png; the paths in order."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / CLASSES[int(label)] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_root):
    """A folder source of MNIST files: 10 labeled images per class, and the first 200 test images in test/."""
    root = tmp_path_factory.mktemp("digits")
    x, y = read_builtin_split("mnist", train=True, root=mnist_root)
    picked = torch.cat([torch.nonzero(y == k)[:10, 0] for k in range(10)])
    write_images(root / "labeled", x[picked], y[picked])
    x, y = read_builtin_split("mnist", train=False, root=mnist_root)
    paths = write_images(root / "test", x[:200], y[:200])
    return root, paths, x[:200], y[:200]


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """A short run whose --dataset is the folder: its metrics.json reports the accuracy on test/."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    train(parse_config(["--dataset", f"folder:{digits[0]}", "--image-size", "28", "--channels", "1",
                        "--recipe", "supervised", "--epochs", "6", "--batch-size", "20", "--lr", "0.002",
                        "--tracker", "none", "--cpu", "--checkpoint-every", "0", "--output-dir", str(out)]))
    return out


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_accuracy_on_a_labeled_folder_is_the_runs_own(run, digits, tmp_path, capsys):
    root, paths, _, labels = digits
    output = tmp_path / "preds.csv"
    assert main([str(run), str(root / "test"), "--output", str(output), "--batch-size", "64", "--device", "cpu"]) == 0
    rows = read_csv(output)
    assert [row["path"] for row in rows] == sorted(map(str, paths))  # every file once, in sorted order
    truth = [row["path"].split("/")[-2] for row in rows]  # the class folder
    accuracy = sum(row["class"] == label for row, label in zip(rows, truth)) / len(rows)
    reported = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert accuracy == reported
    assert 0.3 < accuracy < 1 and len({row["class"] for row in rows}) > 3  # a classifier that tells digits apart
    assert all(0.1 <= float(row["probability"]) <= 1 for row in rows)  # the top class of 10
    assert f"200 images classified by {run}" in capsys.readouterr().out
    assert not (tmp_path / "preds.errors.csv").exists()


def test_the_python_api_agrees_with_the_csv_for_every_input(run, digits, tmp_path):
    root, paths, images, _ = digits
    output = tmp_path / "new" / "preds.csv"  # a folder that does not exist yet is made
    assert main([str(run), *map(str, paths[:40]), "--output", str(output), "--top-k", "3", "--device", "cpu"]) == 0
    rows = read_csv(output)
    classifier = sgan.load_classifier(run)
    assert isinstance(classifier, torch.nn.Module) and not classifier.training
    assert classifier.class_names == tuple(CLASSES) and classifier.image_shape == (1, 28, 28)
    from_files = classifier.predict(paths[:40], batch_size=16)  # several batches
    assert from_files == [row["class"] for row in rows]
    pil_images = [Image.open(p) for p in paths[:40]]
    assert classifier.predict(pil_images) == from_files
    assert classifier.predict(images[:40]) == from_files  # uint8 [N, C, H, W]
    assert classifier.predict(images[:40].numpy()) == from_files
    assert classifier.predict(to_model_scale(images[:40])) == from_files  # floats in the training scale
    assert classifier.predict(str(paths[0])) == from_files[:1]

    probabilities = classifier.predict_proba(images[:40])
    assert probabilities.shape == (40, 10) and torch.allclose(probabilities.sum(dim=1), torch.ones(40))
    top, order = probabilities.topk(3, dim=1)
    for row, p, k in zip(rows, top.tolist(), order.tolist()):
        assert [row["class"], row["class_2"], row["class_3"]] == [CLASSES[i] for i in k]
        assert [float(row["probability"]), float(row["probability_2"]), float(row["probability_3"])] == \
            pytest.approx(p, abs=1e-6)
    # the classes' softmax, for every formulation: this run's D is k-logit, K logits
    logits = classifier.discriminator(to_model_scale(images[:40]))
    assert torch.allclose(probabilities, logits.softmax(dim=1), atol=1e-6)

    # the final checkpoint holds the same weights as model/
    checkpoint = sgan.load_classifier(run / "checkpoints" / "step_00000030")
    assert checkpoint.predict(images[:40]) == from_files


def test_files_are_decoded_as_training_decoded_them(run, tmp_path):
    """A colour JPEG of another size: fitted (centred square, scaled, grey) by sgan.images' rule, whichever
    way it is given."""
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    classifier = sgan.load_classifier(run)
    pixels = torch.from_numpy(load_image(path, 28, 1))[None]
    expected = classifier.predict_proba(pixels)
    assert torch.equal(classifier.predict_proba([path]), expected)
    with Image.open(path) as image:
        assert torch.equal(classifier.predict_proba(image), expected)


def test_bad_files_are_listed_not_fatal(run, digits, tmp_path, capsys):
    root, paths, _, _ = digits
    folder = tmp_path / "mixed"
    (folder / "deep").mkdir(parents=True)
    good = folder / "deep" / "good.png"
    good.write_bytes(paths[0].read_bytes())
    (folder / "broken.png").write_bytes(paths[1].read_bytes()[:60])  # truncated
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    text = tmp_path / "text.png"
    text.write_text("a text file named .png")
    output = tmp_path / "out" / "preds.csv"
    output.parent.mkdir()
    assert main([str(run), str(folder), str(text), str(tmp_path / "missing.png"), "--output", str(output),
                 "--device", "cpu"]) == 0
    assert [row["path"] for row in read_csv(output)] == [str(good)]
    errors = {row["path"]: row["error"] for row in read_csv(tmp_path / "out" / "preds.errors.csv")}
    assert set(errors) == {str(folder / "broken.png"), str(folder / "empty.jpg"), str(text),
                           str(tmp_path / "missing.png")}
    assert errors[str(tmp_path / "missing.png")] == "no such file or folder"
    assert "not a readable image" in errors[str(text)]
    printed = capsys.readouterr().out
    assert "1 images classified" in printed and "4 could not be read" in printed

    # nothing readable: exit 1; a later clean run removes the stale error list
    assert main([str(run), str(text), "--output", str(output), "--device", "cpu"]) == 1
    assert main([str(run), str(good), "--output", str(output), "--device", "cpu"]) == 0
    assert not (tmp_path / "out" / "preds.errors.csv").exists()


def test_parallel_decoding_writes_what_serial_decoding_does(run, digits, tmp_path, monkeypatch, capsys):
    """Files decoded by 2 processes, in chunks and batches that do not divide the files, with bad files among
    them: the same rows in the same order, and the same errors, as decoding them here one by one."""
    root, paths, _, _ = digits
    files = [str(p) for p in paths[:45]]
    for i in (3, 11, 12, 44):  # unreadable files: early, across a batch edge, last
        bad = tmp_path / f"bad{i}.png"
        bad.write_bytes(paths[i].read_bytes()[:50])
        files[i] = str(bad)
    pools = []
    real_pool = concurrent.futures.ProcessPoolExecutor
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor",
                        lambda workers, **kw: pools.append(workers) or real_pool(workers, **kw))
    outputs = {}
    for workers in ("1", "2"):
        output = tmp_path / f"preds{workers}.csv"
        assert main([str(run), *files, "--output", str(output), "--batch-size", "5", "--workers", workers,
                     "--device", "cpu"]) == 0
        outputs[workers] = (output.read_text(), (tmp_path / f"preds{workers}.errors.csv").read_text())
    assert pools == [2], "--workers 1 decodes in this process, --workers 2 in a pool of 2"
    assert multiprocessing.active_children() == [], "the pool's processes are gone"
    rows = read_csv(tmp_path / "preds2.csv")
    assert [row["path"] for row in rows] == [f for i, f in enumerate(files) if i not in (3, 11, 12, 44)]
    assert outputs["1"] == outputs["2"]
    errors = read_csv(tmp_path / "preds2.errors.csv")
    assert [row["path"] for row in errors] == [files[3], files[11], files[12], files[44]]
    assert all(row["error"].startswith("not a readable image") for row in errors)
    classifier = sgan.load_classifier(run)
    assert [row["class"] for row in rows] == classifier.predict([row["path"] for row in rows])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(run), files[0], "--output", str(tmp_path / "p.csv"), "--workers", "0"])
    assert exit_.value.code == 2 and "--workers must be >= 1" in capsys.readouterr().err


def die_on_the_fifth(task):
    """A decoding task whose process is killed (as the system's out-of-memory killer would) on task 5."""
    if task == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return task


def test_a_decoding_process_that_dies_is_an_error_not_a_hang():
    started = time.monotonic()
    with pytest.raises(ImageError, match="a process decoding images died .* --workers 1 for sgan.predict"):
        list(_parallel_map(die_on_the_fifth, list(range(40)), workers=2, desc="", progress=False))
    assert time.monotonic() - started < 60
    assert multiprocessing.active_children() == []


def finishes(call, fifo, seconds=20):
    """call() in a thread: what it returns or raises, or a failure when it still waits on `fifo` after `seconds`."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(call)
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer: the blocked open returns, the thread ends
            pytest.fail(f"blocked opening the FIFO {fifo}")


def test_a_fifo_named_like_an_image_is_unreadable_not_a_hang(run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (28, 28)).save(folder / "good.png")
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)  # opening it would wait for a writer, forever
    output = tmp_path / "preds.csv"
    for paths in ([folder], [fifo, folder / "good.png"]):  # found in a folder, or named
        assert finishes(lambda: main([str(run), *map(str, paths), "--output", str(output), "--device", "cpu"]),
                        fifo) == 0
        assert [row["path"] for row in read_csv(output)] == [str(folder / "good.png")]
        assert read_csv(tmp_path / "preds.errors.csv") == [
            {"path": str(fifo), "error": "not a readable image (a FIFO, not a regular file); PNG, JPEG, BMP, WebP "
                                         "and GIF are read"}]
    with pytest.raises(ImageError, match=r"pipe\.png: not a readable image \(a FIFO, not a regular file\)"):
        finishes(lambda: load_image(fifo, 28, 1), fifo)


@pytest.mark.parametrize("args, message", [
    (["NOWHERE", "x.png"], "no such directory"),
    (["RUN", "EMPTY"], "no image files in"),
    (["RUN", "x.png", "--top-k", "11"], "--top-k 11: the run has 10 classes"),
    (["RUN", "x.png", "--device", "nonsense"], "--device nonsense"),
])
def test_bad_arguments_fail_with_a_message(run, tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(run) if a == "RUN" else str(tmp_path / a) if a in ("NOWHERE", "EMPTY") else a for a in args]
    assert main([*args, "--output", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_float_images_in_the_to_tensor_scale_get_a_warning(run):
    """[0, 1] floats (torchvision's ToTensor) passed the [-1, 1] check and gave wrong classes without a word;
    a batch with values below 0 is plainly in the training scale and gets none."""
    classifier = sgan.load_classifier(run)
    with pytest.warns(UserWarning, match="if they are in \\[0, 1\\], as torchvision's ToTensor makes them"):
        classifier.predict(torch.rand(2, 1, 28, 28))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classifier.predict(torch.rand(2, 1, 28, 28) * 2 - 1)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(1, 28, 28, dtype=torch.uint8), "add the batch dimension"),
    (torch.zeros(2, 28, 28, 1, dtype=torch.uint8), "channels last?"),
    (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "C x H x W = 1x28x28"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "C x H x W = 1x28x28"),
    (torch.full((2, 1, 28, 28), 255.0), "outside the training scale [-1, 1]"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.int64), "dtype torch.int64"),
    ([1, 2], "a list holds file paths or PIL images"),
    ([], "no images given"),
    ("missing.png", "missing.png: not a readable image"),
    (torch.zeros(3, 1, 28, 28).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))),
     "1 of the 3 images hold NaN or infinite values"),  # NaN passed the range check and got a class
    (torch.full((2, 1, 28, 28), float("-inf")), "2 of the 2 images hold NaN or infinite values"),
])
def test_wrong_inputs_are_refused_with_a_message(run, images, message):
    with pytest.raises(ImageError, match=None) as error:
        sgan.load_classifier(run).predict(images)
    assert message in str(error.value)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_that_is_not_a_count_is_refused(run, batch_size):
    with pytest.raises(ValueError, match="it must be a whole number of images, 1 or more"):
        sgan.load_classifier(run).predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), batch_size=batch_size)


def test_a_file_named_by_two_paths_is_predicted_once(tmp_path):
    """`predict RUN new new/circle` wrote new/circle's images twice and counted them twice."""
    from sgan.predict import find_images

    (tmp_path / "new" / "circle").mkdir(parents=True)
    for name in ("new/a.png", "new/circle/b.png", "new/circle/c.png"):
        Image.new("L", (4, 4)).save(tmp_path / name)
    new, circle = str(tmp_path / "new"), str(tmp_path / "new" / "circle")
    os.symlink(tmp_path / "new" / "a.png", tmp_path / "new" / "latest.png")  # another name: a row of its own
    files, missing = find_images([new, circle, str(tmp_path / "new" / "circle" / "b.png"), str(tmp_path / "gone")])
    assert files == [os.path.join(new, "a.png"), os.path.join(new, "latest.png"), os.path.join(circle, "b.png"),
                     os.path.join(circle, "c.png")]
    assert missing == [(str(tmp_path / "gone"), "no such file or folder")]
