# The compiled loss op sgan._C links against torch's shared libraries, which only `import torch` loads: import
# it first so that `import sgan._C` works on its own (every sgan module imports torch anyway).
import torch  # noqa: F401

__all__ = ["load_classifier"]


def __getattr__(name: str):
    """sgan.load_classifier, imported on first use: `import sgan` stays light for the tools that skip it."""
    if name == "load_classifier":
        from .classifier import load_classifier

        return load_classifier
    raise AttributeError(f"module 'sgan' has no attribute {name!r}")
