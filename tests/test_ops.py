"""The fused loss op (sgan.ops, sgan/csrc/) against the plain-PyTorch reference in sgan.losses.

The first use of the op may JIT-compile it (~15 s, once; cached), during collection.
CUDA tests skip without a GPU.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgan import losses, ops

FORMULATIONS = losses.FORMULATIONS
AVAILABLE = ops.available_backends()
FUSED = [b for b in ("cpp", "cuda") if b in AVAILABLE]
DEVICE = {"cpp": "cpu", "cuda": "cuda"}
WEIGHTS = (1.0, 0.5, 2.0)  # distinct weights per sum, so each term's gradient is checked
needs_cpp = pytest.mark.skipif("cpp" not in AVAILABLE, reason="the fused CPU op did not build")
needs_cuda = pytest.mark.skipif("cuda" not in AVAILABLE, reason="no CUDA GPU or op built without CUDA")
fused_backends = pytest.mark.parametrize("backend", FUSED or [pytest.param("cpp", marks=needs_cpp)])


def make_inputs(batch, k, formulation, labels="mixed", scale=3.0, seed=0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, losses.num_logits(formulation, k), generator=generator) * scale
    target = {
        "mixed": lambda: torch.randint(-2, k, (batch,), generator=generator),
        "labeled": lambda: torch.randint(0, k, (batch,), generator=generator),
        "unlabeled": lambda: torch.full((batch,), losses.UNLABELED),
        "generated": lambda: torch.full((batch,), losses.GENERATED),
    }[labels]()
    return logits.to(device, dtype), target.to(device)


def value_and_grad(fn, logits, target, formulation):
    x = logits.detach().clone().requires_grad_()
    sums = fn(x, target, formulation)
    (grad,) = torch.autograd.grad(sums @ torch.tensor(WEIGHTS, dtype=sums.dtype, device=sums.device), x)
    return sums.detach(), grad


def assert_matches_reference(backend, logits, target, formulation, **tolerance):
    tolerance = tolerance or {"rtol": 1e-5, "atol": 1e-5}
    ours, ours_grad = value_and_grad(
        lambda x, t, f: ops.discriminator_loss_sums(x, t, f, backend=backend), logits, target, formulation
    )
    ref, ref_grad = value_and_grad(losses.discriminator_loss_sums, logits, target, formulation)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    assert ours_grad.dtype == logits.dtype and ours_grad.shape == logits.shape
    torch.testing.assert_close(ours, ref, equal_nan=True, **tolerance)
    torch.testing.assert_close(ours_grad, ref_grad, equal_nan=True, **tolerance)
    return ours


# --- values and gradients against the reference ---------------------------------------------------------

SHAPES = [(0, 10), (1, 1), (1, 10), (7, 1), (7, 10), (33, 1000), (20001, 10), (2049, 1000)]


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("batch,k", SHAPES)
@pytest.mark.parametrize("labels", ["mixed", "labeled", "unlabeled", "generated"])
def test_matches_reference(backend, formulation, batch, k, labels):
    logits, target = make_inputs(batch, k, formulation, labels, device=DEVICE[backend])
    sums = assert_matches_reference(backend, logits, target, formulation).tolist()
    # Terms of rows that are selected are positive, the others exactly zero (except CE with K = 1: zero,
    # as a single class is always right, unless k-plus-one adds the fake class).
    assert (sums[0] > 0) == bool((target >= 0).any() and (k > 1 or formulation == "k-plus-one"))
    assert (sums[1] > 0) == bool((target >= -1).any())
    assert (sums[2] > 0) == bool((target == -2).any())


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("batch,k", [(7, 1), (513, 10), (65, 1000)])
def test_large_logits(backend, formulation, batch, k):
    """Logits up to +-1e4: no overflow (softmax, sigmoid and softplus saturate), same as the reference."""
    logits, target = make_inputs(batch, k, formulation, scale=1e4 / 4, device=DEVICE[backend])
    logits = logits.clamp(-1e4, 1e4)
    sums = assert_matches_reference(backend, logits, target, formulation, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(sums).all()


@fused_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_half_precision(backend, dtype, formulation):
    """Half inputs accumulate in float32 (sums match the reference, which upcasts); grads keep the dtype."""
    logits, target = make_inputs(301, 10, formulation, device=DEVICE[backend], dtype=dtype)
    ours, ours_grad = value_and_grad(
        lambda x, t, f: ops.discriminator_loss_sums(x, t, f, backend=backend), logits, target, formulation
    )
    # The reference's autograd adds the half-precision gradients of its two .float() casts, in half precision;
    # the op rounds once. So compare with the reference's gradient in float32, rounded to the dtype.
    ref, ref_grad = value_and_grad(losses.discriminator_loss_sums, logits.float(), target, formulation)
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad.to(dtype))  # the dtype's default tolerance: one rounding


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_gradcheck_float64(backend, formulation):
    """The op computes in float64 for float64 logits, so finite differences check its gradient."""
    logits, target = make_inputs(9, 3, formulation, device=DEVICE[backend], dtype=torch.float64)
    x = logits.requires_grad_()
    fn = lambda x: ops.discriminator_loss_sums(x, target, formulation, backend=backend)  # noqa: E731
    assert fn(x).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (x,))
    # ... and float64 agrees with the float32 reference
    torch.testing.assert_close(fn(x).float(), losses.discriminator_loss_sums(x.float(), target, formulation))


@fused_backends
def test_torch_backend_is_the_reference(backend):
    logits, target = make_inputs(50, 10, "two-head", device=DEVICE[backend])
    assert ops.reference_loss_sums is losses.discriminator_loss_sums
    torch.testing.assert_close(
        ops.discriminator_loss_sums(logits, target, "two-head", backend="torch"),
        losses.discriminator_loss_sums(logits, target, "two-head"),
        rtol=0,
        atol=0,
    )


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_generator_loss(backend, formulation):
    """The training loop's generator loss (sgan.steps.generator_loss): sum [1] with every row unlabeled-real,
    which must be the non-saturating -log D(G(z)) = softplus(-r) summed over the rows."""
    fake_logits, _ = make_inputs(100, 10, formulation, device=DEVICE[backend])
    unlabeled = torch.full((100,), losses.UNLABELED, device=fake_logits.device)
    real_logit = losses.class_lse_and_real_logit(fake_logits, formulation)[1]
    torch.testing.assert_close(
        ops.discriminator_loss_sums(fake_logits, unlabeled, formulation, backend=backend)[1],
        torch.nn.functional.softplus(-real_logit).sum(),
    )


@fused_backends
def test_non_contiguous_inputs(backend):
    logits, target = make_inputs(64, 10, "k-plus-one", device=DEVICE[backend])
    strided_logits = logits.t().contiguous().t()  # column-major
    strided_target = torch.stack([target, target], 1)[:, 0]  # stride 2
    assert not strided_logits.is_contiguous() and not strided_target.is_contiguous()
    sums = assert_matches_reference(backend, strided_logits, strided_target, "k-plus-one")
    torch.testing.assert_close(sums, ops.discriminator_loss_sums(logits, target, "k-plus-one", backend=backend))


@fused_backends
def test_int32_target(backend):
    logits, target = make_inputs(64, 10, "k-logit", device=DEVICE[backend])
    torch.testing.assert_close(
        ops.discriminator_loss_sums(logits, target.int(), "k-logit", backend=backend),
        losses.discriminator_loss_sums(logits, target, "k-logit"),
    )


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_empty_batch(backend, formulation):
    x = torch.empty(0, losses.num_logits(formulation, 10), device=DEVICE[backend], requires_grad=True)
    sums = ops.discriminator_loss_sums(x, torch.empty(0, dtype=torch.long, device=x.device), formulation, backend=backend)
    assert sums.tolist() == [0.0, 0.0, 0.0]
    sums.sum().backward()
    assert x.grad.shape == x.shape


@needs_cpp
def test_thread_count_does_not_change_result():
    """Partial sums go by fixed row blocks, so 1 and 2 threads give bit-identical sums (2 threads even where
    torch would use 1: the comparison must really split the work)."""
    logits, target = make_inputs(100_003, 10, "two-head")
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert torch.get_num_threads() == count
            results[count] = ops.discriminator_loss_sums(logits, target, "two-head", backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1], results[2])


@pytest.mark.skipif(importlib.util.find_spec("sgan._C") is None, reason="sgan._C is not installed (JIT build)")
def test_compiled_op_imports_on_its_own():
    """`import sgan._C` alone registers the ops: the package loads torch's libraries, which it links against."""
    code = "import sgan._C, torch; print(torch.ops.sgan.loss_sums.default._schema)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bool check_targets=True" in result.stdout


@needs_cpp
@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_cpu_op_links_openmp():
    """Without OpenMP at::parallel_for silently runs on one thread."""
    assert "libgomp" in subprocess.run(["ldd", ops._library_path], capture_output=True, text=True).stdout


# --- NaN ----------------------------------------------------------------------------------------------------


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("kind", [0, losses.UNLABELED, losses.GENERATED])
@pytest.mark.parametrize("column", [0, -1])
def test_nan_propagates_like_the_reference(backend, formulation, kind, column):
    logits, target = make_inputs(5, 4, formulation, device=DEVICE[backend])
    target[2] = kind
    logits[2, column] = float("nan")
    sums = assert_matches_reference(backend, logits, target, formulation)
    # Every row feeds the real or the generated sum; its D(x) depends on the NaN logit unless that is a
    # class logit of a two-head row (two-head's D is the last logit only).
    if not (formulation == "two-head" and column == 0 and kind < 0):
        assert torch.isnan(sums).any()


# --- the CPU kernels' vectorised exp and log (Cephes polynomials, sgan/csrc/cpu/) ------------------------


def vector_math(x, fn):
    return torch.ops.sgan._vector_math(x, fn)


@needs_cpp
def test_vector_exp_matches_exp():
    x = torch.cat([torch.linspace(-87, 88, 1_000_001), torch.randn(100_000) * 30]).clamp(-87, 88)
    ours, ref = vector_math(x, "exp").double(), torch.exp(x.double())
    assert ((ours - ref).abs() / ref).max() < 2e-7  # the loss needs 1e-5
    # below -87 the true value is < 1.7e-38 (at most a denormal): 0; denormal inputs: exp(~0) = 1; NaN stays NaN;
    # above 88: inf (the kernels only pass arguments <= 0, or inf after an infinite logit)
    special = [float("-inf"), -1e30, -100.0, -87.5, 1e-40, -1e-40, 1.4e-45, 0.0, -0.0, 88.5, 1e30, float("inf")]
    expected = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, float("inf"), float("inf"), float("inf")]
    assert vector_math(torch.tensor(special), "exp").tolist() == expected
    assert torch.isnan(vector_math(torch.tensor([float("nan")]), "exp")).all()


@needs_cpp
def test_vector_log_matches_log():
    # the kernels take logs of sums of exps (>= 1, or 0, inf, NaN) and of 1 + exp(-|r|) in [1, 2]; check all
    # normal floats
    x = torch.cat([torch.exp(torch.linspace(-87.3, 88.7, 1_000_001, dtype=torch.float64)).float(), 1 + torch.rand(100_000)])
    ours, ref = vector_math(x, "log").double(), torch.log(x.double())
    assert ((ours - ref).abs() / ref.abs().clamp_min(1.0)).max() < 2e-7
    near_one = (ref > 0) & (ref < 1e-3)  # relative accuracy where log x -> 0 (log1p(exp(-|r|)) for large |r|)
    assert ((ours - ref).abs() / ref)[near_one].max() < 2e-7
    special = vector_math(torch.tensor([0.0, -0.0, float("inf"), 1.0]), "log").tolist()
    assert special == [float("-inf"), float("-inf"), float("inf"), 0.0]
    assert torch.isnan(vector_math(torch.tensor([float("nan"), -1.0, float("-inf")]), "log")).all()


# --- torch.library integration --------------------------------------------------------------------------


@fused_backends
def test_autograd_is_in_cpp(backend):
    """Autograd is the C++ registration (Python's register_autograd cost ~0.07 ms more per call), and it
    records nothing when no gradient is needed."""
    logits, target = make_inputs(6, 3, "k-logit", device=DEVICE[backend])
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sgan::loss_sums", "Autograd")
    sums = ops.discriminator_loss_sums(logits.requires_grad_(), target, "k-logit", backend=backend)
    assert "LossSumsFunction" in sums.grad_fn.name()
    with torch.no_grad():
        assert not ops.discriminator_loss_sums(logits, target, "k-logit", backend=backend).requires_grad
    assert not ops.discriminator_loss_sums(logits.detach(), target, "k-logit", backend=backend).requires_grad
    assert not torch.ops.sgan.loss_sums(logits, target, "k-logit")[1].requires_grad  # row_lse: not differentiable



@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("check_targets", [True, False])
def test_opcheck(backend, formulation, check_targets):
    logits, target = make_inputs(13, 5, formulation, device=DEVICE[backend])
    torch.library.opcheck(torch.ops.sgan.loss_sums.default, (logits.requires_grad_(), target, formulation, check_targets))
    with torch.no_grad():
        sums, row_lse = torch.ops.sgan.loss_sums(logits, target, formulation)
    torch.testing.assert_close(row_lse, torch.logsumexp(logits[:, : losses.num_classes_from_logits(formulation, logits.shape[1])], 1))
    torch.library.opcheck(
        torch.ops.sgan.loss_sums_backward.default, (torch.tensor(WEIGHTS, device=logits.device), logits.detach(), target, row_lse, formulation)
    )


@fused_backends
def test_double_backward_raises(backend):
    logits, target = make_inputs(5, 3, "two-head", device=DEVICE[backend])
    x = logits.requires_grad_()
    (grad,) = torch.autograd.grad(ops.discriminator_loss_sums(x, target, "two-head", backend=backend).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.square().sum().backward()


@fused_backends
@pytest.mark.parametrize("formulation,check_targets", [("two-head", True), ("k-logit", True), ("k-plus-one", False)])
def test_torch_compile_fullgraph(backend, formulation, check_targets):
    torch._dynamo.reset()

    def step(x, t):  # backend "auto": resolved while tracing
        return ops.discriminator_loss_sums(x, t, formulation, check_targets=check_targets)

    compiled = torch.compile(step, fullgraph=True)
    for batch in (40, 41):  # the second shape exercises the fake kernel with a dynamic batch
        logits, target = make_inputs(batch, 10, formulation, device=DEVICE[backend], seed=batch)
        ours, ours_grad = value_and_grad(lambda x, t, f: compiled(x, t), logits, target, formulation)
        ref, ref_grad = value_and_grad(losses.discriminator_loss_sums, logits, target, formulation)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(ours_grad, ref_grad)


# --- properties (hypothesis) ----------------------------------------------------------------------------


@st.composite
def loss_inputs(draw):
    formulation = draw(st.sampled_from(FORMULATIONS))
    batch = draw(st.integers(0, 12))
    k = draw(st.integers(1, 6))
    c = losses.num_logits(formulation, k)
    value = st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.sampled_from([0.0, 1.0, -1.0, 30.0, -30.0])
    logits = torch.tensor(draw(st.lists(value, min_size=batch * c, max_size=batch * c)), dtype=torch.float32)
    target = torch.tensor(draw(st.lists(st.integers(-2, k - 1), min_size=batch, max_size=batch)), dtype=torch.long)
    return logits.reshape(batch, c), target, formulation


@needs_cpp
@settings(max_examples=150, deadline=None)
@given(loss_inputs())
def test_property_matches_reference(inputs):
    logits, target, formulation = inputs
    assert_matches_reference("cpp", logits, target, formulation, rtol=1e-5, atol=1e-3)


@needs_cpp
@settings(max_examples=100, deadline=None)
@given(loss_inputs(), st.randoms(use_true_random=False))
def test_property_additive_and_nonnegative(inputs, random):
    """The sums are non-negative and add up over any split of the batch, in any row order."""
    logits, target, formulation = inputs
    whole = ops.discriminator_loss_sums(logits, target, formulation, backend="cpp")
    assert (whole >= 0).all()
    order = list(range(logits.shape[0]))
    random.shuffle(order)
    cut = random.randint(0, len(order))
    first, second = order[:cut], order[cut:]
    parts = sum(ops.discriminator_loss_sums(logits[i], target[i], formulation, backend="cpp") for i in (first, second))
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-3)


# --- bad input ------------------------------------------------------------------------------------------


def bad_last_row(batch, device):
    """A bad target in the last row of a batch that the CPU kernel splits between threads."""
    target = torch.zeros(batch, dtype=torch.long, device=device)
    target[-1] = -7
    return torch.zeros(batch, 5, device=device), target


@fused_backends
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda d: (torch.zeros(4, device=d), torch.zeros(4, dtype=torch.long, device=d)), ValueError, "2-D"),
        (lambda d: (torch.zeros(2, 4, 5, device=d), torch.zeros(2, dtype=torch.long, device=d)), ValueError, "2-D"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.zeros(3, dtype=torch.long, device=d)), ValueError, "one entry per"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.zeros(4, 1, dtype=torch.long, device=d)), ValueError, "1-D"),
        (lambda d: (torch.zeros(4, 1, device=d), torch.zeros(4, dtype=torch.long, device=d)), ValueError, "2 or more"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.full((4,), 4, device=d)), ValueError, r"\[-2, 3\]"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.full((4,), -3, device=d)), ValueError, r"got -3"),
        (lambda d: bad_last_row(9000, d), ValueError, "got -7"),
        (lambda d: (torch.zeros(4, 5, dtype=torch.long, device=d), torch.zeros(4, dtype=torch.long, device=d)), TypeError, "float"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.zeros(4, device=d)), TypeError, "int64"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.zeros(4, dtype=torch.int16, device=d)), TypeError, "int64"),
        (lambda d: (torch.zeros(4, 5, device=d), torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_input_raises(backend, make, error, match):
    logits, target = make(DEVICE[backend])
    with pytest.raises(error, match=match):
        ops.discriminator_loss_sums(logits, target, "two-head", backend=backend)


@fused_backends
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_unchecked_targets(backend, formulation):
    """check_targets=False: valid targets give the same result; out-of-range ones, even far out, are never
    used as an index (a read of x[t] would crash) and make the sums NaN, and their own gradient rows."""
    logits, target = make_inputs(9000, 4, formulation, device=DEVICE[backend])  # several CPU blocks and threads
    unchecked = lambda x, t, f: ops.discriminator_loss_sums(x, t, f, backend=backend, check_targets=False)  # noqa: E731
    checked = lambda x, t, f: ops.discriminator_loss_sums(x, t, f, backend=backend)  # noqa: E731
    for ours, ref in zip(value_and_grad(unchecked, logits, target, formulation), value_and_grad(checked, logits, target, formulation)):
        assert torch.equal(ours, ref)

    bad_rows = torch.tensor([3, 4000, 8999])
    target[bad_rows] = torch.tensor([4, -3, 2**40], device=target.device)  # K, -3 and far beyond the logits
    target[5] = -(2**40)
    bad = torch.zeros(9000, dtype=torch.bool, device=target.device)
    bad[bad_rows], bad[5] = True, True
    with pytest.raises(ValueError, match=r"target values must lie in \[-2, 3\]"):
        checked(logits, target, formulation)
    sums, grad = value_and_grad(unchecked, logits, target, formulation)
    assert torch.isnan(sums).all()
    assert torch.isnan(grad[bad]).all()
    # the other rows' gradients do not depend on the bad rows (the sums add up over rows)
    _, ref_grad = value_and_grad(losses.discriminator_loss_sums, logits[~bad], target[~bad], formulation)
    torch.testing.assert_close(grad[~bad], ref_grad)


@needs_cuda
def test_cuda_forward_without_target_check_does_not_sync():
    """The checked CUDA forward copies 16 bytes to the host; with check_targets=False it never waits."""
    logits, target = make_inputs(64, 10, "two-head", device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.discriminator_loss_sums(logits, target, "two-head", backend="cuda", check_targets=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.discriminator_loss_sums(logits, target, "two-head", backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@fused_backends
def test_unknown_formulation_and_backend(backend):
    logits, target = make_inputs(4, 3, "two-head", device=DEVICE[backend])
    with pytest.raises(ValueError, match="unknown formulation"):
        ops.discriminator_loss_sums(logits, target, "two-heads", backend=backend)
    with pytest.raises(ValueError, match="unknown formulation"):
        torch.ops.sgan.loss_sums(logits, target, "k+1")
    with pytest.raises(ValueError, match="unknown loss backend"):
        ops.discriminator_loss_sums(logits, target, "two-head", backend="fast")


@needs_cuda
def test_cuda_logits_with_cpu_target():
    logits, target = make_inputs(4, 3, "two-head", device="cuda")
    with pytest.raises(ValueError, match="one device"):
        ops.discriminator_loss_sums(logits, target.cpu(), "two-head", backend="cuda")


# --- backend selection ----------------------------------------------------------------------------------


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned", False)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)


@needs_cpp
def test_auto_picks_the_fused_op(fresh_warning):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", "cpu") == "cpp"
        assert ops.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert ops.available_backends()[:2] == ["torch", "cpp"]


def test_auto_falls_back_with_one_warning(fresh_warning, monkeypatch):
    monkeypatch.setattr(ops, "_library_error", "the compiler exploded; fix: install g++")
    with pytest.warns(UserWarning, match="the compiler exploded") as record:
        assert ops.resolve_backend("auto", "cpu") == "torch"
        assert ops.resolve_backend("auto", "cpu") == "torch"
        logits, target = make_inputs(8, 3, "k-logit")
        torch.testing.assert_close(
            ops.discriminator_loss_sums(logits, target, "k-logit"), losses.discriminator_loss_sums(logits, target, "k-logit")
        )
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="'cpp'.*unavailable: the compiler exploded"):
        ops.resolve_backend("cpp", "cpu")
    assert ops.available_backends() == ["torch"]


def test_auto_on_a_device_without_kernel_warns(fresh_warning):
    with pytest.warns(UserWarning, match="no fused kernel for meta"):
        assert ops.resolve_backend("auto", "meta") == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_explicit_cuda_without_gpu_raises(fresh_warning):
    with pytest.raises(RuntimeError, match="'cuda'.*unavailable"):
        ops.resolve_backend("cuda", "cuda")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.resolve_backend("cuda", "cpu")
    assert "cuda" not in ops.available_backends()


@needs_cpp
def test_environment_variable_replaces_auto_only(fresh_warning, monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("cpp", "cpu") == "cpp"  # an explicit backend wins
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{ops.ENV_VAR}=cuda.*runs on CUDA"):
        ops.resolve_backend("auto", "cpu")
    monkeypatch.setenv(ops.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="not a loss backend"):
        ops.resolve_backend("auto", "cpu")
