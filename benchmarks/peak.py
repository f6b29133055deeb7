"""This machine's matrix-product peak, and how much of it a training step uses.

    python benchmarks/peak.py [--threads 1,2] [--recipes salimans] [--throughput FILE]

peak    GFLOPS of float32 and bf16 matrix products of the salimans D's shapes (300 rows: one D forward over the
        labeled, unlabeled and generated batches), per thread count. The best float32 figure is the sgemm peak.
flops   floating-point operations per training step of each recipe, counted by torch's FlopCounterMode (matrix
        products and convolutions) as the difference between a 4-step and a 2-step run, so that set-up and the
        final evaluation cancel.
With --throughput (a JSON written by benchmarks/compare.py or `training.py throughput`), each measured steps/s
becomes GFLOPS and a share of the float32 peak at that thread count (both sides of a comparison with this
checkout's count: a step's products are the same at a2ca503). Prints tables and writes JSON (default
benchmarks/results/peak.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import RESULTS, comma_list, machine, write_result  # noqa: E402  (the benchmarks folder is no package)

# (rows, inner, outputs) of the salimans D's products over 300 rows: forward, and the weight gradient's
SHAPES = [(300, 784, 1000), (300, 1000, 500), (300, 500, 250), (300, 250, 250), (1000, 300, 784)]


def gflops(rows: int, inner: int, outputs: int, dtype, seconds: float = 0.5) -> float:
    import torch

    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, outputs).to(dtype)
    for _ in range(5):
        a @ b
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        repeats += 1
    return 2 * rows * inner * outputs * repeats / (time.perf_counter() - start) / 1e9


def peak(threads: list[int]) -> dict:
    import torch

    table = {}
    for count in threads:
        torch.set_num_threads(count)
        table[count] = {name: {"x".join(map(str, shape)): gflops(*shape, dtype) for shape in SHAPES}
                        for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}
    print("\nGFLOPS of matrix products (rows x inner x outputs)")
    print(f"{'threads':>7} {'dtype':<8} " + " ".join(f"{'x'.join(map(str, s)):>14}" for s in SHAPES))
    for count, by_dtype in table.items():
        for name, row in by_dtype.items():
            print(f"{count:>7} {name:<8} " + " ".join(f"{value:>14.0f}" for value in row.values()))
    return {str(count): {name: {"by_shape": row, "best": max(row.values())} for name, row in by_dtype.items()}
            for count, by_dtype in table.items()}


def flops_per_step(recipe: str, data_root: str | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from sgan.config import parse_config
    from sgan.train import train

    counts = {}
    with tempfile.TemporaryDirectory(prefix="sgan-flops-") as tmp:
        for steps in (2, 4):
            flags = ["--recipe", recipe, "--max-steps", str(steps), "--seed", "0", "--tracker", "none",
                     "--checkpoint-every", "0", "--cpu", "--output-dir", f"{tmp}/{steps}"]
            if data_root:
                flags += ["--data-root", data_root]
            with FlopCounterMode(display=False) as counter:
                train(parse_config(flags))
            counts[steps] = counter.get_total_flops()
    return (counts[4] - counts[2]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=lambda text: [int(t) for t in comma_list(text)], default=[1, 2])
    parser.add_argument("--recipes", type=comma_list, default=["salimans"])
    parser.add_argument("--throughput", type=Path, default=None,
                        help="steps/s to express as GFLOPS: a JSON of benchmarks/compare.py or training.py throughput")
    parser.add_argument("--data-root", default=None, help="data root (default: $SGAN_DATA_ROOT or ./data)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peak.json")
    args = parser.parse_args(argv)

    result = {"machine": machine(), "peak_gflops": peak(args.threads), "flops_per_step": {}}
    print("\nfloating-point operations per training step (matrix products)")
    for recipe in args.recipes:
        result["flops_per_step"][recipe] = flops_per_step(recipe, args.data_root)
        print(f"{recipe:<11} {result['flops_per_step'][recipe] / 1e9:.2f} GFLOP")
    if args.throughput:
        result["use"] = share_of_peak(json.loads(args.throughput.read_text()), result)
    write_result(result, args.out)
    return 0


def share_of_peak(throughput: dict, result: dict) -> list[dict]:
    """Each measured steps/s of a recipe counted here, as GFLOPS and as a share of the float32 peak."""
    threads = str(throughput.get("threads") or throughput.get("machine", {}).get("threads"))
    peak_gflops = result["peak_gflops"].get(threads, {}).get("float32", {}).get("best")
    if peak_gflops is None:
        raise SystemExit(f"error: the throughput file ran on {threads} thread(s); measure that peak too (--threads)")
    rows = []
    for side, per_recipe in steps_per_second(throughput).items():
        for recipe, rate in per_recipe.items():
            if recipe in result["flops_per_step"]:
                used = rate * result["flops_per_step"][recipe] / 1e9
                rows.append({"side": side, "recipe": recipe, "threads": int(threads), "steps_per_second": rate,
                             "gflops": used, "share_of_float32_peak": used / peak_gflops})
    print(f"\nshare of the float32 peak ({peak_gflops:.0f} GFLOPS on {threads} thread(s))")
    for row in rows:
        print(f"{row['side']:<10} {row['recipe']:<11} {row['steps_per_second']:>7.2f} steps/s "
              f"{row['gflops']:>7.1f} GFLOPS {row['share_of_float32_peak']:>6.0%}")
    return rows


def steps_per_second(throughput: dict) -> dict[str, dict[str, float]]:
    """{side: {recipe: steps/s}} from either benchmark's JSON ('this' and 'base' sides, or one side)."""
    if "rows" in throughput and throughput.get("command") == "throughput":
        return {"this": {row["recipe"]: row["steps_per_second"] for row in throughput["rows"]}}
    return {side: {row["recipe"]: row[f"{side}_steps_per_second"] for row in throughput["rows"]}
            for side in ("base", "this")}


if __name__ == "__main__":
    sys.exit(main())
