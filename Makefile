# Thin entry points; the work lives in sparsek/, nsight/ and ci/.
#
# Which Python: an active virtualenv's (VIRTUAL_ENV), else this project's own .venv, made on
# first use, so `make bench` and `make test` never pip-install into the system Python (Debian's
# refuses with externally-managed-environment). VENV=DIR picks another folder; `make test
# PYTHON=python` uses that interpreter as it is, with no virtualenv. The tools that recipes and
# tests call by name (python3, asv, sparsek-bench) resolve to the virtualenv's through PATH.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
BOOTSTRAP_PYTHON ?= python3
# The new virtualenv sees what the base Python already has (above all a torch build: a GPU
# runner's, a distribution's), so nothing installed there is downloaded again.
VENV_ARGS ?= --system-site-packages
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
ifeq ($(origin PYTHON),command line)
VENV_PYTHON :=
else
PYTHON := $(VENV)/bin/python
VENV_PYTHON := $(PYTHON)
export PATH := $(abspath $(VENV))/bin:$(PATH)
endif
PIP := $(PYTHON) -m pip

# PyTorch on a machine without an NVIDIA GPU (no nvidia-smi on PATH): PyPI's Linux torch is the
# CUDA build, about 5 GB with its nvidia-* wheels, so the CPU build goes in first, from
# TORCH_INDEX. TORCH_SPEC is the requirement (e.g. torch==2.13.0); TORCH_INDEX= (empty) takes it
# from pip's own configured indexes (a mirror that keeps CPU builds).
TORCH_SPEC ?= torch
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
NVIDIA_SMI ?= nvidia-smi
# More arguments of `make bench`'s run, e.g. BENCH_ARGS=--save (a GPU run for benchmarks/runs/).
BENCH_ARGS ?=
SITE_PORT ?= 8000
# `pip install -e ".[EXTRA]"` is done once per virtualenv and pyproject.toml; these files record
# it (an interpreter named with PYTHON= is installed into every time).
STAMP := $(VENV)/.sparsek-installed
INSTALLED = $(if $(VENV_PYTHON),$(STAMP)-$(1),install-$(1))

.PHONY: install install-bench install-test venv torch bench bench-profile bench-learn test site serve-site

install: | $(VENV_PYTHON)
	@$(MAKE) --no-print-directory torch
	$(PIP) install -e .

# Always installs (again); bench/test go through the stamp, so a second `make test` starts at once.
install-bench install-test: install-%: | $(VENV_PYTHON)
	@$(MAKE) --no-print-directory torch
	$(PIP) install -e ".[$*]"
	$(if $(VENV_PYTHON),@touch "$(STAMP)-$*")

$(STAMP)-bench $(STAMP)-test: $(STAMP)-%: pyproject.toml | $(VENV_PYTHON)
	@$(MAKE) --no-print-directory install-$*

venv: | $(VENV_PYTHON)

ifneq ($(VENV_PYTHON),)
# A folder that exists without bin/python is not ours to replace; one that venv fails to finish
# (Debian without python3-venv) is removed, so the next try starts clean.
$(VENV_PYTHON):
	@if [ -e "$(VENV)" ]; then echo "make: $(VENV) exists but has no bin/python; remove it or set VENV=DIR" >&2; exit 1; fi
	@echo "make: creating the virtualenv $(VENV) with $(BOOTSTRAP_PYTHON) (the system Python is left as it is)"
	@$(BOOTSTRAP_PYTHON) -m venv $(VENV_ARGS) "$(VENV)" || { rm -rf "$(VENV)"; \
	  echo "make: '$(BOOTSTRAP_PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
endif

# An index that pip cannot reach costs it about 8 s of retries per package; where a quick probe
# finds TORCH_INDEX unreachable, --retries 0 sends pip straight on to the sources its own
# configuration adds (find-links, extra indexes: a mirror). PyPI itself is not asked for torch on
# this path; what a mirror offers is pip's to choose, so the build it took is printed.
torch: | $(VENV_PYTHON)
	@if $(PYTHON) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then \
	  echo "make: torch is already installed for $(PYTHON)"; \
	elif command -v "$(NVIDIA_SMI)" >/dev/null 2>&1; then \
	  echo "make: NVIDIA GPU ($(NVIDIA_SMI) found): torch comes from PyPI with sparsek, as its CUDA build"; \
	elif [ -z "$(TORCH_INDEX)" ]; then \
	  echo "make: no NVIDIA GPU; installing $(TORCH_SPEC) from pip's own indexes (TORCH_INDEX is empty)"; \
	  echo "$(PIP) install '$(TORCH_SPEC)'"; \
	  $(PIP) install "$(TORCH_SPEC)"; \
	else \
	  echo "make: no NVIDIA GPU; installing PyTorch's CPU build ($(TORCH_SPEC)) from $(TORCH_INDEX)"; \
	  retries=""; \
	  if ! $(PYTHON) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
	      "$(TORCH_INDEX)/torch/" >/dev/null 2>&1; then \
	    echo "make: $(TORCH_INDEX) is unreachable; pip tries only the sources its configuration adds"; \
	    retries="--retries 0"; \
	  fi; \
	  echo "$(PIP) install $$retries --index-url $(TORCH_INDEX) '$(TORCH_SPEC)'"; \
	  $(PIP) install $$retries --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)" || { \
	    echo "make: no CPU build of torch found; set TORCH_INDEX to an index of CPU builds, or" \
	         "TORCH_INDEX= TORCH_SPEC=<a CPU build your pip can find> (README, 'Two commands')" >&2; exit 1; }; \
	  $(PYTHON) -c 'import torch; c = torch.version.cuda; print("make: installed torch", torch.__version__, f"(CUDA {c} build)" if c else "(CPU build)")'; \
	fi

# The default benchmark set for this machine (GPU: seed, long-*, train-*; CPU: cpu-smoke, a
# pipeline check). Results go to benchmarks/local/ unless BENCH_ARGS says --save or --json.
bench: $(call INSTALLED,bench)
	$(PYTHON) -m sparsek.bench.cli run --default $(BENCH_ARGS)

# Nsight Compute capture of the default cases -> benchmarks/metrics.json
bench-profile: $(call INSTALLED,bench)
	$(PYTHON) -m sparsek.bench.cli profile --default --output benchmarks/metrics.json

# The learnability benchmark's quick setting (CPU, about a minute); learn-cpu/learn-full are longer
bench-learn: $(call INSTALLED,bench)
	$(PYTHON) -m sparsek.bench.cli run --case learn-quick --quick

test: $(call INSTALLED,test)
	$(PYTHON) -m pytest -q

# asv publish + the tier-history page, from the committed results. asv's index.html loads its
# data with fetch(), which browsers refuse for file:// pages: it needs an HTTP server.
site: $(call INSTALLED,bench)
	PYTHON="$(abspath $(PYTHON))" bash ci/site.sh
	@echo "make: view it through HTTP (opened as a file, asv's index.html says 'Error fetching content'):"
	@echo "      make serve-site, then open http://127.0.0.1:$(SITE_PORT)/ and http://127.0.0.1:$(SITE_PORT)/tiers.html"

serve-site: | $(VENV_PYTHON)
	$(PYTHON) -m http.server --bind 127.0.0.1 --directory "$$($(PYTHON) ci/asv_conf.py --checkout . --get html_dir)" $(SITE_PORT)
