# sgan: `make train` and `make test` set everything up on a fresh machine (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Flags for launch/train.py, e.g. make train ARGS="--recipe supervised --epochs 2"
ARGS ?=
# Flags for `accelerate launch` (one process by default; see README for DDP)
LAUNCH_ARGS ?= --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
# Flags for pytest, e.g. make test PYTEST_ARGS="-m slow"
PYTEST_ARGS ?=

.PHONY: setup train test test-all cuda-check gpu-check benchmark benchmark-training paper-results study docs clean

setup: $(VENV)/.installed data/MNIST/raw/.prepared

# Re-run the install only when the packaging or the C++/CUDA sources change.
$(VENV)/.installed: setup.py pyproject.toml $(wildcard sgan/csrc/*.* sgan/csrc/*/*.*) sgan/_build.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "setuptools>=64" wheel
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

data/MNIST/raw/.prepared: $(VENV)/.installed
	$(PY) -m sgan.data prepare --dataset mnist --root data
	touch $@

train: setup
	$(VENV)/bin/accelerate launch $(LAUNCH_ARGS) launch/train.py $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The long real-data runs as well as the fast set.
test-all: setup
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Compile the CUDA kernel without a GPU and check the library holds device code (CI runs this).
cuda-check: setup
	$(PY) -m sgan._build cuda-check

# The whole CUDA path on a machine with a GPU (docs/fused-op.md): the interpreter and torch already there, no
# setup, pip or network. GPU_PYTHON=/path/to/python picks one (default: python3 if it has torch, else .venv's);
# flags in ARGS, e.g. make gpu-check ARGS="--require-training". Writes gpu_check.json; "no GPU" exits 0.
gpu-check:
	@python="$(GPU_PYTHON)"; \
	if [ -z "$$python" ]; then python=python3; $$python -c "import torch" 2>/dev/null || { [ -x $(PY) ] && python=$(PY); }; fi; \
	$$python -c "import torch" || { echo "gpu-check: $$python cannot import torch: set GPU_PYTHON=/path/to/python"; exit 1; }; \
	echo "gpu-check: $$python"; \
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $$python -m sgan.gpu_check $(ARGS)

# The fused loss op against eager PyTorch, torch.compile and the memory-bandwidth floor.
benchmark: setup
	$(PY) benchmarks/loss.py

# Training throughput per recipe and loss backend (benchmarks/training.py; time-to-accuracy: see RESULTS.md)
benchmark-training: setup
	$(PY) benchmarks/training.py throughput $(ARGS)

# issue 14's wider results: salimans against its supervised baseline, MNIST 20/50/100 and Fashion-MNIST 100
# labels, fresh seeds 100-104 (many hours; resumable; ARGS="--dry-run" shows the plan)
paper-results: setup
	$(PY) benchmarks/paper.py $(ARGS)

# The label-budget study (see README, "Studies"), e.g. make study ARGS="--dry-run"
study: setup
	$(PY) -m sgan.study $(ARGS)

# docs/cli.md from the tools' --help (a test fails when it is stale)
docs: setup
	$(PY) docs/generate_cli.py

clean:
	rm -rf build *.egg-info sgan/*.so runs
