# The two commands of the README: `make demo` (the quickstart pipeline, offline, CPU) and `make test`.
# Both create ./.venv on first use and reinstall only when setup.py changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. The default pair is the one this project is tested with; on a GPU
# machine with another CUDA version use e.g. `make demo TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= quickstart
PYTEST_ARGS ?=

.PHONY: demo test test-fast benchmark clean-venv

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Byte-compiled at install (no --no-compile, which would save ~10 s here): where
	# PYTHONDONTWRITEBYTECODE is set, as on CI, every process would compile torch from source
	# again (CI run 37 with it: 1,220 s instead of ~700, its subprocess tests 2-2.5x slower).
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.run --config $(CONFIG) --resume

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not realdata" $(PYTEST_ARGS)

benchmark: $(VENV)/.installed
	$(PY) -m experiments.benchmark

clean-venv:
	rm -rf $(VENV)
