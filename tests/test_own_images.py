"""Training on your own images: a folder, an npz file or in-memory arrays, with validation and test splits."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sgan.config import parse_config
from sgan.data import choose_validation, split_labeled_pool, stratified_counts
from sgan.images import from_arrays
from sgan.train import main, train

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog house", "éclair")  # spaces and unicode in class names
LABELED = {"cat": 2, "dog house": 5, "éclair": 3}  # unbalanced


def draw(label: int, rng) -> np.ndarray:
    """A 20x24 RGB image whose class shows in its colour, so that a few steps can learn something."""
    image = rng.integers(0, 60, size=(20, 24, 3), dtype=np.uint8)
    image[..., label] += 150
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "photos"
    rng = np.random.default_rng(0)
    for split, per_class in (("labeled", LABELED), ("val", dict.fromkeys(CLASSES, 4)), ("test", dict.fromkeys(CLASSES, 6))):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class[name]):
                Image.fromarray(draw(c, rng)).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    for i in range(40):
        (root / "unlabeled" / f"batch{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw(i % 3, rng)).save(root / "unlabeled" / f"batch{i % 3}" / f"{i}.png")
    return root


def flags(out, *extra):
    return ["--tracker", "none", "--cpu", "--output-dir", str(out), "--batch-size", "8", *map(str, extra)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGAN_CACHE_DIR", str(tmp_path / "cache"))


def test_a_folder_trains_end_to_end_with_validation_and_test(tmp_path, folder):
    out = tmp_path / "run"
    assert main(flags(out, "--dataset", f"folder:{folder}", "--image-size", "32", "--max-steps", "4")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == sorted(CLASSES)
    assert metrics["labeled_per_class"] == {name: LABELED[name] for name in sorted(CLASSES)}  # all, by default
    assert metrics["num_labels"] == 10 and metrics["num_val"] == 12
    assert 0 <= metrics["val_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert set(metrics["history"][-1]) >= {"val_accuracy", "test_accuracy"}
    labeled = json.loads((out / "labeled_indices.json").read_text())
    assert labeled["class_names"] == sorted(CLASSES) and len(labeled["indices"]) == 10
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(out), "--cpu", "--out", str(tmp_path / "eval")]) == 0  # rebuilt from config.yaml
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluated["num_images"] == 18
    assert evaluated["num_labels"] == 10 and evaluated["step"] == 4  # the count behind --num-labels auto
    assert round(evaluated["test_accuracy"] * 18) == round(metrics["test_accuracy"] * 18)  # the same images right


def test_num_labels_takes_a_stratified_subset_of_a_folder(tmp_path, folder):
    metrics = train(parse_config(flags(tmp_path / "run", "--dataset", f"folder:{folder}", "--image-size", "32",
                                       "--max-steps", "1", "--num-labels", "6", "--recipe", "supervised")))
    assert metrics["num_labels"] == 6
    assert all(count >= 1 for count in metrics["labeled_per_class"].values())  # every class keeps an image
    assert metrics["labeled_per_class"]["dog house"] >= metrics["labeled_per_class"]["cat"]  # in proportion


def test_in_memory_arrays_train_without_validation(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.arange(12) % 3
    images = np.stack([draw(c, rng) for c in labels]).transpose(0, 3, 1, 2)[:, :, :16, :16]
    source = from_arrays(torch.from_numpy(images), torch.from_numpy(labels), images.repeat(2, axis=0),
                         x_test=images, y_test=labels)
    metrics = train(parse_config(flags(tmp_path / "run", "--max-steps", "2", "--recipe", "supervised",
                                       "--image-size", "16")), source)
    assert metrics["val_accuracy"] is None and metrics["num_val"] == 0
    assert metrics["test_accuracy"] is not None and metrics["num_labels"] == 12
    # config.yaml says what the run trained on (it said mnist, --dataset's default, so rerunning it trained on MNIST)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dataset"] == "arrays"
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(tmp_path / "run"), "--cpu"]) == 1
    assert "given from Python (sgan.images.from_arrays); they cannot be opened again" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "run" / "config.yaml"), "--resume", "latest"]) == 1  # nor retrained
    npz = tmp_path / "test.npz"
    np.savez(npz, x_labeled=images, y_labeled=labels, x_unlabeled=images[:0], x_test=images, y_test=labels)
    assert evaluate_main([str(tmp_path / "run"), "--cpu", "--dataset", f"npz:{npz}", "--out", str(tmp_path / "e")]) == 0


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "from_arrays" in block)
    rng = np.random.default_rng(2)
    labels = np.arange(30) % 3
    images = np.stack([draw(c, rng) for c in labels]).transpose(0, 3, 1, 2)[:, :, :16, :16].copy()
    monkeypatch.chdir(tmp_path)
    namespace = {"x_labeled": images, "y_labeled": labels, "x_unlabeled": images, "x_test": images, "y_test": labels}
    example = example.replace('"--epochs", "5"', '"--max-steps", "2", "--batch-size", "10", "--image-size", "16"')
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["metrics"]["steps"] == 2 and (tmp_path / "runs" / "arrays" / "metrics.json").is_file()


def test_validation_is_held_out_of_the_labeled_subset_and_the_unlabeled_stream(tmp_path, mnist_root):
    from accelerate import Accelerator

    from sgan.train import load_data

    config = parse_config(["--val-size", "500", "--num-labels", "100", "--cpu", "--data-root", str(mnist_root)])
    data = load_data(config, Accelerator(cpu=True))
    validation = data.validation_indices
    assert len(validation) == 500 and len(data.evaluation["val"][1]) == 500
    assert np.bincount(data.evaluation["val"][1].numpy(), minlength=10).tolist() == [50] * 10  # class-balanced
    assert not set(validation) & set(data.labeled_indices)
    assert not set(validation) & set(data.unlabeled_rows.tolist())
    assert len(data.unlabeled_rows) == 60000 - 500
    # without --val-size, the same labeled subset as always (published runs depend on it)
    plain = split_labeled_pool(data.source.labeled.labels, 100, 0, data.source.class_names, 0, builtin=True)[0]
    from sgan.data import select_labeled_indices

    assert np.array_equal(plain, select_labeled_indices(data.source.labeled.labels, 100, 10, 0))


def test_label_seed_fixes_the_labeled_and_validation_images_while_seed_varies(tmp_path, mnist_root):
    from accelerate import Accelerator

    from sgan.train import load_data

    def split(*flags):
        config = parse_config(["--val-size", "100", "--num-labels", "20", "--cpu", "--data-root", str(mnist_root),
                               *flags])
        data = load_data(config, Accelerator(cpu=True))
        return data.labeled_indices.tolist(), data.validation_indices.tolist()

    fixed = split("--seed", "0", "--label-seed", "7")
    assert split("--seed", "1", "--label-seed", "7") == fixed  # --seed no longer moves the labeled images
    assert split("--seed", "7") == fixed  # --label-seed S chooses as --seed S does without it
    plain = split("--seed", "0")
    assert plain[0] != fixed[0] and plain[1] != fixed[1]


def test_label_and_validation_budgets_that_cannot_be_met_say_why():
    with pytest.raises(ValueError, match="fewer than the 3 classes"):
        stratified_counts([5, 5, 5], 2, "--num-labels")
    with pytest.raises(ValueError, match="more than the 15 labeled images"):
        stratified_counts([5, 5, 5], 16, "--num-labels")
    assert stratified_counts([1, 10, 100], 10, "--num-labels").tolist() == [1, 1, 8]
    with pytest.raises(ValueError, match="class 'cat', which has 2"):
        choose_validation(np.array([0, 0, 1, 1, 1, 2, 2, 2]), 6, 3, 0, CLASSES)


def test_skipped_files_are_listed_in_the_output_dir(tmp_path, folder, capsys):
    """--skip-bad-images (a bare flag, as the error message spells it) leaves a broken image out, and the run
    names it: a line on stdout and OUTPUT_DIR/skipped_files.csv with the reason."""
    import csv
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(folder, root)
    (root / "labeled" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "unlabeled" / "notes.txt").write_text("not an image either")
    out = tmp_path / "run"
    settings = ["--dataset", f"folder:{root}", "--image-size", "32", "--max-steps", "1", "--recipe", "supervised"]
    assert main(flags(out, *settings)) == 1  # without the flag: an error that names the file
    assert "broken.png" in capsys.readouterr().err
    assert main(flags(out, *settings, "--skip-bad-images")) == 0
    assert "left out 2 file(s) of the folder (1 unreadable image(s))" in capsys.readouterr().out
    with (out / "skipped_files.csv").open(newline="") as file:
        rows = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(file)}
    assert set(rows) == {"broken.png", "notes.txt"} and rows["broken.png"].startswith("bad image, skipped")
    assert json.loads((out / "metrics.json").read_text())["labeled_per_class"]["cat"] == LABELED["cat"]


def test_max_steps_beyond_the_epochs_says_the_run_trains_the_epochs(tmp_path, folder, capsys):
    """--max-steps only cuts a run short: beyond --epochs' steps the run says how many it trains, and why."""
    metrics = train(parse_config(flags(tmp_path / "run", "--dataset", f"folder:{folder}", "--image-size", "32",
                                       "--recipe", "supervised", "--max-steps", "50")))
    steps = metrics["steps"]
    assert steps < 50  # one epoch of the folder's 40 unlabeled images
    assert f"--max-steps 50 is more than the {steps} steps of --epochs 1, so the run trains {steps}" in \
        capsys.readouterr().out


def test_too_few_steps_in_all_is_a_warning_that_says_which_epochs_are_enough(tmp_path, folder, capsys):
    """--epochs 1 (the default) on a small folder trained a handful of steps without a word."""
    train(parse_config(flags(tmp_path / "run", "--dataset", f"folder:{folder}", "--recipe", "supervised")))
    out = capsys.readouterr().out
    assert "sgan: warning: 5 steps in all (1 epoch(s) of 5: 40 training images in batches of 8 x 1) is too few" \
        in out and "--epochs 100 trains 500+ steps" in out
    train(parse_config(flags(tmp_path / "more", "--dataset", f"folder:{folder}", "--recipe", "supervised",
                             "--epochs", "100", "--max-steps", "3")))
    assert "too few to learn much" not in capsys.readouterr().out


def test_evaluate_scores_the_validation_images_a_run_held_out(tmp_path, mnist_root, capsys):
    """--split val of a --val-size run scores the images training held out (it said the source had none)."""
    from sgan.evaluate import main as evaluate_main

    out = tmp_path / "run"
    metrics = train(parse_config(["--tracker", "none", "--cpu", "--output-dir", str(out), "--data-root",
                                  str(mnist_root), "--recipe", "supervised", "--val-size", "50", "--max-steps", "3"]))
    assert evaluate_main([str(out), "--cpu", "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluated["num_images"] == 50 and evaluated["split"] == "val"
    assert round(evaluated["test_accuracy"] * 50) == round(metrics["val_accuracy"] * 50)  # the same 50 images
    record = json.loads((out / "labeled_indices.json").read_text())
    (out / "labeled_indices.json").write_text(json.dumps({**record, "validation_indices": [10 ** 9]}))
    assert evaluate_main([str(out), "--cpu", "--split", "val", "--out", str(tmp_path / "eval2")]) == 1
    assert "validation_indices are not indices of mnist's 60000 labeled images" in capsys.readouterr().err


@pytest.mark.parametrize("inside", ["labeled/circle/run", "unlabeled/runs/a", "test", "SYMLINKED/run"])
def test_an_output_dir_inside_the_image_folders_is_refused(tmp_path, folder, capsys, inside):
    """There, the run's samples.png (G's fakes) became a labeled circle, or an unlabeled image, next time."""
    import shutil

    folder = Path(shutil.copytree(folder, tmp_path / "photos"))  # the shared folder stays clean if this fails
    output_dir, split = folder / inside, inside.split("/")[0]
    if split == "SYMLINKED":  # labeled/ is a link: its target is the same folder by another name
        (folder / "labeled").rename(tmp_path / "kept")
        (folder / "labeled").symlink_to(tmp_path / "kept")
        output_dir, split = tmp_path / "kept" / "run", "labeled"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(flags(output_dir, "--dataset", f"folder:{folder}", "--max-steps", "1")) == 1
    assert f"is inside {folder / split}: the run's own pictures" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written there


def test_a_folder_run_resumes_with_its_defaults_spelled_out(tmp_path, folder):
    """Resumed with --image-size 32 (the README's value), a run started without it was refused: 'image_size:
    checkpoint None, this run 32'; so were --num-labels all and --label-seed equal to --seed. Its older
    checkpoint, beside the new config.yaml, is still evaluated."""
    from sgan.evaluate import main as evaluate_main

    out = tmp_path / "run"
    train(parse_config(flags(out, "--dataset", f"folder:{folder}", "--max-steps", "2", "--recipe", "supervised")))
    metrics = train(parse_config(flags(out, "--dataset", f"folder:{folder}", "--max-steps", "3", "--recipe",
                                       "supervised", "--image-size", "32", "--num-labels", "all", "--label-seed", "0",
                                       "--resume", "latest")))
    assert metrics["steps"] == 3 and metrics["resumed_from"].endswith("step_00000002")
    assert evaluate_main([str(out / "checkpoints" / "step_00000002"), "--cpu", "--out", str(tmp_path / "ev")]) == 0


def test_a_folder_of_one_class_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(3)
    (tmp_path / "one" / "labeled" / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(draw(0, rng)).save(tmp_path / "one" / "labeled" / "cat" / f"{i}.png")
    assert main(flags(tmp_path / "run", "--dataset", f"folder:{tmp_path / 'one'}", "--max-steps", "1")) == 1
    assert "has one class (cat): a classifier needs two or more" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the output dir is made


def test_evaluating_a_run_whose_images_moved_says_to_point_at_them(tmp_path, folder, capsys):
    import shutil

    from sgan.evaluate import main as evaluate_main

    root = tmp_path / "photos"
    shutil.copytree(folder, root)
    out = tmp_path / "run"
    assert main(flags(out, "--dataset", f"folder:{root}", "--image-size", "32", "--max-steps", "1", "--recipe",
                      "supervised")) == 0
    root.rename(tmp_path / "moved")
    assert evaluate_main([str(out), "--cpu", "--out", str(tmp_path / "e")]) == 1
    assert "which is not there any more: if the images moved, pass --dataset folder:NEW_PATH" in capsys.readouterr().err
    assert evaluate_main([str(out), "--cpu", "--dataset", f"folder:{tmp_path / 'moved'}", "--out",
                          str(tmp_path / "e")]) == 0


def test_a_relative_folder_is_recorded_as_the_folder_it_named(tmp_path, folder, monkeypatch):
    """config.yaml recorded folder:photos as typed, so evaluating or resuming from another directory silently
    used whatever photos/ was there."""
    import shutil

    from sgan.evaluate import main as evaluate_main

    (tmp_path / "here").mkdir()
    shutil.copytree(folder, tmp_path / "here" / "photos")
    monkeypatch.chdir(tmp_path / "here")
    out = tmp_path / "run"
    assert main(flags(out, "--dataset", "folder:photos", "--image-size", "32", "--max-steps", "2", "--recipe",
                      "supervised")) == 0
    recorded = f"folder:{tmp_path / 'here' / 'photos'}"
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == recorded
    (tmp_path / "there" / "photos").mkdir(parents=True)  # another photos/, with one class: no run's images
    monkeypatch.chdir(tmp_path / "there")
    assert evaluate_main([str(out), "--cpu", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["num_images"] == 18  # the run's own test
    assert main(flags(out, "--config", out / "config.yaml", "--max-steps", "3", "--resume", "latest")) == 0
    for state_file in (out / "checkpoints").glob("step_*/trainer_state.json"):  # as runs before this recorded it
        state = json.loads(state_file.read_text())
        state["fingerprint"]["dataset"] = "folder:photos"
        state_file.write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path / "here")  # from the directory it ran in, an old run resumes as before
    assert main(flags(out, "--dataset", "folder:photos", "--image-size", "32", "--recipe", "supervised",
                      "--max-steps", "4", "--resume", "latest")) == 0
    old = out / "checkpoints" / "step_00000003"  # records folder:photos; config.yaml now the absolute path
    assert json.loads((old / "trainer_state.json").read_text())["fingerprint"]["dataset"] == "folder:photos"
    assert evaluate_main([str(old), "--cpu", "--out", str(tmp_path / "old")]) == 0
