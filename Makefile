# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cachegen-installed

.PHONY: setup run test test-unit model clean-venv

# Reinstall when the dependency list or the install script changes; otherwise skip in milliseconds.
$(STAMP): pyproject.toml deploy/install.sh
	bash deploy/install.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(VENV)/bin/cachegen model prepare

run: setup
	$(VENV)/bin/cachegen serve

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

clean-venv:
	rm -rf $(VENV)

# --- codec kernels (issue 3) ---
NVCC ?= nvcc
CXX ?= g++
KERNEL_FLAGS := -std=c++17 -O3 -Ikernels/include -Ikernels -Ikernels/cuda
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
.PHONY: kernels-check gpu-check

# Compiles every .cu for sm_80 and sm_90 (no GPU needed), then builds and runs the C++ golden-frame test.
kernels-check:
	@mkdir -p build/kernels
	@for f in kernels/cuda/*.cu; do echo "nvcc $$f"; $(NVCC) -c $(KERNEL_FLAGS) $(CUDA_ARCHS) $$f -o build/kernels/$$(basename $$f).o || exit 1; done
	$(CXX) $(KERNEL_FLAGS) -Wall -Wextra -ffp-contract=off -pthread kernels/tests/test_golden.cpp kernels/cpu/frame.cpp kernels/cpu/tables_file.cpp kernels/cpu/codec_cpu.cpp -o build/kernels/test_golden
	build/kernels/test_golden tests/golden

# On a CUDA machine: builds the CUDA library the codec loads, checks GPU == CPU bytes, runs the GPU tests and benchmark.
# The one command for a lent GPU machine: builds the CUDA library, runs the golden and GPU tests, then the GPU codec
# benchmark on real KV. The model cannot travel to such a machine: export its KV first where the model is
# (`make build/bench_kv.safetensors`) and pass GPU_TABLES; PY=python3 uses that machine's own torch.
GPU_KV ?= build/bench_kv.safetensors
GPU_TABLES ?=
gpu-check: kernels-check
	$(PY) setup.py build_ext --inplace -q
	$(NVCC) -shared -Xcompiler -fPIC $(KERNEL_FLAGS) $(CUDA_ARCHS) kernels/cuda/decode.cu -o cachegen/codec/libcachegen_cuda.so
	$(NVCC) $(KERNEL_FLAGS) $(CUDA_ARCHS) kernels/tests/test_cuda_golden.cu kernels/cuda/decode.cu kernels/cpu/frame.cpp kernels/cpu/tables_file.cpp kernels/cpu/codec_cpu.cpp -o build/kernels/test_cuda_golden
	build/kernels/test_cuda_golden tests/golden
	$(PY) -m pytest -m gpu tests/gpu -q -p no:cacheprovider
	$(PY) -m server.cli bench codec-gpu --kv $(GPU_KV) $(if $(GPU_TABLES),--tables $(GPU_TABLES)) --json build/bench_codec_gpu.json

build/bench_kv.safetensors: setup
	$(PY) -m server.cli bench codec-gpu --export $@