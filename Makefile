# The two commands of the README:
#   make demo   runs the product end to end on its built-in demo data
#   make test   runs the whole test suite with lint and type checks (what .ci/run calls); it
#               installs Prometheus (Debian package) for the deploy tests where it can
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml setup.py protos/generate.py $(wildcard protos/anomaly/v1/*.proto) $(CONSTRAINTS)

.PHONY: demo test lint typecheck pytest proto bench clean

$(STAMP): $(INSTALL_INPUTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed, found " + sys.version)'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[train,dev]'
	@touch $@

# End to end: demo data -> training (cached in .demo/) -> gRPC service -> client -> summary.
demo: $(STAMP)
	$(BIN)/python -m training demo --workdir .demo

test: lint typecheck deploy-tools pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# Regenerate service/_proto after editing protos/ (the install does this too).
proto: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .demo build service/_proto .mypy_cache .ruff_cache .pytest_cache

# Tools of the deploy/ tests (tests/test_deploy_*.py): Debian's prometheus package (the server and
# promtool) when running as root with apt-get, and the linters of deploy/requirements-tools.txt
# into the venv. Never fails: whatever cannot be installed makes its tests skip, saying why.
.PHONY: deploy-tools
deploy-tools: $(STAMP)
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then \
	  echo "deploy-tools: prometheus and promtool are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 \
	         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }; \
	  then echo "deploy-tools: installed Debian's prometheus package"; \
	  else echo "deploy-tools: could not install prometheus with apt-get; its tests will be skipped"; fi; \
	else \
	  echo "deploy-tools: not root or no apt-get: prometheus not installed; its tests will be skipped"; \
	fi
	@$(PIP) install --quiet -r deploy/requirements-tools.txt \
	  && echo "deploy-tools: installed the linters of deploy/requirements-tools.txt" \
	  || echo "deploy-tools: could not install the linters; their tests will be skipped"
