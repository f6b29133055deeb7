"""The fused discriminator loss op (sgan/csrc/) behind the contract of sgan.losses.discriminator_loss_sums.

    discriminator_loss_sums(logits[B, C], target[B], formulation, backend="auto", *, check_targets=True)
        -> Tensor[3]

One pass over the logits computes the three loss sums and saves each row's logsumexp; the backward is a
second fused op that writes the gradient from those per-row statistics. float32, float16 and bfloat16
logits accumulate in float32 and give float32 sums; float64 logits give float64 sums (so gradcheck can run
on the op). The gradient has the logits' dtype.

Backends:
    "cpp"    the compiled op, for CPU tensors
    "cuda"   the compiled op, for CUDA tensors
    "torch"  sgan.losses.discriminator_loss_sums, the plain-PyTorch reference
    "auto"   cuda for CUDA tensors, cpp for CPU tensors; when that op cannot run (not compiled, or
             tensors on another device) plain PyTorch, with one warning that says why.

Rule for $SGAN_LOSS_BACKEND (auto|cpp|cuda|torch): it replaces "auto" only. A backend passed explicitly
wins over it; a backend chosen either way (argument or variable) that cannot run raises an error saying
why and how to fix it, rather than falling back silently.

check_targets=False skips the fused op's check that every target lies in [-2, K), for callers that build
the targets themselves, like the training loop. On CUDA that check is the forward's only wait for the GPU (a
16-byte copy to the host), so without it a step can be captured as a CUDA graph. An out-of-range target then
makes all three sums NaN, and its row of the gradient; no memory is read or written out of bounds. The
"torch" backend takes the argument too (NaN sums as well).

The generator's non-saturating loss is the real-rows sum with every row unlabeled:
discriminator_loss_sums(fake_logits, torch.full((B,), -1), formulation)[1].

The compiled op is ``import sgan._C`` when the package was installed with it, else it is compiled on first
use (sgan._build.jit_load, cached), else the "torch" backend is used. Under torch.compile(fullgraph=True)
the backend is resolved once, while tracing. The op's autograd is registered in C++ (sgan/csrc/loss_op.cpp,
cheaper per call than torch.library.register_autograd); its fake (meta) kernels are registered here.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from sgan.losses import discriminator_loss_sums as reference_loss_sums

__all__ = ["BACKENDS", "ENV_VAR", "add_gaussian_noise", "available_backends", "discriminator_loss_sums",
           "resolve_backend"]

BACKENDS = ("auto", "cpp", "cuda", "torch")
ENV_VAR = "SGAN_LOSS_BACKEND"
_DEVICE_BACKEND = {"cpu": "cpp", "cuda": "cuda"}  # the fused backend for each device type

_library_error: str | None = None  # None until the first load attempt, then "" (loaded) or why it failed
_library_path: str | None = None  # the shared library holding the op, once loaded
_warned = False


def discriminator_loss_sums(
    logits: Tensor, target: Tensor, formulation: str, backend: str = "auto", *, check_targets: bool = True
) -> Tensor:
    """Loss sums [supervised CE, -log D over real rows, -log(1 - D) over generated rows], as in sgan.losses.

    backend: "auto" (default; $SGAN_LOSS_BACKEND overrides it), "cpp", "cuda" or "torch"; see the module doc.
    check_targets: False skips the target value check (no host sync on CUDA; a bad target gives NaN sums).
    """
    if _resolve(backend, logits.device.type) == "torch":
        return reference_loss_sums(logits, target, formulation, check_targets)
    return torch.ops.sgan.loss_sums.default(logits, target, formulation, check_targets)[0]


def add_gaussian_noise(x: Tensor, sigma: float) -> Tensor:
    """x + sigma * N(0, 1) noise, elementwise; differentiable in x (its gradient passes through unchanged).

    On CPU tensors, the compiled op (sgan/csrc/cpu/noise_cpu.cpp): a counter-based generator every thread
    draws from at once (one salimans step's noise: 2.24 against 7.76 ms on 2 threads, 4.36 against 5.55 ms on
    one; benchmarks/results/noise.json). Its 64-bit key comes from
    torch's default generator, so torch.manual_seed makes the noise repeatable, as with torch.randn. The
    noise itself differs from torch.randn's. Elsewhere (CUDA, whose torch generator already runs in
    parallel), or when the op cannot run (the same rules as the loss op's "auto"), plain torch.randn_like."""
    if x.device.type == "cpu" and _resolve("auto", "cpu") == "cpp":
        key = torch.empty((), dtype=torch.int64).random_()  # from the default generator; a tensor: no host read
        return torch.ops.sgan.add_gaussian_noise.default(x, sigma, key)
    return reference_gaussian_noise(x, sigma)


def reference_gaussian_noise(x: Tensor, sigma: float) -> Tensor:
    """The plain-PyTorch noise: one fused x + sigma * noise (not a multiply, then an add: one pass fewer)."""
    return torch.add(x, torch.randn_like(x), alpha=sigma)


def available_backends() -> list[str]:
    """The backends usable on this machine, a subset of ["torch", "cpp", "cuda"] (loads the op if needed)."""
    return ["torch"] + [b for b in ("cpp", "cuda") if _why_unavailable(b) is None]


def resolve_backend(backend: str = "auto", device: str | torch.device = "cpu") -> str:
    """The backend ("cpp", "cuda" or "torch") that `backend` runs as for tensors on `device`.

    Same rules, warning and errors as discriminator_loss_sums; the training loop records the result.
    """
    return _resolve(backend, torch.device(device).type)


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced (it may compile the op)
def _resolve(backend: str, device_type: str) -> str:
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    source = f"backend={backend!r}"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a loss backend: choose one of {', '.join(BACKENDS)}")
        backend, source = env, f"{ENV_VAR}={env}"
    if backend == "torch":
        return "torch"

    fused = _DEVICE_BACKEND.get(device_type)
    if backend == "auto":
        reason = f"there is no fused kernel for {device_type} tensors" if fused is None else _why_unavailable(fused)
        if reason is None:
            return fused
        if not _warned:
            _warned = True
            warnings.warn(f"sgan: the fused loss op is unavailable, using plain PyTorch (slower): {reason}", stacklevel=3)
        return "torch"

    if backend != fused:
        raise ValueError(
            f"loss backend {backend!r} ({source}) runs on {'CPU' if backend == 'cpp' else 'CUDA'} tensors, but the "
            f"logits are on {device_type}: use 'auto' to pick the backend from the device"
        )
    reason = _why_unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"loss backend {backend!r} ({source}) is unavailable: {reason}")
    return backend


def _why_unavailable(backend: str) -> str | None:
    """None if the fused backend can run here, else why not and how to fix it."""
    error = _load_library()
    if error:
        return error
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("sgan::loss_sums", "CUDA"):
            return (
                "the op was compiled without its CUDA kernel: reinstall with the CUDA toolkit and a GPU visible, "
                "or with SGAN_FORCE_CUDA=1 (see docs/fused-op.md)"
            )
    return None


def _load_library() -> str:
    """Load the compiled op once (installed sgan._C, else JIT build); "" on success, else why it failed."""
    global _library_error, _library_path
    if _library_error is not None:
        return _library_error
    try:
        import sgan._C  # compiled at install; importing it registers torch.ops.sgan

        _library_path = sgan._C.__file__
    except ImportError as import_error:
        try:
            from sgan import _build

            _library_path = _build.jit_load()
        except Exception as error:  # noqa: BLE001 - any build failure means: fall back, and say why
            _library_error = (
                f"sgan._C is not installed ({import_error}) and compiling it on first use failed ({error}). "
                "Fix: `make setup` (pip install --no-build-isolation -e .) with a C++ compiler and ninja, "
                "or use --loss-backend torch"
            )
            return _library_error
    _register_fake()
    _library_error = ""
    return _library_error


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fake() -> None:
    """Shapes for torch.compile and meta tensors: the Python part of the op (schemas, kernels and autograd
    are in sgan/csrc/loss_op.cpp)."""

    @torch.library.register_fake("sgan::loss_sums")
    def _loss_sums_fake(logits, target, formulation, check_targets=True):
        # Shape, dtype and device checks (the C++ op checks values too); ValueError/TypeError as in sgan.losses.
        torch._check_value(logits.dim() == 2, lambda: f"logits must be 2-D [batch, C], got {logits.dim()}-D")
        torch._check_value(target.dim() == 1, lambda: f"target must be 1-D, got {target.dim()}-D")
        torch._check_value(target.shape[0] == logits.shape[0], lambda: "target needs one entry per logits row")
        torch._check_type(logits.is_floating_point(), lambda: f"logits must be floating point, got {logits.dtype}")
        torch._check_type(target.dtype in (torch.int64, torch.int32), lambda: f"target must be int64/int32, got {target.dtype}")
        torch._check_value(logits.device == target.device, lambda: f"logits on {logits.device}, target on {target.device}")
        acc = _accumulate_dtype(logits.dtype)
        return logits.new_empty(3, dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)

    @torch.library.register_fake("sgan::add_gaussian_noise")
    def _add_gaussian_noise_fake(x, sigma, key):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sgan::loss_sums_backward")
    def _loss_sums_backward_fake(grad_sums, logits, target, row_lse, formulation):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
