# Switchboard: `make run` starts the whole stack, `make test` passes the tests.
# Every target does its own set-up (virtualenv, dependencies, generated code).

# The newest CPython (3.11 or newer) the machine has, pyenv's included: tools/python.sh.
PYTHON ?= $(shell sh tools/python.sh)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/switchboard/v1/*.proto)
JS     := tests/js/node_modules/.package-lock.json
PROMTOOL := $(VENV)/bin/promtool
CHROMIUM := /usr/bin/chromium
USER   ?= dev

# gRPC's C core logs transport chatter at INFO; our services log for themselves.
export GRPC_VERBOSITY ?= ERROR

.PHONY: help venv protos check-protos run cluster test test-fast lint bench token client clean chromium

help:
	@echo "make run      start the whole stack (NATS, the four services), print a URL and a token"
	@echo "make cluster  the stack as a cluster, same ports: 3 NATS nodes, 3 task_svc, 2 gateways, 2 llm_svc"
	@echo "make test     lint, check generated code, run the whole test suite"
	@echo "make client   PROMPT='...' stream one generation through the gateway"
	@echo "make token    USER=alice print a development token"
	@echo "make bench    measure latency and throughput beside the bare transports"
	@echo "make protos   regenerate switchboard/v1 from protos/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The official npm `phoenix` client drives the gateway in tests/e2e/test_js_client.py.
$(JS): tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

# Generated code is committed; `make protos` rewrites it from scratch.
protos: $(STAMP)
	$(PY) -m tools.genprotos

check-protos: $(STAMP)
	$(PY) -m tools.genprotos --check

run: $(STAMP) check-protos
	$(PY) -m tools.stack

cluster: $(STAMP) check-protos
	$(PY) -m tools.cluster

# promtool checks and unit-tests deploy/monitoring/alerts.yaml (tests/test_monitoring.py):
# taken from Debian's prometheus package, unpacked, nothing installed system-wide.
$(PROMTOOL): | $(STAMP)
	rm -rf $(VENV)/.prometheus && mkdir -p $(VENV)/.prometheus
	cd $(VENV)/.prometheus && apt-get download prometheus >/dev/null 2>&1 && dpkg-deb -x prometheus_*.deb .
	cp $(VENV)/.prometheus/usr/bin/promtool $(PROMTOOL) && rm -rf $(VENV)/.prometheus

# Headless Chromium for tests/e2e/test_dashboard.py: Debian's package, driven by playwright
# (which never downloads a browser of its own: no `playwright install`).
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	test -x $(CHROMIUM)

chromium: $(CHROMIUM)

test: $(STAMP) $(JS) $(PROMTOOL) $(CHROMIUM) check-protos lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

bench: $(STAMP) check-protos
	$(PY) -m tools.bench $(ARGS)

token: $(STAMP)
	@$(PY) -m gateway_svc.tokens $(USER)

client: $(STAMP)
	$(PY) -m gateway_svc.client $(if $(PROMPT),"$(PROMPT)",)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
