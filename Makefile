# Two commands set everything up on a fresh machine:
#   make demo   the naive-vs-optimal perplexity table on the embedded default
#   make test   install what the tests need and run them (CPU; GPU tests skip without CUDA)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test lint venv clean

$(VENV)/.installed-test: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	tools/install-torch.sh $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed-test

lint: venv
	$(PY) -m ruff check qwantize_hf tests eval

test: venv lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
