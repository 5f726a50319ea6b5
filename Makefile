# make setup: the virtualenv (idempotent). make test: the tests. make demo: export, serve, generate.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test lint pycompat demo export triton perf-tools soak audit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# --no-compile: Python compiles each module on its first import; compiling all 315 MB of the
	# dependencies' sources up front took 73 s of CPU here (compileall -j1), mostly for modules never imported
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	# the CLIP BPE vocabulary file; --no-deps: its declared deps would pull torchvision and a CUDA torch
	$(PY) -m pip install --quiet --no-compile --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

lint: setup pycompat
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layers: pyproject.toml [tool.importlinter]

# Python 3.10 (the NGC Triton image's) for every module the images run, standard-library APIs included:
# vermin knows which release added each module, function and syntax, not only the grammar.
PYCOMPAT_PATHS ?= sd_triton export gateway perf model_repository
pycompat:  # run by `make lint` (after setup)
	$(VENV)/bin/vermin --target=3.10- --violations --eval-annotations --no-tips $(PYCOMPAT_PATHS)

# Debian packages the tests start for real: redis-server (the shared-state backend) and chromium with
# its driver (the playground test). Installed once; skipped when present.
SYSTEM_BINS := /usr/bin/redis-server /usr/bin/chromium /usr/bin/chromedriver
system-deps:
	@for bin in $(SYSTEM_BINS); do test -x $$bin || missing=1; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
			redis-server chromium chromium-driver; \
	fi

test: setup system-deps lint perf-tools audit
	$(VENV)/bin/pytest -q

# pip-audit over the images' pinned requirements and the venv; fails on a finding docker/audit-known.toml
# does not list. Dependencies no vulnerability service answered for are a WARNING (AUDIT_FLAGS=--strict: a failure).
audit: setup
	$(PY) -m sd_triton.dependency_audit $(AUDIT_FLAGS)

# perf_analyzer (from the tritonclient 2.41.1 wheel) and its libraries in .tools/, not in the venv
perf-tools: setup
	$(PY) -m sd_triton.perf.tools --tools-dir .tools

export: setup
	$(VENV)/bin/sd-triton export --model demo --engine python-ort --repo model_repository

triton: export
	$(VENV)/bin/sd-triton triton --repo model_repository

demo: export
	$(PY) -m sd_triton.demo --repo model_repository --out demo.png

# Not part of `make test`: the small preset under steady load for SOAK_MINUTES (Triton + gateway started
# and stopped by it); fails on an error, p99 drift >= 10% or RSS growth >= 5% after warm-up.
SOAK_MINUTES ?= 10
soak: setup
	$(VENV)/bin/sd-triton perf soak --preset small --minutes $(SOAK_MINUTES)

clean:
	rm -rf .cache out
