# Everything runs in a project-local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scrutiny-installed

.PHONY: setup demo test lint typecheck unit bench clean

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

typecheck: $(STAMP)
	$(PY) -m mypy

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

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
