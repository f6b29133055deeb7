"""Training speed on this machine: throughput per recipe and loss backend, and time to a test accuracy.

    python benchmarks/training.py throughput [--recipes seed,salimans,supervised] [--backends cpp,torch]
                                             [--steps 120] [--warmup-steps 20] [--threads N] [--data-root DIR]
    python benchmarks/training.py time-to-accuracy RUN_DIR [RUN_DIR ...] [--targets 0.98,0.99]

throughput  trains each (recipe, backend) twice in this process, for --warmup-steps and for --warmup-steps +
            --steps steps (MNIST, 100 labels, seed 0, no tracker, no checkpoints), and divides the extra steps by
            the extra wall time: set-up, the first slow steps and the final evaluation cancel out. Side by side in
            one run, so the ratios hold even where absolute times are noisy. images/s counts the real images
            D trains on per step (labeled + unlabeled), as metrics.json does.
time-to-accuracy  reads finished runs' metrics.json (per-epoch test or --split val accuracy and wall time, e.g.
            the study's runs) and reports, per run and over the runs of each recipe, the wall time and epoch at which
            the test accuracy first reached each target (evaluated once per epoch, so the time is that epoch's end).
Both print a table and write JSON (default benchmarks/results/training_<command>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def train_once(recipe: str, backend: str, steps: int, data_root: str | None, workdir: Path) -> dict:
    from sgan.config import parse_config
    from sgan.train import train

    flags = ["--recipe", recipe, "--loss-backend", backend, "--max-steps", str(steps), "--epochs", "1",
             "--seed", "0", "--tracker", "none", "--checkpoint-every", "0", "--cpu",
             "--output-dir", str(workdir / f"{recipe}-{backend}-{steps}")]
    if data_root:
        flags += ["--data-root", data_root]
    return train(parse_config(flags))


def throughput(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sgan-bench-") as tmp:
        for recipe in args.recipes:
            for backend in args.backends:
                short = train_once(recipe, backend, args.warmup_steps, args.data_root, Path(tmp))
                long = train_once(recipe, backend, args.warmup_steps + args.steps, args.data_root, Path(tmp))
                seconds = long["wall_seconds"] - short["wall_seconds"]
                steps_per_second = args.steps / seconds
                rows.append({"recipe": recipe, "loss_backend": long["loss_backend"], "steps": args.steps,
                             "seconds": seconds, "steps_per_second": steps_per_second,
                             "images_per_second": steps_per_second * long["images_per_step"]})
    by_recipe = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], {})[row["loss_backend"]] = row["steps_per_second"]
    print(f"\ntraining throughput, MNIST, batch 100, {torch.get_num_threads()} thread(s): steps/s over "
          f"{args.steps} steps after {args.warmup_steps}")
    print(f"{'recipe':<11} {'backend':<8} {'steps/s':>8} {'images/s':>9} {'vs torch':>9}")
    for row in rows:
        base = by_recipe[row["recipe"]].get("torch")
        ratio = f"{row['steps_per_second'] / base:.2f}x" if base else "-"
        print(f"{row['recipe']:<11} {row['loss_backend']:<8} {row['steps_per_second']:>8.2f} "
              f"{row['images_per_second']:>9.0f} {ratio:>9}")
    return {"command": "throughput", "machine": machine(), "rows": rows}


def first_reaching(history: list[dict], target: float, key: str = "test_accuracy") -> dict | None:
    for entry in history:
        if entry[key] >= target:
            return entry
    return None


def run_networks(run_dir: Path) -> str | None:
    """The run's --networks from its config.yaml, for runs whose metrics.json predates recording it."""
    import yaml

    try:
        networks = yaml.safe_load((run_dir / "config.yaml").read_text()).get("networks")
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return networks if networks not in (None, "auto") else None


def time_to_accuracy(args) -> dict:
    key = f"{args.split}_accuracy"
    runs = []
    for run_dir in args.runs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: pass the output directories of finished runs")
        metrics = json.loads(path.read_text())
        history = metrics.get("history") or []
        if not history or "wall_seconds" not in history[0]:
            raise SystemExit(f"error: {path} has no per-epoch wall time (written by sgan before its history "
                             "recorded it): re-run that training")
        if any(entry.get(key) is None for entry in history):
            raise SystemExit(f"error: {path} has no {args.split} accuracy per epoch"
                             + (" (train with --val-size N to hold out a validation split)" if args.split == "val" else ""))
        reached = {}
        for target in args.targets:
            entry = first_reaching(history, target, key)
            reached[str(target)] = None if entry is None else {"epoch": entry["epoch"],
                                                               "wall_seconds": entry["wall_seconds"]}
        networks = metrics.get("networks") or run_networks(Path(run_dir))
        label = metrics["recipe"] + (f" ({networks} networks)" if networks not in (None, metrics["recipe"]) else "")
        if args.label_by_dir:  # runs of one recipe that differ in other flags
            label = Path(run_dir).name
        runs.append({"run": str(run_dir), "recipe": metrics["recipe"], "label": label, "seed": metrics["seed"],
                     "num_labels": metrics["num_labels"], "epochs": metrics["epochs"],
                     "split": args.split, "final_accuracy": history[-1][key],
                     "best_accuracy": max(e[key] for e in history),
                     "wall_seconds": metrics["wall_seconds"], "reached": reached, "history": history})
    print(f"\ntime to {args.split} accuracy (evaluated once per epoch)")
    header = f"{'run':<38} {'epochs':>6} {'final':>7} {'best':>7} " + " ".join(
        f"{'to ' + format(t, '.0%'):>16}" for t in args.targets)
    print(header)
    for run in runs:
        cells = []
        for target in args.targets:
            hit = run["reached"][str(target)]
            cells.append(f"{'not reached':>16}" if hit is None else
                         f"{hit['wall_seconds'] / 60:>7.1f} min (ep {hit['epoch']:g})".rjust(16))
        print(f"{run['label'] + ' seed ' + str(run['seed']):<38} {run['epochs']:>6g} "
              f"{run['final_accuracy']:>7.2%} {run['best_accuracy']:>7.2%} " + " ".join(cells))
    summary = {}  # per label: runs of different recipes (salimans and its baseline) are never pooled
    for label in dict.fromkeys(run["label"] for run in runs):
        mine = [run for run in runs if run["label"] == label]
        summary[label] = {}
        for target in args.targets:
            hits = [r["reached"][str(target)] for r in mine if r["reached"][str(target)] is not None]
            entry = summary[label][str(target)] = {
                "runs_reaching": len(hits), "runs": len(mine),
                "median_wall_seconds": statistics.median(h["wall_seconds"] for h in hits) if hits else None,
                "median_epoch": statistics.median(h["epoch"] for h in hits) if hits else None}
            if hits:
                print(f"{label}, {target:.0%}: reached by {len(hits)}/{len(mine)} runs, median "
                      f"{entry['median_wall_seconds'] / 60:.1f} min (epoch {entry['median_epoch']:g})")
            else:
                print(f"{label}, {target:.0%}: reached by none of the {len(mine)} runs")
    if args.plot:
        plot_curves(runs, args.targets, args.plot, key)
        print(f"wrote {args.plot}")
    return {"command": "time-to-accuracy", "machine": machine(), "runs": runs, "summary": summary}


def plot_curves(runs: list[dict], targets: list[float], path: Path, key: str = "test_accuracy") -> None:
    """Test (or validation) accuracy after each epoch, one line per run (colour per recipe), the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for run in runs:
        first = run["label"] not in colours  # one legend entry per label
        colour = colours.setdefault(run["label"], f"C{len(colours)}")
        epochs = [e["epoch"] for e in run["history"]]
        accuracy = [100 * e[key] for e in run["history"]]
        ax.plot(epochs, accuracy, color=colour, marker=".", label=run["label"] if first else None)
    for target in targets:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(("validation" if key == "val_accuracy" else "test") + " accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comma_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput", help="steps/s per recipe and loss backend")
    speed.add_argument("--recipes", type=comma_list, default=["odena", "salimans", "supervised"])
    speed.add_argument("--backends", type=comma_list, default=["cpp", "torch"])
    speed.add_argument("--steps", type=int, default=120, help="timed steps (after the warm-up)")
    speed.add_argument("--warmup-steps", type=int, default=20)
    speed.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    speed.add_argument("--data-root", default=None, help="data root (default: $SGAN_DATA_ROOT or ./data)")
    speed.add_argument("--out", type=Path, default=RESULTS / "training_throughput.json")
    reach = commands.add_parser("time-to-accuracy", help="wall time to test-accuracy targets, from finished runs")
    reach.add_argument("runs", nargs="+", help="output directories of finished runs (with metrics.json)")
    reach.add_argument("--targets", type=lambda text: [float(t) for t in comma_list(text)], default=[0.98, 0.99])
    reach.add_argument("--label-by-dir", action="store_true",
                       help="name each run by its folder (default: by recipe, one colour per recipe)")
    reach.add_argument("--split", choices=("test", "val"), default="test",
                       help="the accuracy to report: test, or val (runs with --val-size; the one to choose on)")
    reach.add_argument("--out", type=Path, default=RESULTS / "training_time_to_accuracy.json")
    reach.add_argument("--plot", type=lambda text: Path(text) if text else None,
                       default=RESULTS / "training_time_to_accuracy.png",
                       help="PNG of test accuracy per epoch, one line per run ('' for none)")
    args = parser.parse_args(argv)
    if args.command == "throughput" and (args.steps < 1 or args.warmup_steps < 1):
        parser.error("--steps and --warmup-steps must be >= 1")
    result = throughput(args) if args.command == "throughput" else time_to_accuracy(args)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
