# The README's two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision from this machine's local wheels (see README, "Installing torch").
ifeq ($(shell uname -m),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
DEMO_OUTPUT ?= outputs/demo

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install -e '.[test]'
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
