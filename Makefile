# make setup: .venv with pagedllm installed (editable) plus the local tritonserver, test and bench extras.
# make serve: the server on the default tiny checkpoint (or ARGS="--model DIR ...").  make test: lint, then the suite.
# make lint: ruff (what CI runs before the tests).  make interface: the llm interface's copies, rewritten.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pagedllm-setup
# Without an NVIDIA GPU: CPU torch (from TORCH_INDEX if set, e.g. https://download.pytorch.org/whl/cpu) and the
# triton of the GPU image (see pyproject.toml), so CPU tests exercise the same triton as GPU runs.
TORCH_INDEX ?=
CPU_PINS ?= torch==2.13.0 triton==3.6.0
ARGS ?=

.PHONY: setup serve lint test interface clean-venv

setup: $(STAMP)

# Redone when pyproject.toml changes. On a machine without nvidia-smi the CPU pins go in first, so the
# package's torch/triton requirements are already met (no CUDA wheels pulled in).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install $(CPU_PINS) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/python -m pip install -e '.[server,test,bench]'
	touch $@

serve: setup
	$(BIN)/pagedllm serve $(ARGS)

lint: setup
	$(BIN)/ruff check backend client tests bench examples

test: lint
	$(BIN)/python -m pytest -q tests --durations=15

# Rewrites llm's config.pbtxt inputs/outputs and the README's interface tables from backend/pagedllm/interface.py.
interface: setup
	$(BIN)/python tests/test_interface.py

clean-venv:
	rm -rf $(VENV)
