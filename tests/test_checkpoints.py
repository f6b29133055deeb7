"""Checkpoints: exact resume, untrusted or mismatched checkpoints, pruning, signals, faults, precision."""
import json
import signal
from pathlib import Path
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


@pytest.mark.parametrize("edit", [
    lambda state: "{not json",
    lambda state: json.dumps({**state, "history": {}}),  # an AttributeError at the first epoch's end
    lambda state: json.dumps({**state, "history": [1]}),
    lambda state: json.dumps({**state, "wall_seconds": "x"}),  # a TypeError once steps had run
])
def test_corrupt_trainer_state_is_a_clear_error(tmp_path, checkpointed, mnist_root, capsys, edit):
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    state_file = copy / "checkpoints" / "step_00000002" / "trainer_state.json"
    state_file.write_text(edit(json.loads(state_file.read_text())))
    code, err = run()
    assert code == 1 and "corrupt trainer state" in err and "trainer_state.json" in err


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
    flags_ = flags(tmp_path / "bf16", mnist_root, "--max-steps", "60", "--recipe", "supervised", "--checkpoint-every", "0")
    metrics = train(parse_config([*flags_, "--mixed-precision", "bf16"]))
    assert metrics["mixed_precision"] == "bf16" and metrics["test_accuracy"] > 0.3  # it learns; chance is 0.1
    full = train(parse_config([*flags(tmp_path / "fp32", mnist_root, "--max-steps", "60", "--recipe", "supervised",
                                      "--checkpoint-every", "0")]))
    assert full["test_accuracy"] != metrics["test_accuracy"]  # autocast really ran in bfloat16
    # the reported accuracy is the float32 classifier's, the one that is saved: evaluating the saved one agrees
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(tmp_path / "bf16"), "--data-root", str(mnist_root), "--cpu"]) == 0
    evaluated = json.loads((tmp_path / "bf16" / "evaluation.json").read_text())
    assert round(evaluated["test_accuracy"] * 10000) == round(metrics["test_accuracy"] * 10000)


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, mnist_root, capsys):
    assert main(flags(tmp_path / "sbn", mnist_root, "--sync-bn", "true")) == 1
    assert "--sync-bn" in capsys.readouterr().err


def wait_for_line(process, prefix: str, seconds: float = 300) -> list[str]:
    """Read the process's stdout until a line starts with prefix; fail after `seconds` (a reader thread, so
    a silent process cannot hang the test). Returns the list the thread keeps appending every line to."""
    import threading

    lines = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True)
    reader.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if any(line.startswith(prefix) for line in lines):
            return lines
        time.sleep(0.2)
    pytest.fail(f"no line starting with {prefix!r} within {seconds} s (exit code {process.poll()})")


def test_sigterm_checkpoints_then_exits_cleanly(tmp_path, mnist_root):
    out = tmp_path / "signalled"
    command = [sys.executable, str(REPO / "launch" / "train.py"), *flags(out, mnist_root, "--max-steps", "100000",
                                                                        "--checkpoint-every", "0")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        lines = wait_for_line(process, "sgan: odena recipe")  # the loop has started
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        time.sleep(0.5)  # the reader thread takes the last lines
    finally:
        process.kill()
    stdout, stderr = "".join(lines), process.stderr.read()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]  # checkpointed, but not a finished run
    assert "stopped by a signal" in stdout
    saved = list((out / "checkpoints").glob("step_*/trainer_state.json"))
    assert len(saved) == 1
    step = json.loads(saved[0].read_text())["step"]
    assert step >= 1
    # The printed flags continue the run with its own settings (bare --resume latest would take the defaults):
    # here --max-steps 100000 and batch 20 come back from config.yaml.
    continued = stdout.split("Continue with ")[1].split()
    assert continued == ["--config", str(out / "config.yaml"), "--output-dir", str(out), "--resume", "latest"]
    config = parse_config(continued)
    assert config.max_steps == 100000 and config.batch_size == 20 and config.output_dir == str(out)
    metrics = train(parse_config([*continued, "--max-steps", str(step + 2)]))  # the printed flags resume it
    assert metrics["steps"] == step + 2 and metrics["resumed_from"].endswith(saved[0].parent.name)


def test_a_signal_while_setting_up_ends_the_run_at_once_with_a_message(tmp_path, mnist_root, monkeypatch, capsys):
    """Before the loop, a signal used to kill the run (SIGTERM) or print a traceback (Ctrl-C), after waiting out a
    long decode. Now it ends the run at once: exit code 143, one line, no checkpoint, the handlers given back."""
    import os

    import sgan.train as train_module

    loaded = []

    def slow_load(*args):  # a long decode of a folder, signalled half-way
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        loaded.append(True)

    monkeypatch.setattr(train_module, "load_data", slow_load)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert main(flags(tmp_path / "run", mnist_root, "--max-steps", "4")) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 20 and not loaded, "the signal must not wait for the decode"
    assert "stopped by a signal before the first step; nothing to save" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("during", ["classifier_accuracy", "write_outputs"])
def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, mnist_root, monkeypatch, during):
    """A signal during the last step's evaluation, or while the outputs are written, must not turn a finished
    run into an interrupted one without outputs."""
    import os

    import sgan.train as train_module

    original = getattr(train_module, during)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the flag is set; no step is left to act on it
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, during, signalled)
    out = tmp_path / "run"
    metrics = train(parse_config(flags(out, mnist_root, "--max-steps", "3", "--recipe", "supervised")))
    assert not metrics["interrupted"] and metrics["steps"] == 3
    assert (out / "metrics.json").is_file()


def test_a_signal_once_the_folder_is_claimed_checkpoints_after_the_first_step(tmp_path, mnist_root, monkeypatch):
    """From claiming the output dir on (config.yaml, the tracker), a signal is a request: the run takes one step,
    checkpoints, and the printed flags continue it. It used to end at once, leaving a folder that the same
    command refused and --resume could not continue."""
    import os

    import sgan.train as train_module

    start_tracker = train_module.start_tracker

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return start_tracker(*args)

    monkeypatch.setattr(train_module, "start_tracker", signalled)
    out = tmp_path / "run"
    metrics = train(parse_config(flags(out, mnist_root, "--max-steps", "5", "--recipe", "supervised")))
    assert metrics["interrupted"] and metrics["steps"] == 1 and metrics["stopped_by"] == "SIGTERM"
    monkeypatch.setattr(train_module, "start_tracker", start_tracker)
    resumed = train(parse_config(["--config", str(out / "config.yaml"), "--resume", "latest"]))
    assert resumed["steps"] == 5 and not resumed["interrupted"]


# ------------------------------------------------------------------------------- faults found as a user would


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, mnist_root):
    out = tmp_path / "run"
    train(parse_config(flags(out, mnist_root, "--max-steps", "4", "--checkpoint-every", "2", "--recipe", "supervised")))
    (out / "metrics.json").unlink()  # as if the run had been killed after its last checkpoint
    newest = out / "checkpoints" / "step_00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="falling back to the checkpoint before it.*step_00000002"):
        metrics = train(parse_config(flags(out, mnist_root, "--max-steps", "4", "--recipe", "supervised",
                                           "--resume", "latest")))
    assert metrics["resumed_from"].endswith("step_00000002") and metrics["steps"] == 4


def test_damaged_random_states_are_an_error_not_skipped(tmp_path, checkpointed, mnist_root, capsys):
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    (copy / "checkpoints" / "step_00000002" / "random_states_0.pkl").write_bytes(b"\x80\x04not a pickle")
    code, err = run()
    assert code == 1 and "random_states_0.pkl: cannot read it" in err


def test_foreign_random_states_are_an_error(tmp_path, checkpointed, mnist_root, capsys):
    copy, run = resume_error(tmp_path, checkpointed, mnist_root, capsys)
    torch.save({"something": 1}, copy / "checkpoints" / "step_00000002" / "random_states_0.pkl")
    code, err = run()
    assert code == 1 and "not the random states accelerate writes" in err


def test_a_new_run_into_a_run_folder_is_refused_or_overwritten(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    first = flags(out, mnist_root, "--max-steps", "3", "--checkpoint-every", "2", "--recipe", "supervised")
    train(parse_config(first))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised")) == 1
    err = capsys.readouterr().err
    assert "holds a run already" in err and "--resume latest" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing of the old run deleted
    (out / "notes.txt").write_text("mine")
    from sgan.evaluate import main as evaluate_main

    assert evaluate_main([str(out), "--cpu", "--data-root", str(mnist_root)]) == 0  # writes into the run
    metrics = train(parse_config(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--overwrite")))
    assert metrics["steps"] == 2 and not metrics["resumed_from"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # the old run's are gone
    assert (out / "notes.txt").read_text() == "mine"  # only a run's own outputs are deleted
    assert not (out / "evaluation.json").exists() and not (out / "confusion_matrix.png").exists()  # the old model's
    evaluated = tmp_path / "evaluated"  # an evaluate --out folder is no run: a run may start there, as before
    evaluated.mkdir()
    (evaluated / "evaluation.json").write_text("{}")
    assert train(parse_config(flags(evaluated, mnist_root, "--max-steps", "1", "--recipe", "supervised")))["steps"] == 1
    assert (evaluated / "evaluation.json").read_text() == "{}"


def test_a_folder_another_process_trains_in_is_refused(tmp_path, mnist_root, capsys):
    """Two runs in one folder (the same command in a second terminal, or with --overwrite) wrote over each
    other's checkpoints; the folder's lock refuses the second, and is free again once a run ends."""
    import fcntl
    out = tmp_path / "run"
    train(parse_config(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised")))
    before = sorted(p.name for p in out.iterdir()), sorted(p.name for p in (out / "checkpoints").iterdir())
    with open(out / ".sgan-lock", "a+") as other:  # as another process holds it (flock is per open file)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the run above released it when it returned
        other.truncate(0)
        other.write("process 4242 on elsewhere\n")
        other.flush()
        for extra in (["--resume", "latest"], ["--overwrite"]):
            assert main(flags(out, mnist_root, "--max-steps", "4", "--recipe", "supervised", *extra)) == 1
            err = capsys.readouterr().err
            assert "process 4242 on elsewhere is training there now" in err and "--resume latest" in err
            assert (sorted(p.name for p in out.iterdir()),
                    sorted(p.name for p in (out / "checkpoints").iterdir())) == before  # nothing deleted
    metrics = train(parse_config(flags(out, mnist_root, "--max-steps", "4", "--recipe", "supervised", "--resume",
                                       "latest")))
    assert metrics["steps"] == 4 and metrics["resumed_from"].endswith("step_00000002")


def test_files_of_a_runs_names_in_a_folder_without_a_run_are_never_deleted(tmp_path, mnist_root, capsys):
    """A user's model/ and config.yaml (or the sgan/ package, with --output-dir . in the repo) made the folder
    "a run already", and --overwrite, which the message suggested, deleted them."""
    out = tmp_path / "project"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.bin").write_text("mine")
    (out / "config.yaml").write_text("replicas: 3\n")
    for extra in ([], ["--overwrite"], ["--resume", "latest"]):
        assert main(flags(out, mnist_root, "--max-steps", "1", "--recipe", "supervised", *extra)) == 1
        err = capsys.readouterr().err
        assert "holds model, config.yaml, but no sgan run's labeled_indices.json" in err
        assert "new or empty --output-dir" in err
        assert "--overwrite" not in err
    assert (out / "model" / "mine.bin").read_text() == "mine" and (out / "config.yaml").read_text() == "replicas: 3\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model"]


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(tmp_path, checkpointed, mnist_root, capsys):
    """--resume PATH with --output-dir of another finished run wrote over its weights and metrics and pruned
    its checkpoints; into a new folder it branches the run, and a run's own checkpoint by path resumes it."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(checkpointed, other)
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    step = checkpointed / "checkpoints" / "step_00000002"
    assert main(flags(other, mnist_root, "--max-steps", "4", "--recipe", "supervised", "--resume", step)) == 1
    assert "is a checkpoint of another run" in capsys.readouterr().err
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    branch = train(parse_config(flags(tmp_path / "branch", mnist_root, "--max-steps", "4", "--recipe", "supervised",
                                      "--resume", step)))
    assert branch["steps"] == 4 and branch["resumed_from"] == str(step)
    own = other / "checkpoints" / "step_00000002"
    assert train(parse_config(flags(other, mnist_root, "--max-steps", "4", "--recipe", "supervised", "--resume",
                                    own)))["steps"] == 4


@pytest.mark.parametrize("source, message", [
    ("RUN", "a run's folder, not one of its checkpoints: --resume"),  # the run's folder for its checkpoint
    ("lastest", "no such folder"),  # a typo of latest
    ("OTHER", "was written by a different run configuration"),  # a checkpoint of a run with other settings
    ("DAMAGED", "cannot load the checkpoint"),  # its trainer state is fine, its weights are cut short
])
def test_a_bad_resume_source_with_overwrite_deletes_nothing(tmp_path, checkpointed, mnist_root, capsys, source,
                                                            message):
    """--overwrite deleted the folder's run before --resume PATH was read, and then the resume failed."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = checkpointed / "checkpoints" / "step_00000002"
    damaged = tmp_path / "damaged"
    shutil.copytree(other, damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:100])
    resume_from = {"RUN": run, "OTHER": other, "DAMAGED": damaged}.get(source, source)
    recipe = "odena" if source == "OTHER" else "supervised"
    assert main(flags(run, mnist_root, "--max-steps", "4", "--recipe", recipe, "--resume", resume_from,
                      "--overwrite")) == 1
    assert message in capsys.readouterr().err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_branch_at_its_last_step_over_a_finished_run_reports_itself(tmp_path, checkpointed, mnist_root):
    """The old run is deleted once the branch's checkpoint has loaded, before 'finished already' reads the
    folder's metrics.json: it must be the branch's, not the replaced run's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "test_accuracy": 0.123}))  # the replaced run's
    step = checkpointed / "checkpoints" / "step_00000002"
    branch = train(parse_config(flags(run, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--resume", step,
                                      "--overwrite")))
    assert branch["resumed_from"] == str(step) and branch["test_accuracy"] != 0.123
    assert json.loads((run / "metrics.json").read_text())["resumed_from"] == str(step)


def test_config_yaml_is_a_config_to_rerun_not_a_command_to_overwrite(tmp_path, checkpointed, mnist_root, capsys):
    """A run started with --overwrite, or resumed, recorded overwrite: true / resume: latest in config.yaml, so
    `--config RUN/config.yaml --output-dir ELSEWHERE` deleted ELSEWHERE's run (or resumed where nothing was)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    train(parse_config(flags(run, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--overwrite")))
    train(parse_config(flags(run, mnist_root, "--max-steps", "3", "--recipe", "supervised", "--resume", "latest")))
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["resume"] is None and recorded["overwrite"] is False
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpointed, elsewhere)
    before = {p.relative_to(elsewhere): p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    assert main(["--config", str(run / "config.yaml"), "--output-dir", str(elsewhere)]) == 1
    assert "holds a run already" in capsys.readouterr().err
    assert {p.relative_to(elsewhere): p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before


def test_an_output_dir_that_is_a_file_or_unwritable_is_a_message(tmp_path, mnist_root, capsys):
    (tmp_path / "file").write_text("x")
    assert main(flags(tmp_path / "file", mnist_root, "--max-steps", "1")) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(flags(tmp_path / "file" / "below", mnist_root, "--max-steps", "1")) == 1
    assert "cannot write there" in capsys.readouterr().err


def test_too_many_labels_fail_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--num-labels", "70000", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "more than mnist's 60000 training images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, checkpointed, mnist_root, capsys):
    import shutil

    copy = tmp_path / "finished"
    shutil.copytree(checkpointed, copy)
    written = (copy / "metrics.json").read_text()
    metrics = train(parse_config(flags(copy, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--resume",
                                       "latest")))
    assert "has finished its 2 steps already" in capsys.readouterr().out
    assert (copy / "metrics.json").read_text() == written and metrics == json.loads(written)
    (copy / "metrics.json").write_text("{damaged")  # a JSON error naming no file, before: now written again
    again = train(parse_config(flags(copy, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--resume",
                                     "latest")))
    assert again["steps"] == 2 and again["test_accuracy"] == metrics["test_accuracy"]
    assert json.loads((copy / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]


def test_sigterm_to_the_launcher_stops_the_training_process_too(tmp_path, mnist_root):
    """A one-process `accelerate launch` dies of SIGTERM without passing it on; the training process must not
    go on as an orphan: it gets SIGTERM when its parent dies, checkpoints and exits."""
    out = tmp_path / "orphan"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "launch" / "train.py"),
               *flags(out, mnist_root, "--max-steps", "100000", "--checkpoint-every", "0")]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        wait_for_line(launcher, "sgan: odena recipe")
        (child,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(p) == launcher.pid]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 120
        while Path(f"/proc/{child}").exists() and parent_of(Path(f"/proc/{child}")) is not None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(f"/proc/{child}").exists() or parent_of(Path(f"/proc/{child}")) is None, "orphan still running"
    finally:
        launcher.kill()
    assert list((out / "checkpoints").glob("step_*/trainer_state.json")), "the stopped run checkpointed"


def parent_of(proc: Path) -> int | None:
    """The parent pid of /proc/PID, or None once it is gone (or a zombie)."""
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def test_an_output_dir_that_fails_mid_run_is_a_message_and_keeps_the_checkpoint(tmp_path, mnist_root, monkeypatch,
                                                                              capsys):
    import sgan.train

    out = tmp_path / "run"
    real = sgan.train.write_outputs

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "metrics.json"))

    monkeypatch.setattr(sgan.train, "write_outputs", disk_full)
    assert main(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised")) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume latest" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()  # the final checkpoint is whole
    monkeypatch.setattr(sgan.train, "write_outputs", real)
    assert main(flags(out, mnist_root, "--max-steps", "2", "--recipe", "supervised", "--resume", "latest")) == 0
    assert (out / "metrics.json").is_file()


def test_a_setting_added_after_a_checkpoint_counts_as_its_default(tmp_path):
    """An older checkpoint lacks fingerprint keys of settings added since; their defaults keep old behaviour, so
    the checkpoint resumes at the default and is refused with any other value."""
    from sgan.checkpoints import STATE_FILE, CheckpointError, read_state

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 5, "fingerprint": {"lr": 0.003}}))
    defaults = {"lr": 0.0002, "entropy_weight": 0.0}
    assert read_state(tmp_path, {"lr": 0.003, "entropy_weight": 0.0}, defaults)["step"] == 5
    with pytest.raises(CheckpointError, match="entropy_weight: checkpoint 0.0, this run 0.5"):
        read_state(tmp_path, {"lr": 0.003, "entropy_weight": 0.5}, defaults)
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.003, this run 0.0002"):  # present keys still count
        read_state(tmp_path, {"lr": 0.0002, "entropy_weight": 0.0}, defaults)


def test_a_resume_compares_what_the_flags_resolved_to_and_says_which_to_change(tmp_path):
    """--image-size 32 against a folder run's default (None) is one size, --num-labels all against auto one
    subset, --label-seed 0 against --seed 0 one seed; a grey folder that gained a colour image is another shape,
    which names the flags that resume it."""
    from sgan.checkpoints import STATE_FILE, CheckpointError, CorruptCheckpoint, read_state

    def state(**fields):
        (tmp_path / STATE_FILE).write_text(json.dumps({"step": 5, **fields}))

    theirs = {"image_size": None, "channels": None, "num_labels": "auto", "labeled_sha256": "a", "seed": 0,
              "label_seed": None}
    state(fingerprint=theirs, image_shape=[1, 32, 32])
    ours = {"image_size": 32, "channels": 1, "num_labels": "all", "labeled_sha256": "a", "seed": 0,
            "label_seed": 0, "split_seed": 0, "image_shape": [1, 32, 32]}
    assert read_state(tmp_path, ours)["step"] == 5
    with pytest.raises(CheckpointError, match=r"the images are 3x32x32 \(C x H x W\), the checkpoint's were "
                                              r"1x32x32: resume with --channels 1 --image-size 32"):
        read_state(tmp_path, {**ours, "image_shape": [3, 32, 32]})
    with pytest.raises(CheckpointError, match="the labeled images differ from the checkpoint's"):
        read_state(tmp_path, {**ours, "labeled_sha256": "b"})
    with pytest.raises(CheckpointError, match="chosen with seed 0, this run's with 7: resume with --label-seed 0"):
        read_state(tmp_path, {**ours, "label_seed": 7, "split_seed": 7})
    state(fingerprint=theirs, image_shape=3)  # damaged: a clear error, not a TypeError
    with pytest.raises(CorruptCheckpoint, match="its image_shape 3 is not"):
        read_state(tmp_path, ours)
    state(fingerprint=theirs)  # before 29fa67a no shape was recorded: the flags count as typed
    assert read_state(tmp_path, {**ours, "image_size": None, "channels": None})["step"] == 5
    with pytest.raises(CheckpointError, match="image_size: checkpoint None, this run 32"):
        read_state(tmp_path, ours)
    state()  # a file that is no trainer state
    with pytest.raises(CheckpointError, match="corrupt trainer state \\(no 'fingerprint' in it\\)"):
        read_state(tmp_path, ours)


def test_a_branch_that_failed_before_its_first_checkpoint_can_be_run_again(tmp_path, checkpointed, mnist_root,
                                                                           monkeypatch, capsys):
    """Its folder holds only config.yaml and labeled_indices.json: the same command runs it again. A branch
    into a folder with a run's progress is replaced only with --overwrite."""
    step = checkpointed / "checkpoints" / "step_00000002"
    branch = flags(tmp_path / "branch", mnist_root, "--max-steps", "4", "--recipe", "supervised", "--resume", step)
    monkeypatch.setenv("SGAN_INJECT_FAILURE", "0:3")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(parse_config(branch))
    monkeypatch.delenv("SGAN_INJECT_FAILURE")
    assert not list((tmp_path / "branch" / "checkpoints").glob("step_*"))
    assert train(parse_config(branch))["steps"] == 4
    assert main(branch) == 1 and "add --overwrite to replace that run" in capsys.readouterr().err
    assert train(parse_config([*branch, "--overwrite"]))["steps"] == 4
    assert [p.name for p in (tmp_path / "branch" / "checkpoints").iterdir()] == ["step_00000004"]
