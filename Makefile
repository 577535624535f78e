# The two commands of the quick start are `make demo` and `make test`; each
# does its own set-up (virtualenv, install, the cached Kubernetes build).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test unit lint crds binaries cluster-up cluster-down image e2e-kind clean

$(BIN)/gpucluster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,nvml,sim]'
	touch $@

binaries:
	hack/build-binaries.sh
	hack/build-kubelet.sh >/dev/null
	hack/build-kueue.sh >/dev/null
	hack/realnode/build-binaries.sh >/dev/null
	hack/build-karpenter.sh >/dev/null

demo: $(BIN)/gpucluster binaries
	hack/demo.sh

test: $(BIN)/gpucluster binaries lint
	$(BIN)/pytest

unit: $(BIN)/gpucluster
	$(BIN)/pytest tests/unit

lint: $(BIN)/gpucluster binaries
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy
	$(BIN)/python -m gpucluster.api.crdgen --check
	$(BIN)/hadolint Dockerfile
	"$$(bash -c 'source hack/lib.sh; echo $$BIN_DIR')/helm" lint --strict helm/gpucluster
	if command -v promtool >/dev/null; then promtool check rules deploy/prometheus/rules.yaml; \
	else echo "promtool not installed (Debian: apt-get install prometheus); rules not checked"; fi

crds: $(BIN)/gpucluster
	$(BIN)/python -m gpucluster.api.crdgen
	cp crds/*.yaml helm/gpucluster/crds/

cluster-up: binaries
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

image:
	docker build -t gpucluster:dev .

e2e-kind:
	hack/kind-e2e.sh

clean: cluster-down
	rm -rf $(VENV) .local-cluster
