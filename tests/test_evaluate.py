"""python -m sgan.evaluate: the numbers match training's, the files are valid, bad inputs fail clearly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from sgan.config import parse_config
from sgan.data import load_split
from sgan.evaluate import main
from sgan.train import train

from launch_helpers import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trained(out, root, *flags):
    train(parse_config(["--tracker", "none", "--cpu", "--output-dir", str(out), "--data-root", str(root),
                        "--batch-size", "20", "--checkpoint-every", "0", *flags]))
    return out


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, mnist_root):
    return trained(tmp_path_factory.mktemp("eval") / "odena", mnist_root, "--max-steps", "12")


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory, mnist_root):
    return trained(tmp_path_factory.mktemp("eval") / "supervised", mnist_root, "--max-steps", "2", "--recipe",
                   "supervised", "--formulation", "two-head")


def reported_accuracy(run):
    return json.loads((run / "metrics.json").read_text())["test_accuracy"]


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()  # decodes the chunks: a truncated file fails here
        assert min(image.size) >= 100, image.size


def test_evaluation_matches_training_and_is_consistent(seed_run, mnist_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(seed_run), "--cpu", "--data-root", str(mnist_root), "--out", str(out), "--batch-size", "700"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text())
    accuracy = reported_accuracy(seed_run)
    assert round(result["test_accuracy"] * 10000) == round(accuracy * 10000)  # the same test images right
    assert f"test accuracy {accuracy:.4f}" in printed
    assert "confusion matrix" in printed and "T-shirt" not in printed

    matrix = torch.tensor(result["confusion_matrix"])
    _, labels = load_split("mnist", train=False, root=mnist_root)
    assert matrix.shape == (10, 10) and int(matrix.sum()) == 10000 == result["num_images"]
    assert int(matrix.trace()) / 10000 == pytest.approx(result["test_accuracy"], abs=1e-12)
    assert matrix.sum(dim=1).tolist() == torch.bincount(labels, minlength=10).tolist()  # rows are the true classes
    for k, row in enumerate(result["per_class"]):
        assert row["class"] == k and row["name"] == str(k)
        assert row["correct"] == matrix[k, k] and row["count"] == matrix[k].sum()
        assert row["accuracy"] == pytest.approx(row["correct"] / row["count"])
        assert f"{row['accuracy']:.4f}" in printed
    assert result["source"] == str(seed_run) and result["kind"] == "run"
    assert_valid_png(out / "confusion_matrix.png")
    assert_valid_png(out / "evaluation_samples.png")
    assert not (seed_run / "evaluation.json").exists()  # --out was honoured


def test_checkpoint_folder_evaluates_to_the_same_accuracy(seed_run, mnist_root, capsys):
    checkpoint = seed_run / "checkpoints" / "step_00000012"  # the final checkpoint: the same weights as model/
    assert main([str(checkpoint), "--cpu", "--data-root", str(mnist_root)]) == 0
    result = json.loads((checkpoint / "evaluation.json").read_text())  # default --out: the path evaluated
    assert result["kind"] == "checkpoint" and result["step"] == 12
    assert round(result["test_accuracy"] * 10000) == round(reported_accuracy(seed_run) * 10000)
    assert_valid_png(checkpoint / "evaluation_samples.png")
    assert "checkpoint, step 12" in capsys.readouterr().out


def test_checkpoint_of_a_multi_process_run(seed_run, mnist_root, tmp_path):
    """accelerate saves the model as prepared there: a DDP-wrapped D's keys may start with 'module.'."""
    run = tmp_path / "ddp"
    shutil.copytree(seed_run, run)
    weights = run / "checkpoints" / "step_00000012" / "model.safetensors"
    save_file({f"module.{k}": v for k, v in load_file(str(weights)).items()}, str(weights))
    assert main([str(weights.parent), "--cpu", "--data-root", str(mnist_root), "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert round(result["test_accuracy"] * 10000) == round(reported_accuracy(seed_run) * 10000)


def test_supervised_run_has_no_sample_grid(supervised_run, mnist_root, tmp_path):
    assert main([str(supervised_run), "--cpu", "--data-root", str(mnist_root), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["formulation"] == "two-head"  # the head size came from config.yaml
    assert round(result["test_accuracy"] * 10000) == round(reported_accuracy(supervised_run) * 10000)
    assert "samples" not in result["files"] and not (tmp_path / "evaluation_samples.png").exists()
    assert_valid_png(tmp_path / "confusion_matrix.png")


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def strip_record(run):
    """The weights file as sgan wrote it before it recorded the training in the metadata."""
    weights = run / "model" / "discriminator.safetensors"
    save_file(load_file(str(weights)), str(weights))


def edit_config(run, **changes):
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, **changes}))


@pytest.mark.parametrize("damage, names, message", [
    (lambda run: shutil.rmtree(run / "model") or (run / "config.yaml").unlink(), "", "neither a run directory"),
    (lambda run: shutil.rmtree(run), "", "no such directory"),
    (lambda run: truncate(run / "model" / "discriminator.safetensors"), "discriminator.safetensors", "corrupt"),
    (lambda run: truncate(run / "model" / "generator.safetensors"), "generator.safetensors", "corrupt"),
    (lambda run: (run / "model" / "discriminator.safetensors").unlink(), "discriminator.safetensors", "missing"),
    (lambda run: edit_config(run, learning_rate=0.1), "config.yaml", "unknown keys learning_rate"),
    (lambda run: edit_config(run, d_width=16), "discriminator.safetensors", "d_width: config.yaml 16, the weights 32"),
    (lambda run: edit_config(run, formulation="two-head"), "config.yaml", "does not describe the weights"),
    (lambda run: edit_config(run, dataset="fashion-mnist"), "config.yaml", "dataset: config.yaml 'fashion-mnist'"),
    (lambda run: strip_record(run) or edit_config(run, d_width=16), "discriminator.safetensors",
     "do not match the architecture"),  # weights from before sgan recorded their training: config.yaml rules
    (lambda run: edit_config(run, formulation="softmax"), "config.yaml", "is not one of"),
    (lambda run: (run / "config.yaml").write_text("[1, 2"), "config.yaml", "not valid YAML"),
])
def test_bad_inputs_fail_with_a_message(seed_run, mnist_root, tmp_path, capsys, damage, names, message):
    run = tmp_path / "copy"
    shutil.copytree(seed_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    damage(run)
    assert main([str(run), "--cpu", "--data-root", str(mnist_root), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and names in err, err
    assert not (tmp_path / "out" / "evaluation.json").exists()


@pytest.mark.parametrize("device", ["meta", "nonsense", "hpu"])
def test_a_device_that_cannot_run_the_model_is_a_message(seed_run, mnist_root, tmp_path, capsys, device):
    """--device meta passed the check (it makes empty tensors) and failed later in a NotImplementedError."""
    assert main([str(seed_run), "--device", device, "--data-root", str(mnist_root), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}: not usable here") and "use --device cpu" in err, err


def test_command_line_entry_points(seed_run, mnist_root, tmp_path):
    env_flags = ["--cpu", "--data-root", str(mnist_root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # launch/evaluate.py imports sgan, installed or not
    ok = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), str(seed_run), "--out", str(tmp_path),
                         *env_flags], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"test accuracy {reported_accuracy(seed_run):.4f}" in ok.stdout

    broken = tmp_path / "broken"
    shutil.copytree(seed_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    truncate(broken / "model" / "discriminator.safetensors")
    bad = subprocess.run([sys.executable, "-m", "sgan.evaluate", str(broken), *env_flags], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr and "discriminator.safetensors" in bad.stderr, bad.stderr


def write_folder(root, images, labels, class_names):
    """A folder source whose labeled/ and test/ both hold `images` (uint8 [N, 1, H, W]) as PNG files."""
    for split in ("labeled", "test"):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / class_names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    return root


def test_a_checkpoint_is_checked_against_its_own_record(seed_run, mnist_root, tmp_path, capsys):
    """An MNIST checkpoint under a config.yaml edited to say fashion-mnist is refused, naming both."""
    run = tmp_path / "copy"
    shutil.copytree(seed_run, run)
    edit_config(run, dataset="fashion-mnist")
    checkpoint = run / "checkpoints" / "step_00000012"
    (checkpoint / "evaluation.json").unlink(missing_ok=True)  # an earlier test's
    assert main([str(checkpoint), "--cpu", "--data-root", str(mnist_root)]) == 1
    err = capsys.readouterr().err
    assert "dataset: config.yaml 'fashion-mnist', the weights 'mnist'" in err and "trainer_state.json" in err, err
    assert not (checkpoint / "evaluation.json").exists()


def edit_json(file, change):
    values = json.loads(file.read_text())
    file.write_text(json.dumps(change(values)))


def without_names(state):
    return {key: value for key, value in state.items() if key != "class_names"}  # as checkpoints before 29fa67a


@pytest.mark.parametrize("damage, name, message", [
    (lambda run, state: state.write_text("[]"), "trainer_state.json", "(a JSON list, not the object sgan writes)"),
    (lambda run, state: edit_json(state, lambda s: {**s, "fingerprint": "x"}), "trainer_state.json", "is damaged"),
    (lambda run, state: edit_json(state, lambda s: {**s, "class_names": [1, 2]}), "trainer_state.json",
     "class_names [1, 2] are not two or more different names"),
    (lambda run, state: edit_json(state, lambda s: {**s, "image_shape": "1x28x28"}), "trainer_state.json",
     "image_shape '1x28x28' is not"),
    (lambda run, state: edit_json(state, without_names) or (run / "labeled_indices.json").write_text("[1, 2]"),
     "labeled_indices.json", "(a JSON list, not the object sgan writes)"),
    (lambda run, state: edit_json(state, without_names) or edit_json(run / "labeled_indices.json", without_names),
     "trainer_state.json", "class_names None are not"),
])
def test_a_damaged_record_of_a_checkpoint_is_a_message(seed_run, mnist_root, tmp_path, capsys, damage, name, message):
    """JSON of the wrong shape in a run's files was a TypeError, KeyError or AttributeError traceback."""
    run = tmp_path / "copy"
    shutil.copytree(seed_run, run)
    checkpoint = run / "checkpoints" / "step_00000012"
    damage(run, checkpoint / "trainer_state.json")
    assert main([str(checkpoint), "--cpu", "--data-root", str(mnist_root), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and name in err, err


def test_class_names_training_accepts_are_a_valid_record():
    """An npz may name a class '' (training checks only for repeats): such a run must stay readable."""
    from sgan.evaluate import checked_record

    record = checked_record(Path("weights"), "npz:/x.npz", ["", "dog"], [1, 8, 8], {})
    assert record.class_names == ("", "dog") and record.image_shape == (1, 8, 8)


def test_a_checkpoint_names_its_classes_from_its_own_state(seed_run, mnist_root, tmp_path):
    """labeled_indices.json is a note beside the run; a checkpoint's classes are in its own trainer_state.json,
    so an edited note cannot rename what the classifier predicts."""
    run = tmp_path / "copy"
    shutil.copytree(seed_run, run)
    edit_json(run / "labeled_indices.json", lambda s: {**s, "class_names": s["class_names"][::-1]})
    edit_json(run / "metrics.json", lambda s: {**s, "test_accuracy": "high", "steps": [12]})
    assert main([str(run / "checkpoints" / "step_00000012"), "--cpu", "--data-root", str(mnist_root), "--out",
                 str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "evaluation.json").read_text())["class_names"] == [str(k) for k in range(10)]
    assert main([str(run), "--cpu", "--data-root", str(mnist_root), "--out", str(tmp_path / "r")]) == 0
    evaluated = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    assert evaluated["step"] is None and "reported_test_accuracy" in evaluated  # no crash on the edited note
    assert evaluated["reported_test_accuracy"] is None


def test_another_source_with_the_same_classes(seed_run, mnist_root, tmp_path):
    import sgan
    from sgan.data import read_builtin_split

    images, labels = read_builtin_split("mnist", train=False, root=mnist_root)
    images, labels = images[:150], labels[:150]
    folder = write_folder(tmp_path / "digits", images, labels, [str(k) for k in range(10)])
    expected = torch.tensor([int(name) for name in sgan.load_classifier(seed_run).predict(images)]) == labels
    for split in ("test", "labeled"):
        out = tmp_path / split
        assert main([str(seed_run), "--cpu", "--dataset", f"folder:{folder}", "--split", split, "--out", str(out)]) == 0
        result = json.loads((out / "evaluation.json").read_text())
        assert result["scored_on"] == f"folder:{folder}" and result["split"] == split
        assert result["num_images"] == 150 and result["dataset"] == "mnist"
        matrix = torch.tensor(result["confusion_matrix"])
        assert int(matrix.trace()) == int(expected.sum()) and 0 < int(expected.sum()) < 150
        assert matrix.sum(dim=1).tolist() == torch.bincount(labels, minlength=10).tolist()
        assert "reported_test_accuracy" not in result  # training's number is for its own test set


def test_a_source_with_other_classes_is_refused(seed_run, tmp_path, capsys):
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    folder = write_folder(tmp_path / "pets", images, [0, 1, 0, 1], ["cat", "dog"])
    assert main([str(seed_run), "--cpu", "--dataset", f"folder:{folder}", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"folder:{folder} has the classes cat, dog, but the run (trained on mnist" in err, err
    # a built-in dataset's classes are known without reading it: refused before any data is fetched
    assert main([str(seed_run), "--cpu", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "none")]) == 1
    assert "T-shirt/top" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert not (tmp_path / "o" / "evaluation.json").exists()


def test_a_checkpoint_with_a_moving_average_is_scored_by_it(mnist_root, tmp_path):
    """The classifier of a run with --ema-decay is D's average: a checkpoint is scored by the same weights."""
    run = trained(tmp_path / "salimans", mnist_root, "--recipe", "salimans", "--max-steps", "3")
    checkpoint = run / "checkpoints" / "step_00000003"
    assert main([str(checkpoint), "--cpu", "--data-root", str(mnist_root)]) == 0
    result = json.loads((checkpoint / "evaluation.json").read_text())
    assert result["weights"].endswith("ema.safetensors")
    assert round(result["test_accuracy"] * 10000) == round(reported_accuracy(run) * 10000)  # the same test images right


@pytest.mark.parametrize("tool, flag, target, message", [
    ("predict", "--output", "folder", "is a folder: give the CSV file to write"),
    ("export", "--output", "folder", "is a folder: give the file to write"),
    ("evaluate", "--out", "file", "is a file: give a folder to write evaluation.json"),
])
def test_an_output_of_the_wrong_kind_is_a_usage_error(tmp_path, capsys, tool, flag, target, message):
    """Was the OS's '[Errno 21] Is a directory' (or 'File exists') after the run was loaded."""
    import importlib

    out = tmp_path / "out"
    out.mkdir() if target == "folder" else out.write_text("mine")
    images = [str(tmp_path)] if tool == "predict" else []
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"sgan.{tool}").main([str(tmp_path / "run"), *images, flag, str(out)])
    assert exit_.value.code == 2 and f"{flag} {out} {message}" in capsys.readouterr().err
    assert target == "folder" or out.read_text() == "mine"
