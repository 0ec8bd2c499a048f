# Two commands do all the set-up on a fresh machine:
#   make demo   builds the venv if needed, then runs the main job on the embedded default
#   make test   builds the venv if needed, then runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/eoedge: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all]"
	touch $@

venv: $(BIN)/eoedge

demo: venv
	$(BIN)/eoedge demo

# A crashed worker ends the run at once: with --dist loadfile, pytest-xdist 3.8 hangs for good
# after replacing one (pytest-xdist#1323).
# The tests that start process trees from torch (torchrun ranks, DataLoader workers) run after,
# in a fresh pytest process of their own: twice in clean-clone runs an xdist worker died as one
# of them started its children, after other files had run in that worker (cause not found; each
# passes alone and after the onboard files that were suspected).
FORKING = tests/ground/test_ddp.py tests/ground/test_lazy_dataset.py
test: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile --max-worker-restart=0 $(FORKING:%=--ignore=%)
	$(BIN)/python -m pytest -q $(FORKING)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
