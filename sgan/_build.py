"""Build the fused loss op in sgan/csrc/ (see docs/fused-op.md).

Three ways, sharing the source list and flags defined here:
  * at install: setup.py calls ``setuptools_extensions()``, which builds the extension ``sgan._C``;
  * just in time: ``jit_load()`` compiles sgan/csrc/ with ninja on first use, cached in the torch extensions dir
    (``$TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions), when the package was installed without it;
  * CI: ``python -m sgan._build cuda-check`` compiles the CUDA kernel without a GPU and checks the library
    holds device code.

The CUDA kernel is built when a CUDA toolkit is found and a GPU is visible, or when SGAN_FORCE_CUDA=1.
torch.utils.cpp_extension is imported lazily: importing it probes for CUDA, which is slow and warns.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"  # inside the package, so an installed wheel carries it
# loss_op.cpp holds the loss op's schemas, autograd and the module init, noise_op.cpp the noise op's schema and
# autograd; the kernels register themselves per device.
CPU_SOURCES = ["loss_op.cpp", "noise_op.cpp", "cpu/loss_cpu.cpp", "cpu/noise_cpu.cpp"]
CUDA_SOURCES = ["cuda/loss_cuda.cu"]
# -fopenmp on both compile and link: at::parallel_for is an OpenMP loop in the headers, so without it the
# CPU kernel silently runs on one thread. -fno-trapping-math lets GCC vectorise the branch-free exp/log
# loops and row reductions (their selects would otherwise count as control flow); NaN and inf handling
# are unchanged. -fno-math-errno lets sqrt vectorise (no errno for a negative argument: none is ever read).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
# CUDA 13 builds for compute capability 7.5 (Turing) and newer; PTX of the newest target JIT-compiles on
# future GPUs.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# cuda-check compiles the oldest and newest targets only (+PTX), to stay fast.
CHECK_CUDA_ARCH_LIST = "7.5;12.0+PTX"
JIT_NAME = "sgan_loss_op"


def _has_cudart(home: str | os.PathLike) -> bool:
    home = Path(home)
    targets = glob.glob(str(home / "targets" / "*" / "lib" / "libcudart.so"))
    return (home / "lib64" / "libcudart.so").exists() or bool(targets)


def _nvcc_toolkit_dir(nvcc: str) -> str | None:
    """The toolkit an nvcc on PATH really runs: it may be a wrapper script, so ask nvcc (its TOP= line)."""
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home() -> str | None:
    """The CUDA toolkit dir (one with lib64/libcudart.so): $CUDA_HOME, $CUDA_PATH, the nvcc on PATH, /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), _nvcc_toolkit_dir(nvcc)]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return os.path.realpath(home)
    return None


def cuda_requested() -> bool:
    """Build the CUDA kernel: SGAN_FORCE_CUDA=1, or a CUDA build of torch with a toolkit and a visible GPU."""
    if os.environ.get("SGAN_FORCE_CUDA") == "1":
        return True
    return bool(torch.version.cuda) and torch.cuda.is_available() and find_cuda_home() is not None


def _cpp_extension(cuda: bool, arch_list: str = DEFAULT_CUDA_ARCH_LIST):
    """Import torch.utils.cpp_extension, pointed at the real toolkit when building CUDA code.

    torch guesses CUDA_HOME once, at import, from the nvcc on PATH; here that guess can be a wrapper's
    parent dir without the CUDA libraries, so set CUDA_HOME first and overwrite the guess.
    """
    if cuda:
        home = find_cuda_home()
        if home is None:
            raise RuntimeError(
                "no CUDA toolkit found (a dir with bin/nvcc and lib64/libcudart.so): set CUDA_HOME to it"
            )
        os.environ["CUDA_HOME"] = home
        # Without a visible GPU torch cannot pick the archs (it raises IndexError): default to CUDA 13's.
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list)
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found": expected on a machine without a GPU
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    if cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    return cpp_extension


def _relative_to_cwd(path: Path) -> str:
    # setuptools wants source paths relative to setup.py's dir, which is the cwd of a build
    return os.path.relpath(path, os.getcwd())


def setuptools_extensions():
    """(ext_modules, cmdclass) for setup.py: the extension sgan._C, with the CUDA kernel if cuda_requested()."""
    cuda = cuda_requested()
    cpp_extension = _cpp_extension(cuda)
    sources = [_relative_to_cwd(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])]
    if cuda:
        extension = cpp_extension.CUDAExtension(
            "sgan._C", sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=LINK_FLAGS
        )
    else:
        extension = cpp_extension.CppExtension(
            "sgan._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS
        )
    print(f"sgan: building the fused loss op as sgan._C ({'CPU + CUDA' if cuda else 'CPU only'})")
    return [extension], {"build_ext": cpp_extension.BuildExtension}


def jit_load(verbose: bool = False) -> str:
    """Compile sgan/csrc/ with ninja (cached) and load it, which registers torch.ops.sgan. Returns the library path."""
    if not (CSRC / CPU_SOURCES[0]).is_file():
        raise RuntimeError(f"no C++ sources at {CSRC}: they ship inside the package; reinstall sgan")
    cuda = cuda_requested()
    cpp_extension = _cpp_extension(cuda)
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])]
    name = JIT_NAME + ("_cuda" if cuda else "")  # separate caches: the two builds differ in sources
    build_root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    print(
        f"sgan: sgan._C is not installed; JIT-building the fused loss op ({'CPU + CUDA' if cuda else 'CPU'}) with "
        f"ninja under {build_root} (~15 s for CPU, minutes with CUDA; cached after the first time)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    path = cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LINK_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )
    print(f"sgan: fused loss op ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return path


def _elf_section(path: str, wanted: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF file (b"" if absent)."""
    data = Path(path).read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]  # sh_offset of the section-name string table
    for sh_name, _, _, _, offset, size, *_ in headers:
        start = names + sh_name
        if data[start : data.index(b"\0", start)].decode() == wanted:
            return data[offset : offset + size]
    return b""


def device_code(library: str) -> list[str]:
    """GPU code embedded in a library, as ["sm_75", "compute_120", ...] (cubins sm_*, PTX compute_*).

    Reads the .nv_fatbin section directly, so it needs no cuobjdump (not every toolkit install has it):
    fatbin containers (magic 0xBA55ED50, 16-byte header, payload size) hold entries whose header gives
    kind (1 PTX, 2 cubin), header size, payload size and, at byte 28, the arch.
    """
    fatbin = _elf_section(library, ".nv_fatbin")
    found, offset = [], 0
    while offset + 16 <= len(fatbin):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", fatbin, offset)
        if magic != 0xBA55ED50:  # padding between containers
            offset += 8
            continue
        entry, end = offset + header_size, offset + header_size + size
        while entry < end:
            kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", fatbin, entry)
            (arch,) = struct.unpack_from("<I", fatbin, entry + 28)
            found.append(f"{'compute' if kind == 1 else 'sm'}_{arch}")
            entry += entry_header_size + payload_size
        offset = end
    return found


def cuda_check(build_dir: str | None = None) -> int:
    """Compile loss_cuda.cu (with loss_math.h and its op registration) as SGAN_FORCE_CUDA=1 would, into a
    temp dir, and check the library holds GPU code. Needs the toolkit, not a GPU. Returns an exit code."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("cuda-check: FAIL: no CUDA toolkit found (bin/nvcc and lib64/libcudart.so): set CUDA_HOME")
        return 1
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or CHECK_CUDA_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    cpp_extension = _cpp_extension(cuda=True, arch_list=arch_list)
    build_dir = build_dir or tempfile.mkdtemp(prefix="sgan_cuda_check_")
    os.makedirs(build_dir, exist_ok=True)
    print(f"cuda-check: toolkit {cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list}, build dir {build_dir}", flush=True)
    start = time.perf_counter()
    try:
        # Loading the library also checks it links; it registers CUDA kernels only, which is harmless.
        library = cpp_extension.load(
            name="sgan_cuda_check",
            sources=[str(CSRC / s) for s in CUDA_SOURCES],
            extra_cuda_cflags=NVCC_FLAGS,
            with_cuda=True,
            is_python_module=False,
            build_directory=build_dir,
        )
    except Exception as error:  # noqa: BLE001 - report any build failure as a failed check
        print(f"cuda-check: FAIL: build failed after {time.perf_counter() - start:.0f} s: {error}")
        return 1
    elapsed = time.perf_counter() - start
    found = device_code(library)
    print(f"cuda-check: built {library} in {elapsed:.0f} s")
    print(f"cuda-check: device code in the library: {', '.join(found) or 'none'}")
    wanted = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if arch:
            number = arch.replace("+PTX", "").replace(".", "")
            wanted += [f"sm_{number}"] + ([f"compute_{number}"] if arch.endswith("+PTX") else [])
    missing = [code for code in wanted if code not in found]
    if missing:
        print(f"cuda-check: FAIL: no {', '.join(missing)} in the library")
        return 1
    print("cuda-check: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cuda-check"]:
        return cuda_check(argv[1] if len(argv) > 1 else None)
    if argv[:1] == ["jit"]:
        print(jit_load(verbose="-v" in argv))
        return 0
    print("usage: python -m sgan._build cuda-check [BUILD_DIR] | jit [-v]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
