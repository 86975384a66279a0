# The README's two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first, with pip, so that pip can take them from this machine's
# local wheel cache (see README, "Installing torch").
ifeq ($(shell uname -m),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
# Without a GPU, PyPI's Linux torch is still the CUDA build (about 6 GB with its NVIDIA wheels): take the
# CPU build from PyTorch's CPU index instead; where that index is out of reach, the wheels pip can reach.
# TORCH_BUILD=cuda (or cpu) overrides the guess.
TORCH_BUILD ?= $(shell (nvidia-smi -L >/dev/null 2>&1 && echo cuda) || echo cpu)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
DEMO_OUTPUT ?= outputs/demo

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
ifeq ($(TORCH_BUILD),cpu)
	$(BIN)/pip install --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple --retries 0 \
		--timeout 20 $(TORCH) || $(BIN)/pip install $(TORCH)
else
	$(BIN)/pip install $(TORCH)
endif
	touch $@

# compat: the clone's folder goes on sys.path, so `import vqar` works from the folder above a clone
# named vqar too (setuptools' default editable finder loses to the clone folder as a namespace package)
$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/python -m pytest

demo: $(VENV)/.installed
	$(BIN)/vqar demo --output $(DEMO_OUTPUT)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs build *.egg-info
