"""Forward + backward time of the discriminator loss on CPU: fused op vs eager PyTorch vs torch.compile.

    python benchmarks/loss.py [--batch-sizes 256,4096,65536,1048576] [--classes 10,100]
                              [--formulations two-head,k-plus-one,k-logit] [--threads N] [--out PATH]

Measured side by side in one run, per (formulation, B, K), float32 logits, best of timed repeats:
  fused     sgan.ops.discriminator_loss_sums(backend="cpp") + autograd backward
  eager     sgan.losses.discriminator_loss_sums (the reference) + autograd backward
  compiled  torch.compile of that reference (its input check graph-breaks; the math compiles)
  floor     moving the bytes the loss must touch at least: read the logits and the targets, write the
            logits' gradient (into a preallocated tensor)
  clone     the same into a new tensor, as the op must return one (allocation + page faults when large)
  exp bound the op's math at its cheapest: the kernels' own vectorised exp, timed on data in cache, twice
            per class logit (the forward's logsumexp and the backward's softmax each need one), shared
            perfectly between the threads. No other work, no memory traffic: a lower bound for these kernels.
Prints a table with the ratios and writes JSON (default benchmarks/results/loss.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sgan import losses, ops  # noqa: E402


def time_it(fn, min_seconds: float, max_repeats: int = 200) -> float:
    """Best (minimum) seconds per call over repeats, after warm-up calls: the minimum is the estimate least
    disturbed by other processes on the machine."""
    for _ in range(3):
        fn()
    times = []
    total_start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - total_start < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def exp_seconds_per_element(min_seconds: float) -> float:
    """One thread's time per element of the fused kernels' vectorised exp (sgan::_vector_math), on 64 KiB that
    stay in cache, less the time of the clone that op makes of its input."""
    small = torch.randn(1 << 14)
    calls = 50

    def exps():
        for _ in range(calls):
            torch.ops.sgan._vector_math(small, "exp")

    def clones():
        for _ in range(calls):
            small.clone()

    return max(0.0, time_it(exps, min_seconds) - time_it(clones, min_seconds)) / (calls * small.numel())


def forward_backward(loss_fn, logits, target, formulation):
    def step():
        sums = loss_fn(logits, target, formulation)
        (grad,) = torch.autograd.grad(sums.sum(), logits)
        return grad

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="256,4096,65536,1048576")
    parser.add_argument("--classes", default="10,100")
    parser.add_argument("--formulations", default=",".join(losses.FORMULATIONS))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="time each measurement at least this long")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="run the fused op at the largest shape this long before timing anything")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loss.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # The reference's input check (int(target.min())) graph-breaks by design; don't print that warning per shape.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if "cpp" not in ops.available_backends():
        print(f"the fused CPU op is unavailable: {ops._why_unavailable('cpp')}", file=sys.stderr)
        return 1

    def fused(logits, target, formulation):
        return ops.discriminator_loss_sums(logits, target, formulation, backend="cpp")

    compiled = torch.compile(losses.discriminator_loss_sums)
    # The first large allocations of a process can stay slow for ~1 s (here: 80 against 25 ms per call at
    # B = 1048576, K = 10, for the first 8 calls, in whichever row came first): warm the memory up first.
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    class_counts = [int(v) for v in args.classes.split(",")]
    warm_logits = torch.randn(max(batch_sizes), max(class_counts), requires_grad=True)
    warm_target = torch.randint(-2, max(class_counts), (max(batch_sizes),))
    warm_step = forward_backward(fused, warm_logits, warm_target, "k-logit")
    warm_until = time.perf_counter() + args.warmup_seconds
    while time.perf_counter() < warm_until:
        warm_step()
    del warm_logits, warm_target, warm_step
    exp_seconds = exp_seconds_per_element(args.min_seconds)
    rows = []
    header = (
        f"{'formulation':<11} {'B':>8} {'K':>4} | {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} {'floor ms':>9} "
        f"{'clone ms':>9} {'exp bnd ms':>10} | {'eager/fused':>11} {'compile/fused':>13} {'fused/floor':>11} "
        f"{'fused/clone':>11} {'exp bnd/floor':>13}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(header)
    print("-" * len(header))
    for formulation in args.formulations.split(","):
        for k in class_counts:
            for batch in batch_sizes:
                c = losses.num_logits(formulation, k)
                logits = (torch.randn(batch, c) * 3).requires_grad_()
                target = torch.randint(-2, k, (batch,))
                grad_out = torch.empty_like(logits)
                # Long runs get fewer repeats: the big batches take ~0.1-1 s per call in eager mode.
                ms = {
                    "fused": time_it(forward_backward(fused, logits, target, formulation), args.min_seconds),
                    "eager": time_it(
                        forward_backward(losses.discriminator_loss_sums, logits, target, formulation), args.min_seconds
                    ),
                    "compiled": None
                    if args.no_compile
                    else time_it(forward_backward(compiled, logits, target, formulation), args.min_seconds),
                    # target.sum() reads the targets (int64: 8 bytes a row, 18% of the logits' bytes at K = 10)
                    "floor": time_it(lambda: (grad_out.copy_(logits.detach()), target.sum()), args.min_seconds),
                    # the floor for an op that returns a new gradient tensor: allocating it (page faults for
                    # big batches) and writing it
                    "clone": time_it(lambda: (logits.detach().clone(), target.sum()), args.min_seconds),
                }
                ms["exp_bound"] = 2 * batch * k * exp_seconds / torch.get_num_threads()
                ms = {name: None if s is None else s * 1e3 for name, s in ms.items()}
                row = {
                    "formulation": formulation,
                    "batch": batch,
                    "classes": k,
                    "ms": ms,
                    "eager_over_fused": ms["eager"] / ms["fused"],
                    "compiled_over_fused": None if ms["compiled"] is None else ms["compiled"] / ms["fused"],
                    "fused_over_floor": ms["fused"] / ms["floor"],
                    "fused_over_clone": ms["fused"] / ms["clone"],
                    "exp_bound_over_floor": ms["exp_bound"] / ms["floor"],
                }
                rows.append(row)
                compiled_ms = "-" if ms["compiled"] is None else f"{ms['compiled']:.3f}"
                compiled_ratio = "-" if row["compiled_over_fused"] is None else f"{row['compiled_over_fused']:.2f}x"
                print(
                    f"{formulation:<11} {batch:>8} {k:>4} | {ms['fused']:>9.3f} {ms['eager']:>9.3f} {compiled_ms:>10} "
                    f"{ms['floor']:>9.3f} {ms['clone']:>9.3f} {ms['exp_bound']:>10.3f} | {row['eager_over_fused']:>10.2f}x "
                    f"{compiled_ratio:>13} {row['fused_over_floor']:>10.2f}x {row['fused_over_clone']:>10.2f}x "
                    f"{row['exp_bound_over_floor']:>12.2f}x",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "dtype": "float32",
        "timing": "best of repeats, forward + backward (torch.autograd.grad of sums.sum()), in ms",
        "exp_ns_per_element": exp_seconds * 1e9,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
