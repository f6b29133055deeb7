"""benchmarks/training.py's time-to-accuracy report, on made-up runs (the throughput half trains for real and is
exercised by `make benchmark-training`)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, accuracies, seed: int, wall_per_epoch: float = 40.0, val=None,
              recipe: str = "salimans") -> Path:
    history = [{"epoch": i + 1, "step": 600 * (i + 1), "test_accuracy": a, "wall_seconds": wall_per_epoch * (i + 1),
                "val_accuracy": val[i] if val else None}
               for i, a in enumerate(accuracies)]
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({
        "recipe": recipe, "seed": seed, "num_labels": 100, "epochs": len(accuracies),
        "test_accuracy": accuracies[-1], "wall_seconds": wall_per_epoch * len(accuracies), "history": history}))
    return path


def test_time_to_accuracy_takes_the_first_epoch_at_or_above_each_target(tmp_path, bench, capsys):
    fast = write_run(tmp_path / "a", [0.9, 0.981, 0.975, 0.99], seed=0)  # dips below 98% after reaching it
    slow = write_run(tmp_path / "b", [0.9, 0.95, 0.97, 0.985], seed=1)
    baseline = write_run(tmp_path / "c", [0.7, 0.75, 0.99, 0.99], seed=0, recipe="supervised")
    out = tmp_path / "result.json"
    plot = tmp_path / "curves.png"
    assert bench.main(["time-to-accuracy", str(fast), str(slow), str(baseline), "--out", str(out),
                       "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    first, second, _ = result["runs"]
    assert first["reached"]["0.98"] == {"epoch": 2, "wall_seconds": 80.0}
    assert first["reached"]["0.99"] == {"epoch": 4, "wall_seconds": 160.0}
    assert second["reached"]["0.98"] == {"epoch": 4, "wall_seconds": 160.0} and second["reached"]["0.99"] is None
    assert first["best_accuracy"] == 0.99 and second["final_accuracy"] == 0.985
    salimans = result["summary"]["salimans"]  # the baseline's run is summarised apart, not pooled
    assert salimans["0.98"] == {"runs_reaching": 2, "runs": 2, "median_wall_seconds": 120.0, "median_epoch": 3.0}
    assert salimans["0.99"]["runs_reaching"] == 1
    assert result["summary"]["supervised"]["0.98"] == {"runs_reaching": 1, "runs": 1, "median_wall_seconds": 120.0,
                                                       "median_epoch": 3.0}
    assert "not reached" in capsys.readouterr().out


def test_time_to_accuracy_on_validation_reads_the_validation_curve(tmp_path, bench):
    run = write_run(tmp_path / "a", [0.99, 0.99, 0.99], seed=0, val=[0.9, 0.97, 0.985])
    out = tmp_path / "result.json"
    assert bench.main(["time-to-accuracy", str(run), "--split", "val", "--label-by-dir", "--out", str(out),
                       "--plot", ""]) == 0
    (result,) = json.loads(out.read_text())["runs"]
    assert result["label"] == "a"
    assert result["reached"]["0.98"] == {"epoch": 3, "wall_seconds": 120.0} and result["reached"]["0.99"] is None
    assert result["final_accuracy"] == 0.985 and result["split"] == "val"
    no_val = write_run(tmp_path / "b", [0.9], seed=0)
    with pytest.raises(SystemExit, match="--val-size"):
        bench.main(["time-to-accuracy", str(no_val), "--split", "val", "--out", str(out), "--plot", ""])


def test_time_to_accuracy_refuses_runs_without_per_epoch_wall_time(tmp_path, bench):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"recipe": "odena", "history": [{"epoch": 1, "test_accuracy": 0.9}]}))
    with pytest.raises(SystemExit, match="no per-epoch wall time"):
        bench.main(["time-to-accuracy", str(run), "--out", str(tmp_path / "r.json"), "--plot", ""])
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["time-to-accuracy", str(tmp_path / "missing"), "--out", str(tmp_path / "r.json")])


def test_loss_benchmark_writes_every_column_and_the_exp_bound(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loss", SCRIPT.parent / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "loss.json"
    threads = torch.get_num_threads()
    try:
        assert module.main(["--batch-sizes", "64", "--classes", "3", "--formulations", "k-logit,two-head",
                            "--threads", "1", "--no-compile", "--min-seconds", "0", "--warmup-seconds", "0.1",
                            "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it for the whole process
    result = json.loads(out.read_text())
    assert result["meta"]["threads"] == 1 and result["meta"]["exp_ns_per_element"] > 0
    assert [(r["formulation"], r["batch"], r["classes"]) for r in result["results"]] == [("k-logit", 64, 3),
                                                                                         ("two-head", 64, 3)]
    for row in result["results"]:
        ms = row["ms"]
        assert ms["compiled"] is None and min(ms["fused"], ms["eager"], ms["floor"], ms["clone"]) > 0
        # 2 exps per class logit at the measured per-element cost, on one thread
        assert ms["exp_bound"] == pytest.approx(2 * 64 * 3 * result["meta"]["exp_ns_per_element"] * 1e-6)
        assert row["exp_bound_over_floor"] == pytest.approx(ms["exp_bound"] / ms["floor"])


def test_peak_turns_measured_steps_per_second_into_a_share_of_the_float32_peak():
    spec = importlib.util.spec_from_file_location("bench_peak", SCRIPT.parent / "peak.py")
    peak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak)
    result = {"peak_gflops": {"2": {"float32": {"best": 200.0}, "bf16": {"best": 400.0}}},
              "flops_per_step": {"salimans": 4e9}}
    compare = {"threads": 2, "rows": [{"recipe": "salimans", "base_steps_per_second": 20.0,
                                       "this_steps_per_second": 40.0}]}
    rows = {row["side"]: row for row in peak.share_of_peak(compare, result)}
    assert rows["base"]["gflops"] == 80.0 and rows["base"]["share_of_float32_peak"] == 0.4
    assert rows["this"]["share_of_float32_peak"] == 0.8
    with pytest.raises(SystemExit, match="--threads"):
        peak.share_of_peak({**compare, "threads": 1}, result)


def test_the_paper_results_baseline_shares_the_salimans_settings_and_schedule(tmp_path):
    import argparse
    import shlex

    from sgan.config import parse_config

    spec = importlib.util.spec_from_file_location("bench_paper", SCRIPT.parent / "paper.py")
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    commands = paper.study_commands(argparse.Namespace(study_dir=tmp_path, seeds=[100, 101], jobs=2,
                                                       labels=paper.LABELS))
    supervised = commands["supervised"]
    extra = shlex.split(supervised[supervised.index("--extra") + 1])
    epochs = int(supervised[supervised.index("--epochs") + 1])
    baseline = parse_config(["--recipe", "supervised", "--epochs", str(epochs), *extra])
    salimans = parse_config(["--recipe", "salimans"])
    for name in ("lr", "beta1", "adam_eps", "ema_decay", "mixed_precision", "epochs", "batch_size"):
        assert getattr(baseline, name) == getattr(salimans, name), name
    assert baseline.network_family() == "salimans"
    assert "--epochs" not in commands["salimans"]  # the recipe's own schedule
    assert commands["salimans"][commands["salimans"].index("--seeds") + 1:][:2] == ["100", "101"]
    for command in commands.values():  # the label budgets, the headline's first
        assert command[command.index("--labels") + 1:][:2] == ["mnist=100,50,20", "fashion-mnist=100"]
    headline = paper.study_commands(argparse.Namespace(study_dir=tmp_path, seeds=[100], jobs=1, labels=["mnist=100"]))
    assert headline["salimans"][headline["salimans"].index("--labels") + 1:][:2] == ["mnist=100", "--seeds"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_paper_passes_a_stop_on_to_its_study(tmp_path, sig):
    """paper.py runs each study as a subprocess: SIGTERM to paper.py alone (or Ctrl-C) must reach the study,
    which stops its runs at a checkpoint, and paper.py waits for it and returns its exit code."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    study = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
             "time.sleep(60)\n")
    driver = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('paper', {str(SCRIPT.parent / 'paper.py')!r})\n"
              "paper = importlib.util.module_from_spec(spec); spec.loader.exec_module(paper)\n"
              f"sys.exit(paper.run_study([sys.executable, '-c', {study!r}]))\n")
    process = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the study never started"
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(getattr(signal, sig))  # paper.py alone, not its study
        assert process.wait(timeout=30) == 130
        assert time.monotonic() - started < 20  # the study stopped: it did not sleep its 60 s out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of paper.py and its study


def test_paper_report_puts_salimans_beside_its_baseline_with_each_runs_time_to_accuracy(tmp_path):
    """--report-only reads finished runs of both studies: one column per recipe (mean ± std over seeds), then a
    row per run with its test error and the first epoch at each target."""
    spec = importlib.util.spec_from_file_location("bench_paper_report", SCRIPT.parent / "paper.py")
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    curves = {("salimans", 100): [0.9, 0.985, 0.99], ("salimans", 101): [0.9, 0.95, 0.97],
              ("supervised", 100): [0.7, 0.75, 0.8]}
    for (recipe, seed), accuracies in curves.items():
        run = tmp_path / recipe / "runs" / "mnist" / recipe / "labels-100" / f"seed-{seed}"
        write_run(run, accuracies, seed=seed, recipe=recipe)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.update(dataset="mnist", formulation="k-logit", test_error=1 - accuracies[-1], steps=1800)
        (run / "metrics.json").write_text(json.dumps(metrics))
    assert paper.main(["--study-dir", str(tmp_path), "--report-only", "--labels", "mnist=100"]) == 0
    report = (tmp_path / "results.md").read_text()
    assert "| dataset | labels | salimans | supervised |" in report
    assert "| seed | test error | 70% | 80% | 90% | 95% | 98% | 99% |" in report
    assert "| mnist | 100 | 2.00 ± 1.41 (n=2, 1800 steps = 3 ep) | 20.00 (n=1, 1800 steps = 3 ep) |" in report
    assert "| mnist | 100 | salimans | 100 | 1.00 | ep 1 (0.7 min) | ep 1 (0.7 min) | ep 1 (0.7 min) | ep 2 (1.3 min) " \
           "| ep 2 (1.3 min) | ep 3 (2.0 min) |" in report
    assert "| mnist | 100 | salimans | 101 | 3.00 | ep 1 (0.7 min) | ep 1 (0.7 min) | ep 1 (0.7 min) | ep 2 (1.3 min) " \
           "| – | – |" in report
    assert "| mnist | 100 | supervised | 100 | 20.00 | ep 1 (0.7 min) | ep 3 (2.0 min) | – | – | – | – |" in report
    assert (tmp_path / "accuracy_vs_labels.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "time_to_accuracy_mnist_100.json").read_text())["summary"]["salimans"]["0.98"][
        "runs_reaching"] == 1
    with pytest.raises(SystemExit, match="no finished runs"):
        paper.main(["--study-dir", str(tmp_path / "empty"), "--report-only", "--labels", "mnist=100"])


def test_lost_mode_draws_the_runs_labeled_and_misread_images(tmp_path, mnist_root, capsys):
    """benchmarks/lost_mode.py: its count is the classifier's own, and its rows are the run's labeled images."""
    import numpy as np
    from PIL import Image

    import sgan
    from sgan.config import parse_config
    from sgan.data import read_builtin_split
    from sgan.train import train

    run = tmp_path / "run"
    train(parse_config(["--tracker", "none", "--cpu", "--output-dir", str(run), "--data-root", str(mnist_root),
                        "--recipe", "supervised", "--max-steps", "3", "--batch-size", "20"]))
    spec = importlib.util.spec_from_file_location("lost_mode", SCRIPT.parent / "lost_mode.py")
    lost_mode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lost_mode)
    assert lost_mode.main([str(run), "7", "2", str(tmp_path / "m.png"), "--data-root", str(mnist_root)]) == 0

    x_test, y_test = read_builtin_split("mnist", train=False, root=mnist_root)
    predicted = torch.tensor([int(c) for c in sgan.load_classifier(run).predict(x_test)])
    assert f"test 7s called 2: {int(((y_test == 7) & (predicted == 2)).sum())} of 1028" in capsys.readouterr().out
    picture = np.asarray(Image.open(tmp_path / "m.png"))
    assert picture.shape == (5 * 30 * 3, 170 + 20 * 30 * 3)
    x_train, y_train = read_builtin_split("mnist", train=True, root=mnist_root)
    labeled = torch.tensor(json.loads((run / "labeled_indices.json").read_text())["indices"])
    first_seven = x_train[labeled][y_train[labeled] == 7][0, 0].numpy()
    assert np.array_equal(picture[3:3 + 28 * 3:3, 170 + 3:170 + 3 + 28 * 3:3], first_seven)  # row 1, tile 1
