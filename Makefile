# nezha_zoo -- every target installs what it needs into $(VENV) first.
#   make demo    build a small Electra, save it, load it in PyTorch, TensorFlow and Flax, compare
#   make test    the checks below, then the whole test suite (2 pytest-xdist workers; tests/README.md)
#   make check   `import nezha_zoo` pulls in no framework; no framework-named top-level dir; ruff lint + format
#   make parity  the demo's table with transformers 4.57.6 PyTorch as a reference column
#   make bench   forward-pass speed and one training step of every family and backend beside transformers,
#                and LoRA against full fine-tuning (benchmarks/results/)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.nezha_zoo-installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: one process).  Each test file runs whole on one worker
# (--dist loadfile), so module-scoped models are built once; tests/conftest.py caps each worker's threads
# and orders the files longest first, which --no-loadscope-reorder keeps (tests/README.md).
TEST_WORKERS ?= 2
BENCH_ARGS ?=
FORBIDDEN_TOP := flax tf tensorflow torch pt jax keras conversion

.PHONY: venv demo test check parity bench clean

venv: $(STAMP)

# Reinstall when the dependency declarations change.  torch is pinned to the CPU wheel
# (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c requirements/constraints.txt -e ".[all,test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nezha_zoo.cli.demo

check: $(STAMP)
	@for d in $(FORBIDDEN_TOP); do \
	  if [ -e "$$d" ]; then echo "check: top-level '$$d' would shadow a package; keep backends under nezha_zoo/"; exit 1; fi; \
	done
	$(PY) -m nezha_zoo.tools.check_imports
	$(PY) -m ruff check nezha_zoo tests examples benchmarks
	$(PY) -m ruff format --check nezha_zoo tests examples benchmarks
	@echo "check: ok"

test: check
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

parity: $(STAMP)
	$(PY) -m benchmarks.parity

# BENCH_ARGS="--smoke" for a seconds-long check; see benchmarks/README.md for the other benchmarks.
# TRAIN_ARGS: the training-step benchmark's own (default BENCH_ARGS; it has no --shapes, but --shape).
TRAIN_ARGS ?= $(BENCH_ARGS)
bench: $(STAMP)
	$(PY) -m benchmarks.forward $(BENCH_ARGS)
	$(PY) -m benchmarks.train $(TRAIN_ARGS)
	$(PY) -m benchmarks.train --lora $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
