PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The peers (Opacus, BackPACK, Captum, dattri, cleanlab) live in their own environment.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: demo test bench bench-dask bench-transformer bench-peers clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,examples,analytics,dask,cli,parquet,s3]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python example_projects/digits/train.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/capture_overhead.py

bench-dask: $(STAMP)
	$(BIN)/python benchmarks/dask_scale.py

bench-transformer: $(STAMP)
	$(BIN)/python benchmarks/transformer_projection.py

$(PEERS_STAMP): pyproject.toml constraints.txt benchmarks/peers/requirements.txt benchmarks/peers/requirements-nodeps.txt
	$(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -c constraints.txt -e '.[analytics]' pytest hypothesis
	$(PEERS_VENV)/bin/pip install --quiet -c constraints.txt -r benchmarks/peers/requirements.txt
	$(PEERS_VENV)/bin/pip install --quiet --no-deps -r benchmarks/peers/requirements-nodeps.txt
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python benchmarks/peers/capture_cost.py
	$(PEERS_VENV)/bin/python benchmarks/peers/storage.py
	$(PEERS_VENV)/bin/python benchmarks/peers/attribution.py
	$(PEERS_VENV)/bin/python benchmarks/peers/debugging.py
	$(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider benchmarks/peers

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache .hypothesis
