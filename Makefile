# Two commands do all set-up on a Linux machine with Docker running:
#   make demo   venv + packages, the CPU sandbox image, tiny-stdlib data, one experiment, a report
#   make test   the whole test suite (real Docker engine, real MCP client over stdio, real git)
PY      := .venv/bin/python
CLI     := .venv/bin/autoresearch-mcp
LAB     ?= .labs/demo
# torch is pinned to the CPU build: an unpinned torch pulls several GB of CUDA.
TORCH   ?= torch==2.13.0

.PHONY: demo test image venv

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e '.[trainer,dev]'
	touch $@

image: venv
	$(CLI) build-image --flavor cpu

demo: image
	$(CLI) prepare tiny-stdlib --lab $(LAB)
	$(CLI) run --lab $(LAB) --agent demo --description "baseline"
	$(CLI) report --lab $(LAB)

test: image
	$(PY) -m pytest
