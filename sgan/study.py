"""Run a study: datasets x label budgets x recipes (x formulations) x seeds, one training run per cell, and
aggregate the test errors into results.md, results.json and accuracy_vs_labels.png under --study-dir.

    python -m sgan.study --study-dir runs/study                           # the full plan (many CPU-days)
    python -m sgan.study --study-dir runs/quick --labels mnist=100,1000 \\
        --recipes odena:k-logit,supervised --seeds 0 1 --max-steps 300     # a subset
    python -m sgan.study --study-dir runs/study --dry-run                 # the plan and each cell's state
    python -m sgan.study --study-dir runs/study --aggregate-only          # results from the runs so far

Each cell is a subprocess `python -m sgan.train ...` writing to
STUDY_DIR/runs/{dataset}/{recipe}[-{formulation}]/labels-{n}/seed-{s}/ (its output in train.log there), so a
failing run is reported and the study goes on. Running the same command again resumes the study: a cell with
a metrics.json is done and skipped, an interrupted cell continues from its newest checkpoint (--resume latest).
Ctrl-C or SIGTERM to the study, or a signal to one of its runs, stops it: the runs checkpoint, no new run starts.
A cell is identified by its folder only: to change the settings of finished cells, use another --study-dir.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import config as sgan_config
from .checkpoints import complete_checkpoints, lock_holder, read_json_object
from .data import DATASETS, absolute_spec, check_dataset, dataset_info, is_builtin, parse_num_labels
from .images import usable_cores
from .losses import FORMULATIONS

DEFAULT_LABELS = {"mnist": ("20", "50", "100", "1000", "30000"), "fashion-mnist": ("100", "1000")}
DEFAULT_SEEDS = (0, 1, 2)
# Recipes whose bare name in --recipes means one run per formulation: comparing them is the study's point.
PER_FORMULATION = ("odena",)
# Flags each cell sets itself; --extra may not set them.
CELL_FLAGS = ("--dataset", "--recipe", "--formulation", "--num-labels", "--seed", "--output-dir", "--resume", "--overwrite",
              "--epochs", "--max-steps")
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # so that the subprocesses import this same sgan


def dataset_folder_name(dataset: str) -> str:
    """A built-in dataset's name; for folder:PATH or npz:FILE, the kind, the file's name and a hash of the
    whole spec (two folders of the same name stay apart)."""
    if is_builtin(dataset):
        return dataset
    kind, _, path = dataset.partition(":")
    digest = hashlib.sha256(dataset.encode()).hexdigest()[:8]
    return f"{kind}-{Path(path).name or 'root'}-{digest}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    num_labels: str
    recipe: str
    formulation: str | None  # None: train's default, not passed
    seed: int

    @property
    def variant(self) -> str:
        return self.recipe + (f"-{self.formulation}" if self.formulation else "")

    def directory(self, study_dir: Path) -> Path:
        return (study_dir / "runs" / dataset_folder_name(self.dataset) / self.variant / f"labels-{self.num_labels}"
                / f"seed-{self.seed}")


    def train_flags(self, study_dir: Path, epochs: int | None, max_steps: int | None, extra: list[str]) -> list[str]:
        flags = ["--dataset", self.dataset, "--recipe", self.recipe, "--num-labels", self.num_labels,
                 "--seed", str(self.seed), "--output-dir", str(self.directory(study_dir))]
        if self.formulation:
            flags += ["--formulation", self.formulation]
        if epochs is not None:
            flags += ["--epochs", str(epochs)]
        if max_steps is not None:
            flags += ["--max-steps", str(max_steps)]
        return flags + extra


# ------------------------------------------------------------------------------------------------ the plan


def default_recipe_specs() -> list[str]:
    """Every recipe sgan.config knows (so new ones join by themselves), the supervised baseline last."""
    return sorted(sgan_config.RECIPES, key=lambda recipe: recipe == "supervised")


def parse_recipes(specs: list[str]) -> list[tuple[str, str | None]]:
    """['odena:k-logit,supervised', ...] -> [(recipe, formulation or None)]. A bare per-formulation recipe
    expands to every formulation; any other bare recipe runs with train's default formulation."""
    variants = []
    for spec in ",".join(specs).split(","):
        spec = spec.strip()
        if not spec:
            continue
        recipe, _, formulation = spec.partition(":")
        if recipe not in sgan_config.RECIPES:
            where = f" in {spec!r}" if spec != recipe else ""
            raise ValueError(f"--recipes: unknown recipe {recipe!r}{where}; this version has "
                             f"{', '.join(sgan_config.RECIPES)}")
        if formulation and formulation not in FORMULATIONS:
            raise ValueError(f"--recipes: unknown formulation {formulation!r} in {spec!r}; choose one of "
                             f"{', '.join(FORMULATIONS)} (RECIPE:FORMULATION, e.g. odena:k-logit)")
        if formulation:
            expanded = [(recipe, formulation)]
        elif recipe in PER_FORMULATION:
            expanded = [(recipe, f) for f in FORMULATIONS]
        else:
            expanded = [(recipe, None)]
        variants += [v for v in expanded if v not in variants]
    if not variants:
        raise ValueError("--recipes: no recipe given; e.g. --recipes odena:k-logit,supervised")
    return variants


def parse_labels(specs: list[str]) -> dict[str, list[str]]:
    """['mnist=20,50', 'fashion-mnist=100'] -> {dataset: [budgets]}, each budget checked as train checks it."""
    budgets = {}
    for spec in specs:
        dataset, equals, values = spec.rpartition("=")  # the last '=': a folder's path may hold one
        if not equals or not dataset or not values.strip():
            raise ValueError(f"--labels: expected DATASET=N,N,... (e.g. mnist=20,100), got {spec!r}")
        try:
            check_dataset(dataset)
        except ValueError as error:
            raise ValueError(f"--labels: {error}") from None
        if dataset in budgets:
            raise ValueError(f"--labels: {dataset} given twice; list all its budgets once, e.g. {dataset}=20,100")
        k = dataset_info(dataset).num_classes if is_builtin(dataset) else 1  # your own images: any number
        budgets[dataset] = []
        for value in values.split(","):
            value = value.strip().lower()
            try:
                n = parse_num_labels(value)
            except ValueError:
                raise ValueError(f"--labels: {value!r} in {spec!r} is not a positive integer or 'all'") from None
            if n is not None and n % k:
                raise ValueError(f"--labels: {n} in {spec!r} is not a multiple of the {k} classes of {dataset} "
                                 "(the labeled set is balanced over the classes)")
            if value not in budgets[dataset]:
                budgets[dataset].append(value)
    return budgets


def make_plan(datasets: list[str] | None, labels: dict[str, list[str]], variants, seeds) -> list[Cell]:
    """The cells, seed-major: a study stopped halfway already has one run of every other cell."""
    if datasets is None:  # --labels alone names the datasets to run
        datasets = list(labels) or list(DEFAULT_LABELS)
    stray = [d for d in labels if d not in datasets]
    if stray:
        raise ValueError(f"--labels names {', '.join(stray)}, which --datasets ({', '.join(datasets)}) leaves out")
    budgets = {}
    for dataset in datasets:
        check_dataset(dataset)
        if dataset not in labels and dataset not in DEFAULT_LABELS:
            raise ValueError(f"no default label budgets for {dataset}: give them with --labels {dataset}=N,N,...")
        budgets[dataset] = labels.get(dataset, DEFAULT_LABELS.get(dataset))
    return [Cell(dataset, n, recipe, formulation, seed)
            for seed in seeds for dataset in datasets for n in budgets[dataset] for recipe, formulation in variants]


def check_cell_flags(cell: Cell, flags: list[str]) -> None:
    """Reject flags train would refuse (e.g. a bad --extra) now, not after hours of other runs."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            sgan_config.parse_config(flags)
    except SystemExit:
        message = stderr.getvalue().strip().rpartition("error: ")[2] or "invalid flags"
        raise ValueError(f"train would refuse the run {cell.variant}/labels-{cell.num_labels}/seed-{cell.seed}: "
                         f"{message} (its flags: {shlex.join(flags)})") from None


def cell_flags(state: str) -> list[str]:
    """How a cell's run starts: an interrupted one resumes; a new cell's folder may hold a run that failed
    before its first checkpoint, so it starts again."""
    return ["--resume", "latest"] if state == "resume" else ["--overwrite"]


def cell_state(directory: Path) -> str:
    """'done' (a readable metrics.json), 'resume' (interrupted after a checkpoint) or 'new'."""
    try:
        read_json_object(directory / "metrics.json")
        return "done"
    except (OSError, ValueError):
        pass
    return "resume" if complete_checkpoints(directory) else "new"


# ------------------------------------------------------------------------------------------------ running


_running: set[subprocess.Popen] = set()  # the runs now training, so that a stop reaches them all
_running_lock = threading.Lock()
_stopping = threading.Event()  # set once the study is stopping: no new run starts


def run_cell(command: list[str], log: Path, threads: int | None = None) -> int | None:
    """Run one training subprocess, its output appended to `log`; its exit code, or None if the study is
    stopping and it did not start. threads: its OMP_NUM_THREADS, unless the environment sets one (runs side
    by side must not oversubscribe the cores)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    python_path = [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "a") as out:
        with _running_lock:
            if _stopping.is_set():
                return None
            out.write(f"\n$ {shlex.join(command)}\n")
            out.flush()
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            _running.add(process)
        try:
            return process.wait()
        finally:
            with _running_lock:
                _running.discard(process)


def stop_runs() -> None:
    """SIGTERM to every run still training: each writes a checkpoint and exits. (Ctrl-C in a terminal has
    reached them already; SIGTERM to the study alone has not.)"""
    _stopping.set()
    with _running_lock:
        for process in _running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)


# How a run stopped by a signal ends: 128 + SIGNAL, after its checkpoint or while it sets up; killed by it while
# importing (before sgan handles signals), -SIGNAL. (Before 128 + SIGNAL, a checkpointed stop exited 0.)
STOP_CODES = {-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}


def stopped_by_signal(code: int, state: str) -> bool:
    """Whether a run that exited with `code`, leaving its cell in `state` (cell_state), was stopped by a signal."""
    return code in STOP_CODES or (code == 0 and state != "done")


def _interrupt(signum, frame):
    _stopping.set()
    raise KeyboardInterrupt  # SIGTERM stops the study as Ctrl-C does


def _already_stopping(signum, frame):
    os.write(2, b"sgan.study: already stopping: waiting for the runs to write their checkpoints\n")


_say_lock = threading.Lock()


def say(text: str) -> None:
    """Print whole lines: runs report from several threads, and print()'s separate writes of the text and the
    newline glued their lines together."""
    with _say_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# ------------------------------------------------------------------------------------------------ results


def collect(study_dir: Path) -> list[dict]:
    """One record per finished run under STUDY_DIR/runs (whatever plan made it)."""
    records = []
    for path in sorted((study_dir / "runs").glob("*/*/labels-*/seed-*/metrics.json")):
        try:
            metrics = read_json_object(path)
            record = {key: metrics[key] for key in ("dataset", "recipe", "formulation", "num_labels", "seed",
                                                    "test_accuracy", "test_error", "steps", "epochs")}
            record["val_accuracy"] = metrics.get("val_accuracy")
            scores = [record[key] for key in ("test_accuracy", "test_error", "val_accuracy", "steps", "epochs")]
            if not all(value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
                       for value in scores) or not isinstance(record["dataset"], str):
                raise ValueError("its dataset, scores, steps or epochs are not what a run writes")
            record["dataset"] = absolute_spec(record["dataset"])  # runs before it was recorded absolute: one cell
        except (OSError, ValueError, KeyError) as error:
            print(f"sgan.study: skipping {path}: unreadable ({error})", file=sys.stderr)
            continue
        # The folder says whether the study chose the formulation (a bare recipe runs train's default).
        chosen = path.parents[2].name != record["recipe"]
        record["label"] = f"{record['recipe']}/{record['formulation']}" if chosen else record["recipe"]
        record["wall_seconds"] = metrics.get("wall_seconds")
        record["path"] = str(path)
        records.append(record)
    return records


def dataset_order(name: str) -> int:
    """Datasets in sgan.data's order (mnist first) in tables and plots."""
    return list(DATASETS).index(name) if name in DATASETS else len(DATASETS)


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample std over seeds; (None, None) when a run has no such score (its dataset has no test or
    validation images)."""
    if None in values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict]) -> list[dict]:
    """Group runs by (dataset, labels, recipe[/formulation]): mean and sample std over seeds."""
    groups = {}
    for record in records:
        groups.setdefault((record["dataset"], record["num_labels"], record["label"]), []).append(record)
    cells = []
    for (dataset, num_labels, label), runs in sorted(groups.items(), key=lambda g: (dataset_order(g[0][0]), g[0][1:])):
        runs = sorted(runs, key=lambda r: r["seed"])
        test_error = mean_std([r["test_error"] for r in runs])
        test_accuracy = mean_std([r["test_accuracy"] for r in runs])
        val_error = mean_std([None if r["val_accuracy"] is None else 1 - r["val_accuracy"] for r in runs])
        cells.append({
            "dataset": dataset, "num_labels": num_labels, "label": label, "n": len(runs),
            "test_error_mean": test_error[0], "test_error_std": test_error[1],
            "test_accuracy_mean": test_accuracy[0], "test_accuracy_std": test_accuracy[1],
            "val_error_mean": val_error[0], "val_error_std": val_error[1],
            "steps": sorted({r["steps"] for r in runs}),
            "epochs": sorted({r["epochs"] for r in runs}),
            "runs": [{key: r[key] for key in ("seed", "test_accuracy", "test_error", "val_accuracy", "steps",
                                               "epochs", "wall_seconds", "path")} for r in runs],
        })
    return cells


NO_TEST = "no test"  # a cell whose runs have no test score: their dataset has no test images


def format_cell(cell: dict) -> str:
    def error(name):
        return f"{100 * cell[name + '_mean']:.2f}" + (f" ± {100 * cell[name + '_std']:.2f}" if cell["n"] > 1 else "")

    steps = "/".join(str(s) for s in cell["steps"])
    epochs = "/".join(f"{e:.3g}" for e in cell["epochs"])
    runs = f"n={cell['n']}, {steps} steps = {epochs} ep"
    if cell["test_error_mean"] is not None:
        return f"{error('test_error')} ({runs})"
    val = f"val {error('val_error')}, " if cell["val_error_mean"] is not None else ""
    return f"{NO_TEST} ({val}{runs})"


def results_markdown(cells: list[dict], regenerate: str) -> str:
    labels = sorted({c["label"] for c in cells})
    by_key = {(c["dataset"], c["num_labels"], c["label"]): c for c in cells}
    rows = list(dict.fromkeys((c["dataset"], c["num_labels"]) for c in cells))  # cells come sorted
    lines = ["Test error (%): mean ± sample standard deviation over seeds; n = finished seeds, then the training "
             "steps (and epochs) the runs did.", "",
             "| dataset | labels | " + " | ".join(labels) + " |",
             "|---|---:|" + "---|" * len(labels)]
    for dataset, num_labels in rows:
        values = [format_cell(by_key[dataset, num_labels, label]) if (dataset, num_labels, label) in by_key else "–"
                  for label in labels]
        lines.append(f"| {dataset} | {num_labels} | " + " | ".join(values) + " |")
    if any(c["test_error_mean"] is None for c in cells):
        lines += ["", f"{NO_TEST}: the runs' dataset has no test images (a folder's test/, an npz's x_test and "
                      "y_test), so they have no test error; the validation error is shown where they have one, and "
                      "the plot leaves them out."]
    lines += ["", f"Regenerate this table, results.json and accuracy_vs_labels.png: `{regenerate}`. "
                  "Each run's exact settings are in its config.yaml under runs/."]
    return "\n".join(lines) + "\n"


def plot_accuracy(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    cells = [c for c in cells if c["test_accuracy_mean"] is not None]  # the plot is of test accuracy
    if not cells:
        path.unlink(missing_ok=True)  # an earlier aggregate's plot would outlive its runs
        return
    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [c for c in cells if c["dataset"] == dataset]
        for label in sorted({c["label"] for c in mine}):
            line = sorted((c for c in mine if c["label"] == label), key=lambda c: c["num_labels"])
            ax.errorbar([c["num_labels"] for c in line], [100 * c["test_accuracy_mean"] for c in line],
                        yerr=[100 * c["test_accuracy_std"] for c in line], marker="o", capsize=3, label=label)
        budgets = sorted({c["num_labels"] for c in mine})
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labeled training images")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(study_dir: Path) -> list[dict]:
    """Aggregate every finished run under study_dir into results.md, results.json and accuracy_vs_labels.png."""
    cells = aggregate(collect(study_dir))
    if not cells:
        return cells
    regenerate = f"python -m sgan.study --study-dir {shlex.quote(str(study_dir))} --aggregate-only"
    (study_dir / "results.md").write_text(results_markdown(cells, regenerate))
    (study_dir / "results.json").write_text(json.dumps({"regenerate": regenerate, "cells": cells}, indent=2) + "\n")
    plot_accuracy(cells, study_dir / "accuracy_vs_labels.png")
    return cells


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sgan.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-dir", type=Path, default=Path("runs/study"),
                        help="where the runs and the results go (default: runs/study)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="built-in datasets, folder:PATH or npz:FILE to run (default: those named by --labels, else "
                             f"{' '.join(DEFAULT_LABELS)})")
    parser.add_argument("--labels", nargs="+", default=[], metavar="DATASET=N,N",
                        help="label budgets per dataset, e.g. mnist=20,100 fashion-mnist=100 ('all' for every label; "
                             "default: " + " ".join(f"{d}={','.join(n)}" for d, n in DEFAULT_LABELS.items()) + ")")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE[:FORMULATION]",
                        help="comma- or space-separated; a bare " + "/".join(PER_FORMULATION) + " runs every "
                             "formulation (default: every recipe of this version: "
                             f"{','.join(default_recipe_specs())})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="seeds per cell (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=None, help="--epochs of every run (default: train's, 1)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="--max-steps of every run: cuts each short of its --epochs (default: none)")
    parser.add_argument("--extra", default="", help="more train flags for every run, one quoted string, e.g. "
                        "--extra \"--tracker none --batch-size 50\"")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each with cores/jobs threads (default: 1, one run at a time)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, each cell's state and command; run nothing")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="only rebuild results.md/json and the plot from the finished runs")
    return parser


def parse_args(argv: list[str] | None = None):
    """Flags -> (args, plan, extra flags). Exits with a usage message (code 2) on a bad spec."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # argparse reads "--extra --cpu" as two flags: make it --extra=--cpu
        if argv[i] == "--extra":
            argv[i:i + 2] = [f"--extra={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    existing = next(path for path in (args.study_dir, *args.study_dir.parents) if path.exists())
    if not existing.is_dir():  # now, not as an error of the first run's thread
        parser.error(f"--study-dir {args.study_dir}: {existing} is a file, not a folder; give a folder for the "
                     "runs and results (it is created if missing)")
    if args.aggregate_only:
        return args, [], []
    try:
        extra = shlex.split(args.extra)
        fixed = [flag for flag in extra if flag.split("=")[0] in CELL_FLAGS]
        if fixed:
            raise ValueError(f"--extra may not set {', '.join(fixed)}: the study sets it for each run "
                             "(for --epochs and --max-steps use the study's own flags)")
        if args.epochs is not None and args.epochs < 1 or args.max_steps is not None and args.max_steps < 1:
            raise ValueError("--epochs and --max-steps must be >= 1")
        if args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
        variants = parse_recipes(args.recipes or default_recipe_specs())
        plan = make_plan(args.datasets, parse_labels(args.labels), variants, args.seeds)
        for cell in plan:
            check_cell_flags(cell, cell.train_flags(args.study_dir, args.epochs, args.max_steps, extra))
    except ValueError as error:
        parser.error(str(error))
    return args, plan, extra


def print_results(study_dir: Path) -> int:
    """--aggregate-only: write and print the tables of every finished run."""
    if not write_results(study_dir):
        print(f"error: no finished runs (metrics.json) under {study_dir / 'runs'}", file=sys.stderr)
        return 1
    print((study_dir / "results.md").read_text())
    return 0


def plan_cells(args, plan: list[Cell], extra: list[str]) -> list[tuple[str, Path, list[str]]]:
    """Say what each cell of the plan is (done, to resume, to start) and return the ones to run:
    (prefix, folder, train command without its resume flags, which run_planned adds)."""
    study_dir = args.study_dir
    states = [cell_state(cell.directory(study_dir)) for cell in plan]
    runs = f"{len(plan)} run{'' if len(plan) == 1 else 's'}"
    print(f"sgan.study: {runs} under {study_dir / 'runs'}: {states.count('done')} done, "
          f"{states.count('resume')} to resume, {states.count('new')} to start")
    todo = []
    for i, (cell, state) in enumerate(zip(plan, states), 1):
        directory = cell.directory(study_dir)
        command = [sys.executable, "-m", "sgan.train", *cell.train_flags(study_dir, args.epochs, args.max_steps, extra)]
        prefix = f"[{i}/{len(plan)}] {directory.relative_to(study_dir)}"
        if args.dry_run:
            print(f"{prefix}: {state}" + ("" if state == "done" else f"\n    {shlex.join(command + cell_flags(state))}"))
        elif state == "done":
            print(f"{prefix}: done, skipped")
        else:
            todo.append((prefix, directory, command))
    return todo


def run_planned(prefix: str, directory: Path, command: list[str], threads: int | None):
    """Run one planned cell: (exit code or None if not started, the cell's state afterwards, seconds)."""
    if _stopping.is_set():
        return None, None, 0.0
    # The cell as it is now, not at the plan: another study of the folder may have trained or be training
    # it (a new cell's --overwrite would delete that run's finished outputs).
    holder, state = lock_holder(directory), cell_state(directory)
    if holder or state == "done":
        say(f"{prefix}: {f'{holder} is training it now' if holder else 'finished by another process'}, skipped")
        return None, "busy" if holder else "done", 0.0
    command = command + cell_flags(state)
    action = f"resuming from {complete_checkpoints(directory)[-1].name}" if state == "resume" else "running"
    say(f"{prefix}: {action} (log: {directory / 'train.log'})")
    start = time.perf_counter()
    code = run_cell(command, directory / "train.log", threads)
    if code is None:
        return None, state, 0.0
    state = cell_state(directory)
    if stopped_by_signal(code, state):
        _stopping.set()  # here, before this worker takes the next cell
    return code, state, time.perf_counter() - start


def score_of(directory: Path) -> str:
    """A finished run's score, as the study reports it."""
    metrics = read_json_object(directory / "metrics.json")
    if metrics["test_error"] is not None:
        return f"test error {100 * metrics['test_error']:.2f}%"
    if metrics.get("val_accuracy") is not None:
        return f"no test images; val error {100 * (1 - metrics['val_accuracy']):.2f}%"
    return "no test or validation images to score"


def main(argv: list[str] | None = None) -> int:
    args, plan, extra = parse_args(argv)
    study_dir = args.study_dir
    if args.aggregate_only:
        return print_results(study_dir)
    todo = plan_cells(args, plan, extra)
    if args.dry_run:
        return 0
    threads = max(1, usable_cores() // args.jobs) if args.jobs > 1 else None  # the cores we may use (taskset)
    failed, ran, busy = [], 0, []
    _stopping.clear()
    stopped = []  # runs stopped by a signal
    handlers = {}  # the signal handlers to restore
    if threading.current_thread() is threading.main_thread():
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)
    pool = ThreadPoolExecutor(max_workers=args.jobs)  # runs are subprocesses: threads only wait for them
    futures = {}
    try:
        try:
            for item in todo:
                futures[pool.submit(run_planned, *item, threads)] = item
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                prefix, directory = futures[future][:2]
                code, state, seconds = future.result()
                if state == "busy":
                    busy.append(directory)
                if code is None:
                    continue  # not started: the study is stopping, or another process has the cell
                ran += 1
                if code == 0 and state == "done":
                    say(f"{prefix}: {score_of(directory)} ({seconds:.0f} s)")
                elif stopped_by_signal(code, state):
                    stopped.append(directory)
                    for other in futures:
                        other.cancel()  # whoever stopped this run is stopping the study: start nothing new
                    checkpoints = complete_checkpoints(directory)
                    running = sum(other.running() for other in futures)
                    say(f"{prefix}: stopped by a signal "
                        f"({f'checkpoint {checkpoints[-1].name}' if checkpoints else 'before its first checkpoint'})"
                        f"; starting no new run" + (f", waiting for the {running} running" if running else ""))
                else:
                    failed.append(directory)
                    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    say(f"{prefix}: FAILED ({why}): {last_line(directory / 'train.log')}\n"
                        f"    full log: {directory / 'train.log'}")
                write_results(study_dir)  # the tables are up to date after every run
        except KeyboardInterrupt:
            if handlers:  # a second Ctrl-C or SIGTERM must not cut the wait for the checkpoints short
                handlers.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, _already_stopping)
            stop_runs()
            pool.shutdown(wait=True, cancel_futures=True)
            write_results(study_dir)
            print("sgan.study: interrupted; the runs that were training wrote a checkpoint. Run the same command "
                  "again to resume", file=sys.stderr)
            return 130
    finally:
        if not all(future.done() for future in futures):
            stop_runs()  # an unexpected error: the runs still training checkpoint and stop with the study
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stopped:
        write_results(study_dir)
        print(f"sgan.study: stopped: {len(stopped)} run(s) stopped by a signal, {len(todo) - ran} not started"
              + "".join(f"\n    failed: {directory}" for directory in failed)
              + "\nRun the same command again to resume", file=sys.stderr)
        return 130
    cells = write_results(study_dir)
    print(f"sgan.study: ran {ran}, skipped {len(plan) - ran - len(busy)}, failed {len(failed)}"
          + (f", busy {len(busy)}" if busy else "") + (f"; results in {study_dir / 'results.md'}" if cells else ""))
    for directory in failed:
        print(f"    failed: {directory} (see train.log there; run the same command again to retry)")
    for directory in busy:
        print(f"    busy: {directory} (another process is training it; run the same command again once it ends "
              "to see it in the results)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
