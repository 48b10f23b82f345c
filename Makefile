# Two commands do all set-up on a Linux machine with Docker running:
#   make demo   venv + packages, the CPU sandbox image, tiny-stdlib data, one experiment, a report
#   make test   the whole test suite (real Docker engine, real MCP client over stdio, real git)
PY      := .venv/bin/python
CLI     := .venv/bin/autoresearch-mcp
LAB     ?= .labs/demo
# torch is pinned to the CPU build (~190 MB): PyPI's torch is the CUDA build (several GB with its
# CUDA packages). It comes from pip's own wheelhouses and indexes when they hold it (CI's machine),
# else from PyTorch's CPU wheel index.
TORCH       ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# test files run side by side in this many processes (pytest-xdist); most of a test's time is spent
# waiting on containers and servers, so more workers than the CI box's 2 cores still pay
TEST_WORKERS ?= 3

.PHONY: demo test image venv

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	@echo "installing $(TORCH) and the project's packages into .venv (a few minutes on a first run)"
	$(PY) -m pip install --progress-bar on "$(TORCH)" 2>/dev/null \
	  || $(PY) -m pip install --progress-bar on --extra-index-url $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install --progress-bar on -e '.[trainer,dev]'
	touch $@

image: venv
	$(CLI) build-image --flavor cpu

demo: image
	$(CLI) prepare tiny-stdlib --lab $(LAB)
	$(CLI) run --lab $(LAB) --agent demo --description "baseline"
	$(CLI) report --lab $(LAB)

test: image
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
