# Two commands do all the set-up on a fresh machine:
#   make demo   - create/reuse .venv, install everything, train + evaluate on the synthetic dataset
#   make test   - create/reuse .venv, install everything, run the test suite
# On a GPU machine: make test FAISS=gpu   (the [gpu] extra: faiss-gpu instead of faiss-cpu)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision must be a matched pair (torchvision 0.29 <-> torch 2.14)
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.2
FASTREID ?= fastreid==1.4.0
# faiss as the package's extra: cpu (faiss-cpu) or gpu (faiss-gpu); faiss-cpu / faiss-gpu work too
FAISS ?= cpu
FAISS_EXTRA := $(patsubst faiss-%,%,$(FAISS))
STAMP := $(VENV)/.installed

.PHONY: install demo test docs readme bench chromium cross-domain clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PAIR)
	$(PIP) install -q -e ".[dev,$(FAISS_EXTRA),distributed]"
	$(PIP) install -q --no-deps $(FASTREID)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastreid-train --config-file configs/NFormer/demo.yml

# TransMatcher vs a global-feature baseline vs NFormer, each trained on synthetic domain A and
# tested on domain B (CPU, minutes); prints one table (tools/cross_domain_table.py)
cross-domain: $(STAMP)
	$(PY) tools/cross_domain_table.py

test: $(STAMP) chromium
	$(PY) -m pytest -q tests

# the documentation site (mkdocs.yml): site/, warnings are errors; the references and result
# tables are generated at build time (docs/gen/hooks.py)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# rewrite the README's result tables from results/*.json (tests/test_docs.py checks them)
readme: $(STAMP)
	$(PY) docs/gen/readme.py

# headless Chromium for tests/test_report_page.py (Debian's chromium, with apt-get when missing;
# never fails the build: without it that test skips with a message)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1 && echo "chromium installed"; } || \
	  echo "chromium not installed (no apt-get or not root): the report-page browser test will skip"

bench: $(STAMP)
	$(PY) benchmarks/bench_rerank.py
	$(PY) benchmarks/bench_nformer_memory.py
	$(PY) benchmarks/bench_backbones.py
	$(PY) benchmarks/bench_nformer_gain.py

clean-venv:
	rm -rf $(VENV)
