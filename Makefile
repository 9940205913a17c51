# The two set-up commands: `make serve` and `make test`. Both create or update .venv first.
PYTHON ?= python3
# torch is pinned here, in the install path, not in pyproject.toml: the CPU build on a dev box or CI,
# while the Neuron SDK brings its own torch on inf2 (`make install TORCH_SPEC=` keeps it).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test bench-engine bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)')
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# TGI's PORT moves the API, as in the container (scripts/container_start.sh): `serve run` takes the port from
# its config only, so it runs a copy of serve_config.yaml on that port. Without PORT, Serve's 8000.
serve: install
ifdef PORT
	$(BIN)/python -m deployments.http_port '$(PORT)' serve_config.yaml > $(VENV)/serve_config.port.yaml
	$(BIN)/serve run $(VENV)/serve_config.port.yaml
else
	$(BIN)/serve run serve_config.yaml
endif

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-engine: install
	$(BIN)/python scripts/bench_engine.py

# Engine alone vs `serve run serve_config.yaml` vs `transformers serve`, same model and load (a few minutes).
bench: install
	$(BIN)/python scripts/bench.py --side-by-side

clean:
	rm -rf $(VENV) .pytest_cache
