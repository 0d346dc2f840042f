"""Keep the C heap from growing step after step (glibc's malloc, Linux).

glibc serves a large allocation with its own ``mmap`` (returned to the system on free) only above
a threshold, and by default raises that threshold to the size of every such block freed, up to
32 MiB. After the first free of a head chunk's (128, 50,257) logits (26 MB) every tensor up to that
size comes from the heap instead, and a training loop whose batches change shape every step (packed
rows, length-grouped pairs) leaves the heap fragmented: freed space the next shapes do not fit, kept
resident. Measured in `make demo` (benchmarks/memory_profile.py): RSS grew ~15 MB a step, through
SFT, the reference pass and each trial, to 4.4 GB for a 3.4M-parameter model. A fixed threshold of
1 MiB keeps every tensor above it in its own mapping, returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def limit_heap_growth() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (no-op elsewhere); True if set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
