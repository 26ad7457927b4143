# The README's two commands. Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build: an unpinned torch pulls several GB of CUDA libraries.
# Where the CPU wheel is not on a local index, set TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

# The quickstart federation: a server and 2 sites on synthetic spleen volumes, then the seed's Table 1 (a minute
# on 2 cores; results in runs/). docs/experiments.md has the other experiments.
demo: $(STAMP)
	$(BIN)/python -m lightning_fhe.simulate configs/experiments/quickstart.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
