# vae-pipeline: `make demo` runs the whole pipeline on the bundled real digits, `make test` runs the tests.
# Both create .venv and install the project when no virtualenv is active.

SHELL := /bin/bash
ifdef VIRTUAL_ENV
PYTHON := $(VIRTUAL_ENV)/bin/python
else
PYTHON := $(CURDIR)/.venv/bin/python
endif
OUT ?= out
NPROC ?= 2
DEMO_SECONDS ?= 150
PYTEST_ARGS ?=

.PHONY: install demo test k8s-check constraints clean help

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(PYTHON):
	python3 -m venv .venv

# Everything (every role's extra and the test tools) at the tested versions in constraints.txt.
$(dir $(PYTHON)).vae-installed: pyproject.toml constraints.txt | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet --constraint constraints.txt -e '.[dev]'
	touch $@

install: $(dir $(PYTHON)).vae-installed  ## create .venv (unless one is active) and install the project with [dev]

demo: install  ## shards -> torchrun DDP training -> ONNX -> sample and reconstruction grids
	bash scripts/ensure-fashion-mnist.sh
	OUT=$(OUT) NPROC=$(NPROC) DEMO_SECONDS=$(DEMO_SECONDS) PYTHON=$(PYTHON) bash scripts/demo.sh

test: install  ## run the whole test suite (end-to-end tests included)
	bash scripts/ensure-postgres.sh
	bash scripts/ensure-fashion-mnist.sh
	$(PYTHON) -m pytest $(PYTEST_ARGS)

k8s-check: install  ## validate the Kubernetes manifests and Dockerfiles offline (~40 s)
	$(PYTHON) -m pytest -q tests/test_k8s.py tests/test_docker.py

constraints: install  ## re-pin constraints.txt to the versions installed in the venv (after changing a dependency)
	$(PYTHON) scripts/freeze_constraints.py > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:  ## remove demo outputs
	rm -rf $(OUT)
