# The compiled loss op sgan._C links against torch's shared libraries, which only `import torch` loads: import
# it first so that `import sgan._C` works on its own (every sgan module imports torch anyway).
import torch  # noqa: F401
