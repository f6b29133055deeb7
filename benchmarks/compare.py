"""Training throughput of this checkout against another one (e.g. an older commit), side by side.

    git worktree add /tmp/base a2ca503
    python benchmarks/compare.py /tmp/base --rounds 3 --threads 1 \
        --recipes odena,salimans,supervised --base-recipes seed,salimans,supervised

Runs `benchmarks/training.py throughput` of each checkout in turn (base, this, base, this, ...), --rounds
times, so both see the same machine load over the same minutes; each round times --steps steps per recipe
after --warmup-steps. Reports the median steps/s of each side per recipe and their ratio (this / base), prints
a table and writes JSON (default benchmarks/results/training_throughput_compare.json). --base-recipes names
the same recipes as the base checkout calls them (odena was called seed before).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "benchmarks"))
from training import RESULTS, write_result  # noqa: E402  (the benchmarks folder is no package)


def commit_of(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def throughput(checkout: Path, recipes: list[str], args, scratch: Path) -> dict[str, float]:
    """steps/s per recipe from one run of the checkout's own benchmark (its own sgan, its own loss op)."""
    out = scratch / "round.json"
    command = [sys.executable, str(checkout / "benchmarks" / "training.py"), "throughput", "--recipes",
               ",".join(recipes), "--backends", args.backend, "--steps", str(args.steps), "--warmup-steps",
               str(args.warmup_steps), "--threads", str(args.threads), "--out", str(out)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    # each checkout imports its own sgan; its JIT-built op (if any) gets a cache of its own
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(args.threads),
           "TORCH_EXTENSIONS_DIR": str(scratch / "torch_extensions" / checkout.name)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=checkout, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return {row["recipe"]: row["steps_per_second"] for row in json.loads(out.read_text())["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the other checkout (a git worktree of the commit to compare with)")
    parser.add_argument("--this", type=Path, default=HERE, help="the checkout to measure (default: this one)")
    parser.add_argument("--recipes", default="odena,salimans,supervised")
    parser.add_argument("--base-recipes", default=None, help="the same recipes as the base names them "
                        "(default: --recipes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--data-root", default=str(HERE / "data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "training_throughput_compare.json")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    base_recipes = (args.base_recipes or args.recipes).split(",")
    if len(base_recipes) != len(recipes):
        parser.error("--base-recipes must name as many recipes as --recipes")
    if not (args.base / "benchmarks" / "training.py").is_file():
        parser.error(f"{args.base}: no benchmarks/training.py: pass a checkout of sgan")
    samples = {"base": {r: [] for r in recipes}, "this": {r: [] for r in recipes}}
    with tempfile.TemporaryDirectory(prefix="sgan-compare-") as tmp:
        for round_ in range(args.rounds):
            base = throughput(args.base.resolve(), base_recipes, args, Path(tmp))
            this = throughput(args.this.resolve(), recipes, args, Path(tmp))
            for recipe, base_recipe in zip(recipes, base_recipes):
                samples["base"][recipe].append(base[base_recipe])
                samples["this"][recipe].append(this[recipe])
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{r} {samples['this'][r][-1]:.2f} vs {samples['base'][r][-1]:.2f}" for r in recipes), flush=True)
    rows = []
    print(f"\nsteps/s, median of {args.rounds} alternating rounds, {args.threads} thread(s), backend {args.backend}")
    print(f"{'recipe':<11} {'base':>8} {'this':>8} {'this/base':>10}")
    for recipe in recipes:
        base, this = statistics.median(samples["base"][recipe]), statistics.median(samples["this"][recipe])
        rows.append({"recipe": recipe, "base_steps_per_second": base, "this_steps_per_second": this,
                     "ratio": this / base, "base_samples": samples["base"][recipe],
                     "this_samples": samples["this"][recipe]})
        print(f"{recipe:<11} {base:>8.2f} {this:>8.2f} {this / base:>9.2f}x")
    result = {"base": str(args.base), "base_commit": commit_of(args.base), "this_commit": commit_of(args.this),
              "threads": args.threads, "steps": args.steps, "warmup_steps": args.warmup_steps,
              "backend": args.backend, "rounds": args.rounds, "rows": rows}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
