# Two commands: `make demo` (the main job on the bundled organism) and `make test`.
# Both create .venv on first use: torch first (the CPU wheel), then the pinned set, then the
# package. PIP_CONSTRAINT forbids torchvision for any child pip; HF_HUB_OFFLINE stops hub look-ups.
SHELL     := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY        ?= python3
QUIET     := { grep -v "^WARNING: Location" || true; }
VENV      := .venv
BIN       := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
STAMP     := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 2>&1 | $(QUIET)
	$(BIN)/pip install -q -r requirements.lock 2>&1 | $(QUIET)
	$(BIN)/pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, transformers, interp, analyses, probes; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spatialbias report --model organism --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) out
