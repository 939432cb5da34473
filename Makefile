# Every target sets itself up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
PROMPT ?= a red circle on the left and a blue square on the right

.PHONY: install test test-fast run bench demo hooks lint train clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU build of PyTorch (lies on this machine's disk) only when no torch is installed yet
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check diffusion_xai tests benchmarks

run: $(STAMP)
	$(VENV)/bin/diffusion-xai report "$(PROMPT)" --pair red,circle --contradict "a blue circle on the left and a blue square on the right" --out out/report
	@echo "open out/report/report.html"

demo: $(STAMP)
	$(PY) -m pip install -e ".[demo]"
	$(VENV)/bin/diffusion-xai demo --port 7860

bench: $(STAMP)
	$(PY) benchmarks/hooks_overhead.py
	$(PY) benchmarks/shapesworld.py

train: $(STAMP)
	$(PY) -m diffusion_xai.shapesworld.train --work runs/shapesworld --threads 2

hooks:
	git config core.hooksPath hooks
	@echo "git hooks enabled from hooks/ (ruff + fast tests before each commit)"

clean:
	rm -rf out .pytest_cache .ruff_cache
