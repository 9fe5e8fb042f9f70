# Two entry points: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sfp-installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[notebook,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sfp demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
