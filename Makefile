# The two commands of the quick start are `make demo` and `make test`; each
# does its own set-up (virtualenv, install, the cached Kubernetes build).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test unit integration lint crds binaries cluster-up cluster-down clean

$(BIN)/gpucluster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,nvml]'
	touch $@

binaries:
	hack/build-binaries.sh

demo: $(BIN)/gpucluster binaries
	hack/demo.sh

test: $(BIN)/gpucluster binaries lint
	$(BIN)/pytest

unit: $(BIN)/gpucluster
	$(BIN)/pytest tests/unit

lint: $(BIN)/gpucluster
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy
	$(BIN)/python -m gpucluster.api.crdgen --check

crds: $(BIN)/gpucluster
	$(BIN)/python -m gpucluster.api.crdgen

cluster-up: binaries
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

clean: cluster-down
	rm -rf $(VENV) .local-cluster
