# Two commands on a fresh machine: `make demo` (the main job, end to end) and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on CPU-only machines (it lies on disk here). GPU users: TORCH="torch==2.13.0 --index-url <cuda index>".
TORCH ?= torch==2.13.0
export RAY_TMPDIR ?= /tmp/llmp-ray
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-checks setup-corpora setup-monitoring demo lint test test-fast bench clean

# uv installs (parallel downloads and installs; about half pip's time here) into plain venvs. It byte-compiles what
# it installs (--compile-bytecode): machines here set PYTHONDONTWRITEBYTECODE=1, so without that step every Python
# process (each Ray worker among them) would compile torch, transformers and Ray from source on import.
# Wheels that lie on this machine's disk (pip's find-links: the CPU torch) are used first.
TOOLS_VENV ?= .venv-tools
UV := $(TOOLS_VENV)/bin/uv
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
export UV_LINK_MODE ?= copy
UV_INSTALL = $(UV) pip install -q --compile-bytecode --python

$(UV):
	python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q uv==0.13.9

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(UV)
	python3 -m venv $(VENV)
	$(UV_INSTALL) $(PY) $(TORCH)
	$(UV_INSTALL) $(PY) -e '.[test]'
	touch $@

# checkov pins many packages that clash with ours: it lives in its own venv (tests/unit/test_terraform.py uses it).
CHECKS_VENV ?= .venv-checks
# Pinned: every checkov release adds checks, and a new one must not turn CI red without a change here.
CHECKOV_VERSION ?= 3.3.30
setup-checks: $(CHECKS_VENV)/.installed

$(CHECKS_VENV)/.installed: | $(UV)
	python3 -m venv $(CHECKS_VENV)
	$(UV_INSTALL) $(CHECKS_VENV)/bin/python checkov==$(CHECKOV_VERSION)
	touch $@

# The Debian packages whose text the real-corpus tests read (tests/corpus_fixtures.py): fortunes, man pages and the
# tools that render them. apt-get runs only for those not installed (as root, or through passwordless sudo); where it
# cannot (no apt-get, no root), `make test` says so and goes on, and those tests skip naming the packages.
CORPUS_PACKAGES ?= fortunes groff-base bsdextrautils manpages
setup-corpora:
	@missing=$$(for p in $(CORPUS_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -qx 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "setup-corpora: no apt-get here; missing:" $$missing; exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	echo "setup-corpora: installing" $$missing; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends $$missing || \
	  echo "setup-corpora: could not install $$missing (apt-get failed, or no root or passwordless sudo); the real-corpus tests skip"

# Debian's `prometheus` package: promtool for tests/unit/test_monitoring.py (`promtool check rules` and `promtool
# test rules` over cluster/monitoring/alerts.yaml) and the server for tests/integration/test_prometheus.py (a real
# scrape of the test's Ray). apt-get runs only when either is missing (as root, or through passwordless sudo); where
# it cannot, `make test` says so and goes on, and those tests skip naming the package.
setup-monitoring:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "setup-monitoring: no apt-get here; missing: prometheus (promtool)"; exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	echo "setup-monitoring: installing prometheus (the server and promtool)"; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends prometheus || \
	  echo "setup-monitoring: could not install prometheus (apt-get failed, or no root or passwordless sudo); the promtool tests skip"

# The main job end to end on the embedded default: data -> train -> register -> eval -> serve -> a sample query.
demo: setup
	$(VENV)/bin/llm-platform run debug=smoke run.keep_serving=false

# ruff over the code, tests and benchmarks; mypy over llm_platform/ (its settings are in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check llm_platform tests benchmarks
	$(VENV)/bin/mypy

# Lint first (seconds), then two pytest-xdist workers: the README story (a third of the suite, started first) on
# one, the rest on the other and then both. Much of the suite waits on processes starting (Ray, servers), so two
# workers overlap well on 2 cores.
test: setup setup-checks setup-corpora setup-monitoring lint
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadgroup

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

clean:
	rm -rf .llm-platform $(RAY_TMPDIR)

# datatrove, for benchmarks/data_datatrove.py only, in its own venv (it pins packages that clash with ours). spaCy
# gives its English word tokenizer (spacy.blank, no model download); orjson and aiohttp are imports its JsonlReader
# and its asset cache need even when nothing is downloaded.
DATATROVE_VENV ?= .venv-datatrove
setup-datatrove: $(DATATROVE_VENV)/.installed

$(DATATROVE_VENV)/.installed: | $(UV)
	python3 -m venv $(DATATROVE_VENV)
	$(UV_INSTALL) $(DATATROVE_VENV)/bin/python 'datatrove[processing]==0.10.1' spacy==3.8.18 orjson==3.13.0 \
	  aiohttp==3.14.5
	touch $@
