# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moemesh train --set parallel.dp=2 --set parallel.ep=2 --set parallel.tp=2 --set run.dir=runs/demo --set run.overwrite=true

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
