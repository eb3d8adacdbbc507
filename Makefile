# Everything runs in a project-local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scrutiny-installed

.PHONY: setup demo test lint typecheck unit bench test-pythons clean

# The browser tests drive Debian's Chromium (no browser downloads here); install it once.
CHROMIUM := /usr/bin/chromium

setup: $(STAMP)

# torch first and pinned: it comes from the machine's local CPU wheel, where an unpinned
# torch (pulled in by sentence-transformers) would download a several-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: the offline quickstart on the embedded SQLite default, in a fresh folder.
demo: $(STAMP)
	rm -rf build/demo && mkdir -p build/demo
	cd build/demo && ../../$(PY) ../../examples/quickstart.py
	cd build/demo && ../../$(PY) ../../examples/llama_index_quickstart.py
	cd build/demo && ../../$(PY) ../../examples/providers_quickstart.py

lint: $(STAMP)
	$(PY) -m ruff check scrutiny tests examples bench

# Also against Python 3.10's standard library, the oldest the package supports: a call
# it lacks (asyncio.timeout, datetime.UTC) fails here rather than on a user's 3.10.
typecheck: $(STAMP)
	$(PY) -m mypy
	$(PY) -m mypy --python-version 3.10

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium fonts-liberation

unit: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -p no:cacheprovider

test: lint typecheck unit

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/throughput.py
	$(PY) bench/visibility.py
	$(PY) bench/llama_index_overhead.py
	$(PY) bench/judge_throughput.py
	$(PY) bench/deferred.py
	$(PY) bench/dashboard.py
	$(PY) bench/pii.py
	$(PY) bench/parse.py
	$(PY) bench/lexical.py
	$(PY) bench/embeddings.py
	$(PY) bench/memory.py

# The suite on the other Pythons the package supports, each in a virtualenv of its own:
# without the embeddings extra (the machine's local torch wheel is for 3.11 only), hence
# without the README block that uses it, and without the browser tests (`make test` runs
# those). Each Python is pyenv's when it has one, else pythonX.Y on the PATH. Set
# SCRUTINY_TEST_POSTGRES_URL first for the PostgreSQL tests.
PYTHONS ?= 3.10 3.12 3.13
OTHER_EXTRAS := langchain,llama-index,postgres,lexical,sentiment,dashboard
OTHER_DEV := pytest pytest-asyncio pytest-timeout httpx 'langgraph>=1.0' 'langchain>=1.0' \
	nest-asyncio 'distributed>=2024.1' mypy

test-pythons:
	set -e; for v in $(PYTHONS); do \
		py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python 2>/dev/null \
			| tail -1); \
		$${py:-python$$v} -m venv .venv-py$$v; \
		.venv-py$$v/bin/pip install --quiet --upgrade pip; \
		.venv-py$$v/bin/pip install --quiet -e '.[$(OTHER_EXTRAS)]' $(OTHER_DEV); \
		echo "== Python $$v"; \
		.venv-py$$v/bin/python -m pytest -q -p no:cacheprovider \
			--ignore=tests/test_dashboard_browser.py \
			--ignore=tests/test_providers_embeddings.py \
			--ignore=tests/test_providers_embeddings_batching.py \
			-k 'not Feedback_RateLimit'; \
	done

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
