"""Build and install sgan.

The fused loss op in sgan/csrc/ is built here as the extension ``sgan._C`` when torch is importable at build
time: pyproject.toml lists torch as a build requirement, and ``pip install --no-build-isolation -e .`` (what
``make setup`` runs) builds against the torch already installed. SGAN_NO_EXTENSION=1 skips it. The sources
ship inside the package either way, so an install without sgan._C JIT-builds the op on first use. See
docs/fused-op.md.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def extension_modules():
    """The compiled loss op, or nothing when SGAN_NO_EXTENSION=1 or torch is not importable (the op then
    JIT-builds on first use)."""
    if os.environ.get("SGAN_NO_EXTENSION") == "1":
        print("sgan: SGAN_NO_EXTENSION=1: not building the fused loss op; it will JIT-build on first use")
        return [], {}
    try:
        from sgan._build import setuptools_extensions
    except ImportError as error:  # torch missing in an isolated build environment
        print(f"sgan: not building the fused loss op at install time ({error}); it will JIT-build on first use")
        return [], {}
    return setuptools_extensions()


ext_modules, cmdclass = extension_modules()

setup(
    name="sgan",
    version="0.1.0",
    description="Semi-supervised learning with GANs in PyTorch: the discriminator is the classifier",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sgan", "sgan.*"]),
    # the op's C++/CUDA sources, for the JIT build of an install without sgan._C (sgan._build.jit_load)
    package_data={"sgan": ["csrc/*.h", "csrc/*.cpp", "csrc/*/*.h", "csrc/*/*.cpp", "csrc/*/*.cu"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "accelerate>=1.0",
        "wandb>=0.18",
        "tensorboard>=2.14",
        "ninja",
        "pybind11",
        "numpy",
        "safetensors",  # weights that load without executing code
        "tqdm",  # progress bars
        "pillow",  # decoding your own images (sgan.images)
        "pyyaml",  # --config files
        "matplotlib",  # plots of results
    ],
    # svhn: reading SVHN's .mat files (sgan.data tells to install it when missing); the tests read small ones
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "scipy"], "svhn": ["scipy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["sgan-train=sgan.train:main", "sgan-data=sgan.data:main",
                                      "sgan-evaluate=sgan.evaluate:main", "sgan-study=sgan.study:main",
                                      "sgan-predict=sgan.predict:main", "sgan-export=sgan.export:main"]},
)
