"""The Gaussian noise of the salimans D: sgan's op against torch's add + randn_like, side by side.

    python benchmarks/noise.py [--threads 1,2] [--rounds 5] [--out FILE]

Times x + sigma * N(0, 1) on float32 tensors of the shapes one salimans step draws noise for (a D forward
over 300 rows, and the G step's two feature passes over 100 rows), alternating the
two in each round, and prints the median per thread count. Writes JSON (default
benchmarks/results/noise.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import RESULTS, comma_list, machine, write_result  # noqa: E402  (the benchmarks folder is no package)

# (rows, features) of every noise call in one salimans step: D's forward over 300 rows (the input and five
# hidden layers), then the G step's two feature passes over 100 rows (the input and the first four)
STEP_SHAPES = [(300, 784), (300, 1000), (300, 500), (300, 250), (300, 250), (300, 250),
               *[(100, 784), (100, 1000), (100, 500), (100, 250), (100, 250)] * 2]


def time_step_noise(add_noise, tensors, seconds: float) -> float:
    """Milliseconds to add noise to every tensor once (one step's noise), averaged over `seconds`."""
    for x in tensors:
        add_noise(x)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x in tensors:
            add_noise(x)
        repeats += 1
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=comma_list, default=["1", "2"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per round and implementation")
    parser.add_argument("--out", type=Path, default=RESULTS / "noise.json")
    args = parser.parse_args(argv)

    import torch

    from sgan import ops

    if "cpp" not in ops.available_backends():
        print("sgan's compiled op is unavailable here: nothing to compare (see docs/fused-op.md)", file=sys.stderr)
        return 1
    tensors = [torch.randn(*shape) for shape in STEP_SHAPES]
    implementations = {"torch": lambda x: ops.reference_gaussian_noise(x, 0.5),
                       "sgan": lambda x: ops.add_gaussian_noise(x, 0.5)}
    results = {}
    print(f"one salimans step's noise ({sum(x.numel() for x in tensors):,} floats in {len(tensors)} calls), ms")
    print(f"{'threads':>7} {'torch':>8} {'sgan':>8} {'torch / sgan':>13}")
    for threads in map(int, args.threads):
        torch.set_num_threads(threads)
        rounds = {name: [] for name in implementations}
        for _ in range(args.rounds):
            for name, add_noise in implementations.items():
                rounds[name].append(time_step_noise(add_noise, tensors, args.seconds))
        median = {name: statistics.median(values) for name, values in rounds.items()}
        results[str(threads)] = {"rounds_ms": rounds, "median_ms": median, "ratio": median["torch"] / median["sgan"]}
        print(f"{threads:>7} {median['torch']:>8.2f} {median['sgan']:>8.2f} {median['torch'] / median['sgan']:>12.2f}x")
    write_result({"benchmark": "noise", "machine": machine(), "shapes": STEP_SHAPES, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
