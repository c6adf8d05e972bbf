PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,examples,analytics,dask,cli,parquet]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python example_projects/digits/train.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
