"""Bound the memory oneDNN keeps for bf16 matmul kernels on CPU.

oneDNN builds (JIT-compiles) a bf16 matmul kernel for every new shape and keeps it in a cache of
1,024 kernels by default, about 1 MB each. A training step whose batch length changes every step
(packed rows, length-grouped pairs) brings a dozen new shapes, so a CPU bf16 run's resident memory
grew with the number of distinct batch lengths it had seen. Measured (BENCHMARKS.md, memory) on
`make demo` forced to bf16: peak RSS 3,463 MB uncapped, 2,883 MB capped at 128 kernels (7% more
time, one run each); on GPT-2 124M, 60 steps: 4,691 against 4,105 MB (3% more time). Evicted
kernels are rebuilt when their shape returns, which for lengths that change every step is what
happens anyway.

(A fixed glibc mmap threshold, tried before this, cut the same demo's peak by 20% but cost 1.98x
its time in page faults.)
"""

from __future__ import annotations

import os

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_KERNELS = 128


def cap_kernel_cache() -> None:
    """Cap oneDNN's kernel cache at :data:`ONEDNN_CACHE_KERNELS` for this process, unless the
    user set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``. oneDNN reads the setting once, on its first
    use: call this before the process's first bf16 matmul (no effect after it)."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_KERNELS))
