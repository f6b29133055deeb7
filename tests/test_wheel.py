"""An installed wheel without the compiled op carries the C++/CUDA sources, and JIT-builds the op from them.

Builds the wheel with SGAN_NO_EXTENSION=1, unpacks it (a pure-Python wheel installs by unpacking) and, in a
fresh interpreter that sees only that dir and the dependencies (no repo, no editable install), JIT-compiles
the op into an empty TORCH_EXTENSIONS_DIR and compares it with the reference. About 40 s on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGING = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md"]

# Runs in the fresh interpreter: argv = [the unpacked wheel, the extensions dir, the repo].
CHECK = textwrap.dedent(
    """
    import importlib.util, os, sys
    import torch
    site, extensions, repo = sys.argv[1:]
    import sgan
    from sgan import losses, ops
    assert sgan.__file__.startswith(site), f"sgan imported from {sgan.__file__}, not from the wheel"
    assert repo not in {os.path.realpath(p or ".") for p in sys.path}, sys.path
    assert importlib.util.find_spec("sgan._C") is None, "the wheel should not hold the compiled op"
    assert ops.available_backends() == ["torch", "cpp"], ops._library_error
    assert ops._library_path.startswith(extensions), ops._library_path
    generator = torch.Generator().manual_seed(0)
    for formulation in losses.FORMULATIONS:
        logits = torch.randn(1000, losses.num_logits(formulation, 10), generator=generator) * 3
        target = torch.randint(-2, 10, (1000,), generator=generator)
        torch.testing.assert_close(
            ops.discriminator_loss_sums(logits, target, formulation, backend="cpp"),
            losses.discriminator_loss_sums(logits, target, formulation),
        )
    print("jit from wheel: ok")
    """
)


def test_jit_build_from_an_installed_wheel(tmp_path):
    # Build from a copy: pip writes build/ and *.egg-info beside setup.py, which is a shared checkout here.
    source = tmp_path / "source"
    shutil.copytree(REPO / "sgan", source / "sgan", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in PACKAGING:
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        env={**os.environ, "SGAN_NO_EXTENSION": "1"},
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("sgan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("loss_op.cpp", "loss_math.h", "loss_checks.h", "cpu/loss_cpu.cpp", "cpu/vector_math.h", "cuda/loss_cuda.cu"):
        assert f"sgan/csrc/{path}" in names
    assert not [name for name in names if name.endswith(".so")]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    extensions = tmp_path / "torch_extensions"
    # -S: no site-packages .pth files, so not the editable install of this checkout; the dependencies come
    # from PYTHONPATH, after the unpacked wheel.
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *dependencies]),
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # ninja
    }
    env.pop("SGAN_LOSS_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-S", "-c", CHECK, str(site), str(extensions), str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jit from wheel: ok" in result.stdout
    assert "JIT-building the fused loss op" in result.stderr
