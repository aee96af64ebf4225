# Two commands do everything on a fresh machine (README "Quickstart"):
#   make test   install into .venv, then run the test suite
#   make demo   install into .venv, then run the CPU demo (cached steps are skipped on rerun)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel first: with it in place the project's torch range pulls no CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

DEMO := runs/demo

demo: $(STAMP)
	$(BIN)/python models.py tiny --out $(DEMO)/model --size demo
	$(BIN)/python data.py --kind image --n 64 --seed 0 --out $(DEMO)/data/image

clean:
	rm -rf runs
