# Thin entry points; the work lives in sparsek/, nsight/ and ci/.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-bench install-test bench bench-profile bench-learn test site

install:
	$(PIP) install -q -e .

install-bench:
	$(PIP) install -q -e ".[bench]"

install-test:
	$(PIP) install -q -e ".[test]"

# The default benchmark set for this machine (GPU: seed, long-*, tiers; CPU: cpu-smoke).
bench: install-bench
	$(PYTHON) -m sparsek.bench.cli run --default

# Nsight Compute capture of the default cases -> benchmarks/metrics.json
bench-profile: install-bench
	$(PYTHON) -m sparsek.bench.cli profile --default --output benchmarks/metrics.json

# The learnability benchmark's quick setting (CPU, about a minute); learn-cpu/learn-full are longer
bench-learn: install-bench
	$(PYTHON) -m sparsek.bench.cli run --case learn-quick --quick

test: install-test
	$(PYTHON) -m pytest -q

# asv publish + the tier-history page, from the committed results
site: install-bench
	bash ci/site.sh
