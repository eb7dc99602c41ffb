# zsbir developer entry points. `make demo` and `make test` each do their own set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch: on this project's machines `pip install torch==2.13.0` takes it from local
# disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
NVCC   ?= nvcc

.PHONY: install demo test test-fast lint kernels bench-search bench-metrics test-gpu bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	# Type stubs only; their declared dependency (the TensorRT wheels) cannot be installed everywhere.
	$(BIN)/python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
	# tritonserver from the nvidia-pytriton wheel (unpacked into ~/.cache/zsbir, not installed: its package pins
	# numpy<2) and the numpy<2 packages its Python models run with; tests/test_triton.py serves on it.
	$(BIN)/python -m zsbir_infer.triton install --optional
	touch $@

demo: install
	$(BIN)/zsbir demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/python .ci/prepare_trt_stubs.py .typings
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

kernels:
	$(MAKE) -C kernels NVCC=$(NVCC)

bench-search: install
	$(BIN)/python benchmarks/bench_search_cpu.py --out benchmarks/results/search_cpu

bench-metrics: install
	$(BIN)/python benchmarks/bench_metrics.py --json benchmarks/results/metrics_cpu.json

# On a GPU machine (see benchmarks/README_gpu.md).
test-gpu: install kernels
	$(BIN)/python -m pytest -q tests/test_gpu_topk.py tests/test_kernels_build.py

bench-gpu: install kernels
	$(BIN)/python benchmarks/bench_topk_gpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	$(MAKE) -C kernels clean
