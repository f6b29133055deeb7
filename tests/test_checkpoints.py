"""Checkpoints: exact resume, untrusted or mismatched checkpoints, pruning, signals, faults, precision."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sgan import ops
from sgan.config import parse_config
from sgan.train import main, train

from launch_helpers import REPO


def flags(out, root, *extra):
    return ["--tracker", "none", "--cpu", "--output-dir", str(out), "--data-root", str(root), "--batch-size", "20",
            *map(str, extra)]


def weights(out):
    return {name: load_file(str(out / "model" / f"{name}.safetensors")) for name in ("discriminator", "generator")}


def test_resumed_run_ends_bit_identical(tmp_path, mnist_root):
    train(parse_config(flags(tmp_path / "straight", mnist_root, "--max-steps", "8", "--checkpoint-every", "0")))
    train(parse_config(flags(tmp_path / "split", mnist_root, "--max-steps", "4")))
    metrics = train(parse_config(flags(tmp_path / "split", mnist_root, "--max-steps", "8", "--resume", "latest")))
    assert metrics["resumed_from"].endswith("step_00000004")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def test_old_checkpoints_are_pruned(tmp_path, mnist_root):
    out = tmp_path / "run"
    train(parse_config(flags(out, mnist_root, "--max-steps", "7", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                             "--recipe", "supervised")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000007"]
    state = json.loads((out / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["fingerprint"]["recipe"] == "supervised"


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(parse_config(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised")))
    return out


def resume_error(tmp_path, out, root, capsys, *extra):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, lambda: (main(flags(copy, root, "--max-steps", "4", "--recipe", "supervised", "--resume", "latest",
                                     *extra)), capsys.readouterr().err)


def test_corrupt_weights_are_a_clear_error(tmp_path, checkpointed, mnist_root, capsys):
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    model = copy / "checkpoints" / "step_00000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    code, err = run()
    assert code == 1 and "step_00000002: cannot load the checkpoint" in err


def test_corrupt_trainer_state_is_a_clear_error(tmp_path, checkpointed, mnist_root, capsys):
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    (copy / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{not json")
    code, err = run()
    assert code == 1 and "corrupt trainer state" in err


def test_checkpoint_from_another_configuration_is_refused(tmp_path, checkpointed, mnist_root, capsys):
    _, run = resume_error(tmp_path, checkpointed, mnist_root, capsys, "--formulation", "two-head")
    code, err = run()
    assert code == 1 and "formulation: checkpoint 'k-logit', this run 'two-head'" in err


def test_checkpoint_with_another_g_output_is_refused(tmp_path, checkpointed, mnist_root, capsys):
    # same parameter shapes, so only the fingerprint can tell the runs apart
    _, run = resume_error(tmp_path, checkpointed, mnist_root, capsys, "--g-output", "sigmoid")
    code, err = run()
    assert code == 1 and "g_output: checkpoint 'softplus', this run 'sigmoid'" in err


def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path, checkpointed, mnist_root, capsys, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('boom-marker', 'w').close()",))

    monkeypatch.chdir(tmp_path)
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    torch.save({"state": Boom()}, copy / "checkpoints" / "step_00000002" / "optimizer.bin")
    code, err = run()
    assert code == 1 and "cannot load the checkpoint" in err
    assert not (tmp_path / "boom-marker").exists()


def test_resume_latest_without_checkpoints(tmp_path, mnist_root, capsys):
    assert main(flags(tmp_path / "empty", mnist_root, "--resume", "latest", "--max-steps", "2")) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_non_finite_loss_names_the_step_and_checkpoint(tmp_path, mnist_root, monkeypatch, capsys):
    real = ops.discriminator_loss_sums
    calls = {"n": 0}

    def poisoned(logits, target, formulation, backend="auto", **kwargs):
        calls["n"] += 1
        sums = real(logits, target, formulation, backend="torch")
        return sums * float("nan") if calls["n"] >= 4 else sums

    monkeypatch.setattr(ops, "discriminator_loss_sums", poisoned)
    code = main(flags(tmp_path / "nan", mnist_root, "--recipe", "supervised", "--max-steps", "10",
                      "--checkpoint-every", "2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss at step 4" in err and "step_00000002" in err


def test_bf16_mixed_precision_trains(tmp_path, mnist_root):
    metrics = train(parse_config(flags(tmp_path / "bf16", mnist_root, "--max-steps", "3", "--mixed-precision", "bf16")))
    assert metrics["mixed_precision"] == "bf16" and 0 <= metrics["test_accuracy"] <= 1


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, mnist_root, capsys):
    assert main(flags(tmp_path / "sbn", mnist_root, "--sync-bn", "true")) == 1
    assert "--sync-bn" in capsys.readouterr().err


def test_sigterm_checkpoints_then_exits_cleanly(tmp_path, mnist_root):
    out = tmp_path / "signalled"
    command = [sys.executable, str(REPO / "launch" / "train.py"), *flags(out, mnist_root, "--max-steps", "100000",
                                                                        "--checkpoint-every", "0")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in process.stdout:  # wait until the loop has started
            if line.startswith("sgan: odena recipe"):
                break
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped by a signal" in stdout
    saved = list((out / "checkpoints").glob("step_*/trainer_state.json"))
    assert len(saved) == 1
    step = json.loads(saved[0].read_text())["step"]
    assert step >= 1
    metrics = train(parse_config(flags(out, mnist_root, "--max-steps", str(step + 2), "--resume", "latest")))
    assert metrics["steps"] == step + 2
