VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup serve test bench

# torch first, pinned: that takes the CPU build; a bare torch requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# `serve run configs/local.yaml`, through Serve's HAProxy ingress when haproxy is installed.
serve: setup
	$(PY) -m deployments.serve_local configs/local.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -p no:warnings

bench: setup
	$(PY) benchmarks/bench_serving.py
