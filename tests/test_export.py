"""python -m sgan.export: the program loads with torch alone, in a process that never imports sgan, takes any
batch size of uint8 images, and gives the classifier's logits; the class names travel inside the file."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sgan
from sgan.config import parse_config
from sgan.data import read_builtin_split
from sgan.export import main
from sgan.train import train

# Runs in a fresh interpreter: sgan is made unimportable, so the program cannot lean on it.
WITHOUT_SGAN = textwrap.dedent("""
    import json, sys
    sys.modules["sgan"] = None  # any import of sgan now fails
    import numpy as np, torch
    program_file, images_file, out_file = sys.argv[1:]
    extra = {"sgan.json": ""}
    program = torch.export.load(program_file, extra_files=extra).module()
    images = torch.from_numpy(np.load(images_file))
    with torch.no_grad():
        logits = {n: program(images[:n]).numpy() for n in (1, 2, len(images))}  # the batch size is dynamic
    try:
        program(images.float())
        refused = "nothing"
    except Exception as error:
        refused = type(error).__name__
    np.savez(out_file, **{str(n): v for n, v in logits.items()})
    print(json.dumps({"about": json.loads(extra["sgan.json"]), "refused": refused,
                      "sgan_loaded": [m for m, v in sys.modules.items() if m.startswith("sgan") and v is not None]}))
""")


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory, mnist_root):
    """A small npz source (MNIST images), so that each run scores 60 test images, not 10,000."""
    x, y = read_builtin_split("mnist", train=False, root=mnist_root)
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x_labeled=x[:100].numpy(), y_labeled=y[:100].numpy(), x_unlabeled=x[100:300].numpy(),
             x_test=x[300:360].numpy(), y_test=y[300:360].numpy(), class_names=np.array([str(k) for k in range(10)]))
    return path


def short_run(out, npz, *flags):
    train(parse_config(["--dataset", f"npz:{npz}", "--max-steps", "3", "--batch-size", "20", "--tracker", "none",
                        "--cpu", "--checkpoint-every", "0", "--output-dir", str(out), *flags]))
    return out


@pytest.mark.parametrize("flags", [
    [],  # odena, k-logit: conv D with BatchNorm
    ["--recipe", "supervised", "--formulation", "two-head"],  # K + 1 outputs, the classes first
    ["--formulation", "k-plus-one"],
    ["--recipe", "salimans"],  # the MLP D with weight norm and noise, and its EMA as the classifier
], ids=["odena-k-logit", "supervised-two-head", "odena-k-plus-one", "salimans"])
def test_the_program_loads_without_sgan_and_predicts_as_the_classifier(digits_npz, tmp_path, flags, capsys):
    run = short_run(tmp_path / "run", digits_npz, *flags)
    program = tmp_path / "model.pt2"
    assert main([str(run), "--output", str(program)]) == 0
    assert f'torch.export.load("{program}"' in capsys.readouterr().out

    images = torch.from_numpy(np.load(digits_npz)["x_test"][:7])
    np.save(tmp_path / "images.npy", images.numpy())
    done = subprocess.run([sys.executable, "-c", WITHOUT_SGAN, str(program), str(tmp_path / "images.npy"),
                           str(tmp_path / "logits.npz")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["sgan_loaded"] == [] and report["refused"] != "nothing"  # float input: the program wants uint8

    classifier = sgan.load_classifier(run)
    about = report["about"]
    assert about["class_names"] == list(classifier.class_names) and about["image_shape"] == [1, 28, 28]
    expected = classifier.logits(images)
    logits = np.load(tmp_path / "logits.npz")
    for n in (1, 2, 7):
        assert logits[str(n)].shape == (n, 10)
        assert torch.allclose(torch.from_numpy(logits[str(n)]), expected[:n], rtol=1e-4, atol=1e-5)
    names = [about["class_names"][k] for k in logits["7"].argmax(axis=1)]
    assert names == classifier.predict(images)


def test_a_checkpoint_exports_and_bad_runs_fail_with_a_message(digits_npz, tmp_path, capsys):
    run = short_run(tmp_path / "run", digits_npz, "--recipe", "supervised")
    program = tmp_path / "checkpoint.pt2"
    assert main([str(run / "checkpoints" / "step_00000003"), "--output", str(program)]) == 0
    extra = {"sgan.json": ""}
    loaded = torch.export.load(program, extra_files=extra).module()
    images = torch.from_numpy(np.load(digits_npz)["x_test"][:5])
    assert torch.allclose(loaded(images), sgan.load_classifier(run).logits(images), rtol=1e-4, atol=1e-5)
    assert json.loads(extra["sgan.json"])["run"].endswith("step_00000003")

    assert main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pt2")]) == 1
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "x.pt2").exists()


def test_an_output_that_cannot_be_written_fails_with_a_message(digits_npz, tmp_path, capsys):
    run = short_run(tmp_path / "run", digits_npz, "--recipe", "supervised")
    capsys.readouterr()  # (a folder as --output is a usage error: test_evaluate.py)
    assert main([str(run), "--output", "/proc/sgan.pt2"]) == 1
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: '/proc/sgan.pt2'\n"  # one line
