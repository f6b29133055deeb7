"""sgan.gpu_check (make gpu-check) without a GPU: the no-GPU path, and the check logic that needs no device."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgan import gpu_check, ops

REPO = Path(__file__).resolve().parents[1]
needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="the fused CPU op did not build")


def test_without_gpu_says_so_writes_the_json_and_exits_0(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))  # no device, even on a GPU machine
    run = subprocess.run([sys.executable, "-m", "sgan.gpu_check", "--out", str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no GPU: nothing to check (" in run.stdout
    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["passed"] is None
    assert ("CPU-only" in report["reason"]) or ("no CUDA device" in report["reason"])
    assert report["reason"] in run.stdout
    assert list(report["checks"]) == list(gpu_check.CHECK_NAMES)
    assert {c["status"] for c in report["checks"].values()} == {"not run"}
    assert report["environment"]["torch"] == torch.__version__
    assert not any(tmp_path.glob("sgan_gpu_check_*"))  # nothing was built


def test_every_check_is_listed():
    assert list(gpu_check.CHECKS) == list(gpu_check.CHECK_NAMES)
    for name in ("build", "pytest_cuda", "random_cases", "large_shape", "side_stream", "no_sync", "benchmark",
                 "train_odena", "train_salimans", "train_supervised"):
        assert name in gpu_check.CHECK_NAMES


def test_no_gpu_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in gpu_check.no_gpu_reason()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "sees no CUDA device (CUDA_VISIBLE_DEVICES='')" in gpu_check.no_gpu_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.no_gpu_reason() is None


# --- comparisons and tolerances -------------------------------------------------------------------------


def test_compare_passes_within_tolerance_and_fails_on_a_planted_mismatch():
    ref = torch.tensor([1.0, -2.0, float("nan"), float("inf"), float("-inf"), 1e5])
    assert gpu_check.compare(ref.clone(), ref, rtol=1e-5, atol=1e-5) == {"ok": True, "max_abs_diff": 0.0}
    near = ref.clone()
    near[0] += 1e-6
    assert gpu_check.compare(near, ref, rtol=1e-5, atol=1e-5)["ok"]
    for index, value in [(0, 1.001), (2, 0.0), (3, float("-inf")), (4, 0.0), (1, float("nan"))]:
        planted = ref.clone()
        planted[index] = value
        result = gpu_check.compare(planted, ref, rtol=1e-5, atol=1e-5)
        assert not result["ok"] and result["error"], (index, value)
    assert gpu_check.compare(near, ref, rtol=1e-5, atol=1e-5)["max_abs_diff"] == pytest.approx(1e-6, rel=0.1)
    assert not gpu_check.compare(ref[:3], ref, rtol=1, atol=1)["ok"]  # shapes differ


@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_half_gradients_may_differ_by_one_rounding_not_more(dtype, ulp):
    exact = torch.linspace(1, 1.99, 100)  # in [1, 2): one ulp is `ulp`
    one_off = (exact + ulp).to(dtype)
    tolerance = gpu_check.tolerance(dtype, "grad", "cpp")
    assert gpu_check.compare(one_off, exact.to(dtype), **tolerance)["ok"]
    assert not gpu_check.compare((exact + 3 * ulp).to(dtype), exact.to(dtype), **tolerance)["ok"]
    assert not gpu_check.compare(one_off.float(), exact.to(dtype).float(), **gpu_check.tolerance(torch.float32, "grad", "cpp"))["ok"]


def test_float64_against_the_cpp_op_is_tight_against_the_float32_reference_is_not():
    exact = torch.rand(100, dtype=torch.float64) + 1
    off = exact * (1 + 1e-7)  # float32-level agreement
    assert gpu_check.compare(off, exact, **gpu_check.tolerance(torch.float64, "sums", "reference"))["ok"]
    assert not gpu_check.compare(off, exact, **gpu_check.tolerance(torch.float64, "sums", "cpp"))["ok"]


def test_plant_specials():
    logits = torch.zeros(50, 11)
    planted = gpu_check.plant_specials(logits, seed=3)
    assert torch.isnan(planted).any() and (planted == float("inf")).any() and (planted == float("-inf")).any()
    assert (planted[7] == float("inf")).all() and (planted[8] == float("-inf")).all()
    assert (logits == 0).all()  # a copy
    assert torch.isnan(gpu_check.plant_specials(torch.zeros(1, 1), seed=0)).sum() <= 1  # one row: no whole rows


@needs_cpp
def test_random_case_catches_a_wrong_gradient(monkeypatch):
    """random_case with the C++ op standing in for the CUDA one passes; with a planted gradient error it fails."""
    helpers = gpu_check.test_helpers()
    logits, target = helpers.make_inputs(64, 10, "k-plus-one", seed=1)
    logits = gpu_check.plant_specials(logits, seed=1)
    monkeypatch.setattr(gpu_check, "fused_cuda", gpu_check.fused_cpp)
    assert gpu_check.random_case(helpers, logits, target, "k-plus-one", torch.float32, device="cpu")["ok"]

    class Scaled(torch.autograd.Function):  # the right sums, a gradient 1e-3 too large
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.001

    monkeypatch.setattr(gpu_check, "fused_cuda", lambda x, t, f: gpu_check.fused_cpp(Scaled.apply(x), t, f))
    case = gpu_check.random_case(helpers, logits, target, "k-plus-one", torch.float32, device="cpu")
    assert not case["ok"] and set(case["errors"]) == {"grad_vs_cpp", "grad_vs_reference"}


# --- the large shape ------------------------------------------------------------------------------------


def test_large_shape_passes_int32_in_both_grid_stride_loops_and_fits_in_memory():
    plan = gpu_check.plan_large_shape(80 * 10**9)
    assert plan["run"] and "reason" not in plan
    assert plan["elements"] == plan["batch"] * plan["logits_per_row"] > 2**31
    assert plan["batch"] > 1024 * 8  # more rows than one forward sweep (1024 blocks of 8 warps)
    assert plan["elements"] > 65536 * 256  # more elements than one backward sweep
    assert plan["chunk_rows"] * plan["logits_per_row"] < 2**31  # the blocks it is compared with stay below
    assert plan["chunk_rows"] * plan["chunks"] >= plan["batch"]
    # bf16 logits and gradient alone are 2 * 2 bytes an element: ~8.6 GB
    assert 8.6 < plan["needed_gb"] < 11


def test_large_shape_skips_with_a_reason_when_memory_is_short():
    plan = gpu_check.plan_large_shape(8 * 10**9)
    assert not plan["run"]
    assert plan["reason"] == f"needs {plan['needed_gb']} GB of device memory, 8.0 GB free"
    assert gpu_check.plan_large_shape(80 * 10**9, dtype=torch.float32)["needed_gb"] > 2 * 8.6


# --- the pytest run -------------------------------------------------------------------------------------


def junit(*cases: str) -> str:
    return f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'


PASSED_CUDA = '<testcase classname="tests.test_ops" name="test_matches_reference[mixed-7-10-two-head-cuda]"/>'
PASSED_OTHER = '<testcase classname="tests.test_ops" name="test_cuda_logits_with_cpu_target"/>'
EXPECTED_SKIP = ('<testcase name="test_explicit_cuda_without_gpu_raises"><skipped type="pytest.skip" '
                 'message="checks the error without a GPU"/></testcase>')


def test_pytest_problems_accepts_a_full_cuda_run():
    summary = gpu_check.parse_junit(junit(PASSED_CUDA, PASSED_OTHER, EXPECTED_SKIP))
    assert summary["passed"] == ["test_matches_reference[mixed-7-10-two-head-cuda]", "test_cuda_logits_with_cpu_target"]
    assert summary["skipped"] == {"test_explicit_cuda_without_gpu_raises": "checks the error without a GPU"}
    assert gpu_check.pytest_problems(summary) == []


def test_pytest_problems_fails_a_test_skipped_for_lack_of_cuda():
    skipped = ('<testcase name="test_cuda_forward_without_target_check_does_not_sync"><skipped '
               'message="no CUDA GPU or op built without CUDA"/></testcase>')
    problems = gpu_check.pytest_problems(gpu_check.parse_junit(junit(PASSED_CUDA, skipped)))
    assert problems == ["skipped: test_cuda_forward_without_target_check_does_not_sync: no CUDA GPU or op built without CUDA"]


def test_pytest_problems_fails_failures_errors_and_a_run_without_the_cuda_backend():
    failed = '<testcase name="test_opcheck[cuda-True-k-logit]"><failure message="boom"/></testcase>'
    errored = '<testcase name="test_int32_target[cuda]"><error message="boom"/></testcase>'
    assert gpu_check.pytest_problems(gpu_check.parse_junit(junit(PASSED_CUDA, failed, errored))) == [
        "failed: test_opcheck[cuda-True-k-logit]", "failed: test_int32_target[cuda]"]
    # no test parametrised with the cuda backend passed: the op had no CUDA kernel in that process
    assert gpu_check.pytest_problems(gpu_check.parse_junit(junit(PASSED_OTHER, EXPECTED_SKIP))) == [
        "no test ran with the cuda backend: the CUDA op was unavailable to pytest"]


def test_subprocesses_never_load_an_installed_op(tmp_path):
    """pytest and the trainings run under WITHOUT_INSTALLED_OP: `import sgan._C` fails, so the JIT build loads."""
    (tmp_path / "probe.py").write_text(
        "import sys\ntry:\n    import sgan._C\n    print('loaded')\nexcept ImportError:\n    print('blocked', sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    run = subprocess.run([sys.executable, "-c", gpu_check.WITHOUT_INSTALLED_OP, "probe", "--flag", "x"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "blocked ['--flag', 'x']", run.stderr


# --- training without data ------------------------------------------------------------------------------


@pytest.mark.parametrize("require", [False, True])
def test_training_without_mnist_is_not_run_or_fails_when_required(tmp_path, require, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}: no pip, no training without data"))
    args = argparse.Namespace(
        data_root=str(tmp_path / "data"), require_training=require, build_dir=str(tmp_path / "build"), skip="")
    result = gpu_check.check_training(gpu_check.Context(args), "odena")
    assert result["status"] == ("fail" if require else "not run")
    assert "MNIST is not prepared" in result["reason"] and "sgan.data prepare --dataset mnist" in result["reason"]


@pytest.mark.parametrize("written, problem", [
    (None, "no readable metrics.json"),
    ("{not json", "no readable metrics.json"),
    ('["a list"]', "no readable metrics.json"),
    ('{"loss_backend": "cpp", "steps": STEPS}', "loss_backend is 'cpp', not 'cuda'"),
    ('{"loss_backend": "cuda", "steps": STEPS}', None),
])
def test_training_check_reads_the_runs_metrics(tmp_path, monkeypatch, written, problem):
    """A training that wrote no metrics.json, a damaged one, or one from another backend fails with a reason."""
    def fake_run(command, **kwargs):
        if written is not None:
            output_dir = Path(command[command.index("--output-dir") + 1])
            (output_dir / "metrics.json").write_text(written.replace("STEPS", str(gpu_check.TRAIN_STEPS)))
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(gpu_check, "mnist_state", lambda ctx: (True, ""))
    (tmp_path / "build").mkdir()  # main makes it
    args = argparse.Namespace(
        data_root=str(tmp_path / "data"), require_training=True, build_dir=str(tmp_path / "build"), skip="")
    result = gpu_check.check_training(gpu_check.Context(args), "odena")
    if problem is None:
        assert result["status"] == "pass" and result["problems"] == []
    else:
        assert result["status"] == "fail" and any(problem in line for line in result["problems"]), result


# --- the runner -----------------------------------------------------------------------------------------


def fake_checks(monkeypatch, **statuses):
    """Replace the checks by ones that return the given statuses (or raise, for "raise")."""
    def make(status):
        def check(ctx):
            if status == "raise":
                raise RuntimeError("planted crash")
            return {"status": status}
        return check
    monkeypatch.setattr(gpu_check, "CHECKS", {name: make(statuses.get(name, "pass")) for name in gpu_check.CHECK_NAMES})
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)


def run_main(tmp_path, *flags):
    out = tmp_path / "report.json"
    code = gpu_check.main(["--out", str(out), "--build-dir", str(tmp_path / "build"), *flags])
    return code, json.loads(out.read_text())


def test_main_passes_when_every_check_passes_or_is_skipped(tmp_path, monkeypatch):
    fake_checks(monkeypatch, large_shape="skipped", train_odena="not run")
    code, report = run_main(tmp_path)
    assert code == 0 and report["passed"] is True and report["gpu"] is True
    assert [c["status"] for c in report["checks"].values()] == [
        "pass", "pass", "pass", "skipped", "pass", "pass", "pass", "not run", "pass", "pass"]
    assert all("seconds" in c for c in report["checks"].values())


def test_main_fails_on_any_failed_check_and_runs_the_rest(tmp_path, monkeypatch):
    fake_checks(monkeypatch, side_stream="fail", benchmark="raise")
    code, report = run_main(tmp_path, "--skip", "train_salimans")
    assert code == 1 and report["passed"] is False
    assert report["checks"]["side_stream"]["status"] == "fail"
    assert report["checks"]["benchmark"]["status"] == "fail"
    assert "planted crash" in report["checks"]["benchmark"]["error"]
    assert report["checks"]["train_salimans"] == {"status": "not run", "reason": "--skip"}
    assert report["checks"]["train_supervised"]["status"] == "pass"


def test_without_the_build_nothing_else_runs(tmp_path, monkeypatch):
    fake_checks(monkeypatch, build="fail")
    code, report = run_main(tmp_path)
    assert code == 1
    assert [c["status"] for c in report["checks"].values()] == ["fail"] + ["not run"] * (len(gpu_check.CHECK_NAMES) - 1)


def test_unknown_skip_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "r.json"), "--skip", "benchmarks"])
    assert exit_info.value.code == 2
