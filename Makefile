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

.PHONY: demo test setup clean lab notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 2>&1 | $(QUIET)
	$(BIN)/pip install -q -r requirements.lock 2>&1 | $(QUIET)
	$(BIN)/pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, transformers, interp, analyses, probes; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

# `make demo SOURCE=skimage`: a caption probe from scikit-image's bundled photographs, scored by
# a tiny RANDOM-WEIGHT LLaVA saved to out/tiny-llava-random (the organism has no Yes/No tokens):
# its numbers measure the pipeline, not a model.
SOURCE    ?= shapes
DEMO_N    ?= 10
TINY      := out/tiny-llava-random

demo: $(STAMP)
ifeq ($(SOURCE),shapes)
	$(BIN)/spatialbias report --model organism --out out/demo
else ifeq ($(SOURCE),skimage)
	$(BIN)/python -c "import json; from interp import tiny; m, p = tiny.build_llava(seed=0); d = tiny.save(m, p, '$(TINY)'); (d / 'provenance.json').write_text(json.dumps({'random_weights': True, 'note': 'A tiny LLaVA with random weights (interp/tiny.py build_llava, seed 0), saved for the real-photo demo. Its numbers measure the pipeline, not a model: they say nothing about pretrained LVLMs.'}, indent=1))"
	$(BIN)/spatialbias probe build --source skimage --out out/demo-skimage/probe --n $(DEMO_N) --negatives --seed 0
	$(BIN)/spatialbias report --model $(TINY) --probe out/demo-skimage/probe --out out/demo-skimage --no-causal
	@echo "NOTE: out/demo-skimage was scored by a tiny RANDOM-WEIGHT LLaVA: its numbers check the pipeline, they are not results about any pretrained LVLM."
else
	@echo "error: SOURCE=$(SOURCE) is not known; use SOURCE=shapes (default) or SOURCE=skimage" >&2; exit 2
endif

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# JupyterLab on the notebooks (from the venv). LAB_ARGS adds options, e.g. LAB_ARGS="--no-browser --port 8890".
LAB_ARGS ?=
AS_ROOT   := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(AS_ROOT) $(LAB_ARGS)

# Execute every notebook in place, so the committed notebooks carry their outputs (figures
# included); tests/test_notebooks.py checks that they are current.
notebooks: $(STAMP)
	cd notebooks && ../$(BIN)/python execute.py *.ipynb

clean:
	rm -rf $(VENV) out
