"""Which llama.cpp build this process runs: the CPU alone, or a GPU backend (CUDA and the GPU
generations it was compiled for), read from llama.cpp itself."""

from __future__ import annotations

import re
from functools import cache


@cache
def describe() -> str:
    """`cpu`, or the GPU backend as llama.cpp names it, e.g. `cuda (sm 75,80,90)`: its ARCHS
    are `__CUDA_ARCH_LIST__`'s values (900 for sm_90)."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    if found := re.search(r"(\w+) : ARCHS = ([\d,]+)", info):
        archs = ",".join(str(int(a) // 10) for a in found.group(2).split(",") if a)
        return f"{found.group(1).lower()} (sm {archs})"
    names = [n for n in re.findall(r"(?:^|\| )(\w+) :", info) if n != "CPU"]
    return names[0].lower() if names else "gpu"


def offloads() -> bool:
    """Whether layers can go to a GPU at all: a CPU-only build cannot."""
    return describe() != "cpu"
