"""python -m sgan.study: the plan, resuming and skipping, failures, and the aggregated results."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgan import config as sgan_config
from sgan.config import parse_config
from sgan.losses import FORMULATIONS
from sgan.study import (Cell, aggregate, cell_state, collect, default_recipe_specs, last_line, main, parse_args,
                        parse_recipes, run_cell)
from sgan.train import train

from launch_helpers import REPO


def plan_of(tmp_path, *flags):
    args, plan, extra = parse_args(["--study-dir", str(tmp_path), *flags])
    return plan


def test_plan_expansion(tmp_path):
    plan = plan_of(tmp_path, "--labels", "mnist=20,100", "--recipes", "odena,supervised,odena:k-logit", "--seeds", "0",
                   "1", "--max-steps", "7", "--extra", "--tracker none")
    variants = ["odena-two-head", "odena-k-plus-one", "odena-k-logit", "supervised"]  # a bare odena: every formulation
    assert len(plan) == 2 * len(variants) * 2
    assert [c.variant for c in plan[:4]] == variants and {c.dataset for c in plan} == {"mnist"}
    assert [c.seed for c in plan] == [0] * 8 + [1] * 8  # seed-major: every cell once before any repeat
    cell = Cell("mnist", "20", "odena", "two-head", 1)
    assert cell in plan and cell.directory(tmp_path) == tmp_path / "runs/mnist/odena-two-head/labels-20/seed-1"
    flags = cell.train_flags(tmp_path, None, 7, ["--tracker", "none"])
    assert flags[flags.index("--formulation") + 1] == "two-head" and flags[-3:] == ["7", "--tracker", "none"]
    baseline = Cell("mnist", "100", "supervised", None, 0)
    assert baseline in plan and "--formulation" not in baseline.train_flags(tmp_path, 3, None, [])
    config = parse_config(baseline.train_flags(tmp_path, 3, None, []))  # what the subprocess will run
    assert (config.recipe, config.num_labels, config.seed, config.epochs) == ("supervised", "100", 0, 3)
    assert config.output_dir == str(tmp_path / "runs/mnist/supervised/labels-100/seed-0")


def test_default_plan_is_the_full_study(tmp_path):
    plan = plan_of(tmp_path)
    budgets = {(c.dataset, c.num_labels) for c in plan}
    assert budgets == {("mnist", n) for n in ("20", "50", "100", "1000", "30000")} | \
        {("fashion-mnist", "100"), ("fashion-mnist", "1000")}
    assert {c.seed for c in plan} == {0, 1, 2}
    assert {(c.recipe, c.formulation) for c in plan} >= {("odena", f) for f in FORMULATIONS} | {("supervised", None)}
    assert len(plan) == len(budgets) * 3 * len({c.variant for c in plan})
    assert {c.dataset for c in plan_of(tmp_path, "--labels", "fashion-mnist=100")} == {"fashion-mnist"}
    assert {c.num_labels for c in plan_of(tmp_path, "--datasets", "mnist")} == {"20", "50", "100", "1000", "30000"}


def test_a_new_recipe_joins_the_default_plan(monkeypatch):
    monkeypatch.setattr(sgan_config, "RECIPES", ("odena", "supervised", "salimans"))
    variants = parse_recipes(default_recipe_specs())
    assert ("salimans", None) in variants and variants[-1] == ("supervised", None)  # the baseline last
    assert parse_recipes(["salimans:two-head"]) == [("salimans", "two-head")]


@pytest.mark.parametrize("flags, message", [
    (["--labels", "mnist=105"], "not a multiple of the 10 classes"),
    (["--labels", "mnist"], "expected DATASET=N,N"),
    (["--labels", "mnist=20,lots"], "'lots' in 'mnist=20,lots' is not a positive integer"),
    (["--labels", "cifar=100"], "--dataset 'cifar': use a built-in dataset"),
    (["--datasets", "mnst"], "--dataset 'mnst': use a built-in dataset"),
    (["--labels", "mnist=20", "mnist=50"], "mnist given twice"),
    (["--datasets", "mnist", "--labels", "fashion-mnist=100"], "--labels names fashion-mnist"),
    (["--recipes", "gan"], "unknown recipe 'gan'; this version has odena, supervised"),
    (["--recipes", "odena:softmax"], "unknown formulation 'softmax'"),
    (["--recipes", ","], "no recipe given"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--extra", "--seed 3"], "--extra may not set --seed"),
    (["--extra", "--batch-size 0"], "--batch-size must be >= 1"),
])
def test_bad_specs_exit_with_a_message(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--study-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def fake_run(study_dir, cell, error, steps=600, val_error=None):
    """A finished run's metrics.json; error None: the run had no test images."""
    folder = cell.directory(study_dir)
    folder.mkdir(parents=True)
    metrics = {"test_accuracy": None if error is None else 1 - error, "test_error": error,
               "val_accuracy": None if val_error is None else 1 - val_error, "num_labels": int(cell.num_labels),
               "dataset": cell.dataset, "recipe": cell.recipe, "formulation": cell.formulation or "k-logit",
               "seed": cell.seed, "steps": steps, "epochs": steps / 600, "wall_seconds": 1.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_aggregation_math_table_and_plot(tmp_path, capsys):
    for seed, error in enumerate([0.10, 0.20, 0.30]):
        fake_run(tmp_path, Cell("mnist", "20", "odena", "k-logit", seed), error)
    for seed, error in enumerate([0.50, 0.70]):
        fake_run(tmp_path, Cell("mnist", "20", "supervised", None, seed), error, steps=300)
    fake_run(tmp_path, Cell("mnist", "100", "odena", "k-logit", 0), 0.05)
    fake_run(tmp_path, Cell("fashion-mnist", "100", "supervised", None, 4), 0.25)
    broken = Cell("mnist", "100", "supervised", None, 0).directory(tmp_path)
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{not json")

    assert main(["--study-dir", str(tmp_path), "--aggregate-only"]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and str(broken) in captured.err
    table = (tmp_path / "results.md").read_text()
    assert table == captured.out.rstrip("\n") + "\n"  # printed as written
    assert "| dataset | labels | odena/k-logit | supervised |" in table
    assert "| mnist | 20 | 20.00 ± 10.00 (n=3, 600 steps = 1 ep) | 60.00 ± 14.14 (n=2, 300 steps = 0.5 ep) |" in table
    assert "| mnist | 100 | 5.00 (n=1, 600 steps = 1 ep) | – |" in table  # no spread of one seed
    assert "| fashion-mnist | 100 | – | 25.00 (n=1, 600 steps = 1 ep) |" in table
    assert f"`python -m sgan.study --study-dir {tmp_path} --aggregate-only`" in table
    assert table.index("| mnist | 20 |") < table.index("| mnist | 100 |") < table.index("| fashion-mnist")

    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    supervised = next(c for c in cells if c["dataset"] == "mnist" and c["label"] == "supervised")
    assert supervised["test_error_mean"] == pytest.approx(0.6)
    assert supervised["test_error_std"] == pytest.approx(0.02 ** 0.5)  # sample std: sqrt((0.1² + 0.1²) / (2 - 1))
    assert supervised["test_accuracy_mean"] == pytest.approx(0.4)
    assert [r["test_error"] for r in supervised["runs"]] == [0.5, 0.7] and supervised["n"] == 2
    assert len(cells) == 4  # the unreadable run is not a cell

    plot = tmp_path / "accuracy_vs_labels.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
        assert image.size[0] > image.size[1]  # two datasets side by side


def test_runs_without_a_test_split_show_their_validation_error(tmp_path, capsys):
    # a folder without test/: its runs' metrics.json has test_error null (and a val score when it has val/)
    for seed, val_error in enumerate([0.25, 0.35]):
        fake_run(tmp_path, Cell("folder:/data/pets", "12", "supervised", None, seed), None, val_error=val_error)
    fake_run(tmp_path, Cell("mnist", "20", "supervised", None, 0), 0.5)

    assert main(["--study-dir", str(tmp_path), "--aggregate-only"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| folder:/data/pets | 12 | no test (val 30.00 ± 7.07, n=2, 600 steps = 1 ep) |" in table
    assert "| mnist | 20 | 50.00 (n=1, 600 steps = 1 ep) |" in table
    assert "no test: the runs' dataset has no test images" in table
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    pets = next(c for c in cells if c["dataset"] == "folder:/data/pets")
    assert pets["test_error_mean"] is None and pets["val_error_mean"] == pytest.approx(0.3)
    assert (tmp_path / "accuracy_vs_labels.png").is_file()  # of the runs that have a test score
    shutil.rmtree(Cell("mnist", "20", "supervised", None, 0).directory(tmp_path))
    assert main(["--study-dir", str(tmp_path), "--aggregate-only"]) == 0
    assert not (tmp_path / "accuracy_vs_labels.png").exists()  # no run has a test score: no plot, no stale one


def test_runs_that_recorded_a_relative_folder_share_a_cell_with_later_ones(tmp_path, monkeypatch):
    """Runs before data.absolute_spec recorded folder:photos as typed; later ones record the absolute path."""
    monkeypatch.chdir(tmp_path)
    cell = Cell("folder:photos", "12", "supervised", None, 0)
    fake_run(tmp_path, cell, 0.2)
    later = Cell(cell.dataset, "12", "supervised", None, 1)
    fake_run(tmp_path, later, 0.4)
    metrics = json.loads((later.directory(tmp_path) / "metrics.json").read_text())
    metrics["dataset"] = f"folder:{tmp_path / 'photos'}"
    (later.directory(tmp_path) / "metrics.json").write_text(json.dumps(metrics))
    (cell_,) = aggregate(collect(tmp_path))
    assert cell_["n"] == 2 and cell_["dataset"] == f"folder:{tmp_path / 'photos'}"


def test_a_metrics_json_of_the_wrong_shape_is_skipped_and_run_again(tmp_path, capsys):
    fake_run(tmp_path, Cell("mnist", "20", "supervised", None, 0), 0.5)
    wrong = Cell("mnist", "20", "supervised", None, 1).directory(tmp_path)
    wrong.mkdir(parents=True)
    (wrong / "metrics.json").write_text("[1]")
    assert main(["--study-dir", str(tmp_path), "--aggregate-only"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {wrong / 'metrics.json'}: unreadable (a JSON list, not the object sgan writes)" in err
    assert "(n=1," in (tmp_path / "results.md").read_text()
    assert cell_state(wrong) == "new"  # not a finished run: the study runs it again


def test_a_study_dir_that_is_a_file_is_refused_up_front(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    for study_dir, flags in ((file, ["--labels", "mnist=20", "--recipes", "supervised"]),
                             (file / "study", ["--aggregate-only"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["--study-dir", str(study_dir), *flags])
        assert exit_info.value.code == 2
        assert f"--study-dir {study_dir}: {file} is a file, not a folder" in capsys.readouterr().err


def test_aggregate_only_without_runs_is_an_error(tmp_path, capsys):
    assert main(["--study-dir", str(tmp_path), "--aggregate-only"]) == 1
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def study(study_dir, root, labels, recipes, *more):
    command = [sys.executable, "-m", "sgan.study", "--study-dir", str(study_dir), "--labels", labels,
               "--recipes", recipes, "--seeds", "0", "--max-steps", "2", *more,
               "--extra", f"--batch-size 20 --tracker none --cpu --data-root {root}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_study_resumes_and_skips_finished_runs(tmp_path, mnist_root):
    # An interrupted cell: a checkpoint at step 1 and no metrics.json (the run had stopped before the end).
    interrupted = Cell("mnist", "20", "supervised", None, 0).directory(tmp_path)
    train(parse_config(["--recipe", "supervised", "--num-labels", "20", "--seed", "0", "--output-dir", str(interrupted),
                        "--max-steps", "1", "--batch-size", "20", "--tracker", "none", "--cpu", "--data-root",
                        str(mnist_root)]))
    (interrupted / "metrics.json").unlink()

    first = study(tmp_path, mnist_root, "mnist=20", "odena:k-logit,supervised")
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "1 to resume, 1 to start" in first.stdout and "resuming from step_00000001" in first.stdout
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert resumed["steps"] == 2 and resumed["resumed_from"].endswith("step_00000001")
    new = Cell("mnist", "20", "odena", "k-logit", 0).directory(tmp_path)
    assert json.loads((new / "metrics.json").read_text())["formulation"] == "k-logit"
    assert "| mnist | 20 |" in (tmp_path / "results.md").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (new / "metrics.json", interrupted / "metrics.json")}

    second = study(tmp_path, mnist_root, "mnist=20", "odena:k-logit,supervised")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done, skipped") == 2 and "ran 0, skipped 2, failed 0" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_cell_another_process_trains_is_skipped_as_busy(tmp_path, mnist_root):
    """Two studies of one folder: a cell the other one trains now is skipped (its lock is held), not run a
    second time over it (a new cell's --overwrite deleted the other's outputs); the next study resumes it."""
    import fcntl
    busy = Cell("mnist", "20", "supervised", None, 0).directory(tmp_path)
    train(parse_config(["--recipe", "supervised", "--num-labels", "20", "--seed", "0", "--output-dir", str(busy),
                        "--max-steps", "1", "--batch-size", "20", "--tracker", "none", "--cpu", "--data-root",
                        str(mnist_root)]))
    (busy / "metrics.json").unlink()  # stopped at step 1: the other study would resume it
    with open(busy / ".sgan-lock", "a+") as other:  # as another process holds it (flock is per open file)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("process 4242 on elsewhere\n")
        other.flush()
        first = study(tmp_path, mnist_root, "mnist=20", "odena:k-logit,supervised")
        assert first.returncode == 0, first.stdout + first.stderr[-3000:]
        assert "process 4242 on elsewhere is training it now, skipped" in first.stdout
        assert "ran 1, skipped 0, failed 0, busy 1" in first.stdout and f"busy: {busy}" in first.stdout
        assert not (busy / "metrics.json").exists() and (busy / "checkpoints" / "step_00000001").is_dir()
    second = study(tmp_path, mnist_root, "mnist=20", "odena:k-logit,supervised")
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "resuming from step_00000001" in second.stdout and "ran 1, skipped 1, failed 0" in second.stdout
    assert json.loads((busy / "metrics.json").read_text())["resumed_from"].endswith("step_00000001")


def test_a_failing_run_is_reported_and_the_study_goes_on(tmp_path, mnist_root):
    # 60000: more than the smallest class allows. --jobs 2: both runs at once, one thread each
    result = study(tmp_path, mnist_root, "mnist=60000,20", "supervised", "--jobs", "2")
    assert result.returncode == 1
    assert "FAILED (exit code 1): error: --num-labels 60000 needs 6000 images per class" in result.stdout
    assert "ran 2, skipped 0, failed 1" in result.stdout
    finished = Cell("mnist", "20", "supervised", None, 0).directory(tmp_path)
    assert (finished / "metrics.json").is_file()
    assert "mnist/supervised/labels-20/seed-0: test error" in result.stdout
    assert "| mnist | 20 |" in (tmp_path / "results.md").read_text()


def test_parallel_runs_get_a_share_of_the_cores_unless_the_user_set_threads(tmp_path, monkeypatch):
    show = [sys.executable, "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run_cell(show, tmp_path / "a.log", threads=3) == 0
    assert last_line(tmp_path / "a.log") == "threads 3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert run_cell(show, tmp_path / "b.log", threads=3) == 0
    assert last_line(tmp_path / "b.log") == "threads 5"


def test_a_study_of_your_own_images(tmp_path):
    plan = plan_of(tmp_path, "--labels", "folder:/data/my=photos=5,all", "--recipes", "supervised", "--seeds", "0")
    assert [(c.dataset, c.num_labels) for c in plan] == [("folder:/data/my=photos", "5"), ("folder:/data/my=photos", "all")]
    folder = plan[0].directory(tmp_path).relative_to(tmp_path / "runs").parts[0]
    assert folder.startswith("folder-my=photos-") and "/" not in folder  # one folder per source, inside the study
    assert plan_of(tmp_path, "--labels", "folder:/other/my=photos=5", "--recipes", "supervised", "--seeds", "0")[0] \
        .directory(tmp_path) != plan[0].directory(tmp_path)  # same name, another folder


def test_a_study_of_a_folder_without_test_images_reports_the_validation_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SGAN_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("labeled", 4), ("val", 2)):  # no test/
        for name in ("a", "b"):
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / f"{i}.png")
    command = [sys.executable, "-m", "sgan.study", "--study-dir", str(tmp_path / "study"), "--labels",
               f"folder:{tmp_path / 'pets'}=all", "--recipes", "supervised", "--seeds", "0", "--max-steps", "2",
               "--extra", "--batch-size 4 --tracker none --cpu --image-size 12"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "seed-0: no test images; val error" in result.stdout and "ran 1, skipped 0, failed 0" in result.stdout
    assert "| no test (val " in (tmp_path / "study" / "results.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0 and "done, skipped" in again.stdout, again.stderr[-3000:]


def start_long_study(study_dir, root, seeds, wait_for_training=True):
    """A study of long supervised runs, one at a time, in its own process group (so that a failing test can
    kill every process of it); once its first run trains, unless told not to wait."""
    command = [sys.executable, "-m", "sgan.study", "--study-dir", str(study_dir), "--labels", "mnist=20",
               "--recipes", "supervised", "--seeds", *seeds, "--epochs", "100", "--max-steps", "100000",
               "--extra", f"--batch-size 20 --tracker none --cpu --data-root {root}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=True)
    log = Cell("mnist", "20", "supervised", None, int(seeds[0])).directory(study_dir) / "train.log"
    deadline = time.monotonic() + 120
    while wait_for_training and not (log.is_file() and re.search(r"\d+it/s", log.read_text(errors="replace"))):
        assert process.poll() is None and time.monotonic() < deadline, "the first run never started training"
        time.sleep(0.2)
    return process


def training_runs(pid: int) -> list[int]:
    """The processes `python -m sgan.train` that process pid started (once they run it, not before the exec)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()  # after "(name)": state, ppid, ...
            if int(fields[1]) == pid and b"sgan.train" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
    return found


def finish(process, seconds=120):
    try:
        return process.communicate(timeout=seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the study and its runs, whatever happened


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the run's process in /proc")
@pytest.mark.parametrize("when", ["training", "starting"])
def test_a_run_stopped_by_a_signal_stops_the_study_and_resumes(tmp_path, mnist_root, when):
    # The study used to call the stopped run FAILED (it exits 0 after its checkpoint) and start the next one.
    # While starting up, a run dies of SIGTERM (importing torch) or exits 130 (setting up): stopped either way.
    process = start_long_study(tmp_path, mnist_root, ["0", "1"], wait_for_training=when == "training")
    try:
        deadline = time.monotonic() + 60
        while not (runs := training_runs(process.pid)):
            assert time.monotonic() < deadline, "the study started no run"
            time.sleep(0.01)
        os.kill(runs[0], signal.SIGTERM)
    finally:
        stdout, stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert "seed-0: stopped by a signal (" in stdout and "FAILED" not in stdout
    assert ("(checkpoint step_" in stdout) == (when == "training")
    assert "1 run(s) stopped by a signal, 1 not started" in stderr
    assert not Cell("mnist", "20", "supervised", None, 1).directory(tmp_path).exists(), "seed 1 must not start"
    stopped = Cell("mnist", "20", "supervised", None, 0).directory(tmp_path)
    assert not (stopped / "metrics.json").exists()
    assert bool(list(stopped.glob("checkpoints/step_*/trainer_state.json"))) == (when == "training")
    dry = subprocess.run([sys.executable, "-m", "sgan.study", "--study-dir", str(tmp_path), "--labels", "mnist=20",
                          "--recipes", "supervised", "--seeds", "0", "1", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    expected = "1 to resume, 1 to start" if when == "training" else "0 to resume, 2 to start"
    assert expected in dry.stdout, dry.stdout + dry.stderr[-2000:]


def test_sigterm_to_the_study_stops_its_runs_at_a_checkpoint(tmp_path, mnist_root):
    process = start_long_study(tmp_path, mnist_root, ["0", "1"])
    try:
        process.send_signal(signal.SIGTERM)  # the study alone: unlike Ctrl-C in a terminal, its runs get nothing
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # a second one while it waits for the checkpoint: no traceback
    finally:
        stdout, stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted; the runs that were training wrote a checkpoint" in stderr and "Traceback" not in stderr
    assert "already stopping" in stderr
    run = Cell("mnist", "20", "supervised", None, 0).directory(tmp_path)
    assert "stopped by a signal" in (run / "train.log").read_text()
    assert list(run.glob("checkpoints/step_*/trainer_state.json")) and not (run / "metrics.json").exists()
    assert not Cell("mnist", "20", "supervised", None, 1).directory(tmp_path).exists()
