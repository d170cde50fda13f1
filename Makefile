# Set-up and common tasks. Every target creates the virtual environment if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch is installed first on machines without an NVIDIA GPU, so that
# resolving the package's "torch>=2.4" never downloads CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv quickstart test test-fast clean

$(BIN)/pbt-rl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU found: installing CPU torch ($(TORCH_SPEC))"; \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/pbt-rl

quickstart: venv
	$(BIN)/pbt-rl train configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs/quickstart
