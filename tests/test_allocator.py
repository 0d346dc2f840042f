"""oneDNN's bf16 kernel cache is capped for CPU training (dpolab.allocator), unless the user set it."""

import os
import subprocess
import sys

import pytest

from dpolab.allocator import ONEDNN_CACHE_ENV, ONEDNN_CACHE_KERNELS

# 200 bf16 matmuls of new shapes, then the first shape again: oneDNN reports whether that kernel
# came from its cache (ONEDNN_VERBOSE=profile_create prints one "create:cache_hit|miss" line each).
LOOP = f"""
import torch
from dpolab.allocator import cap_kernel_cache
cap_kernel_cache()
w = torch.randn(64, 64, dtype=torch.bfloat16)
for m in [*range(8, 8 + {ONEDNN_CACHE_KERNELS} + 72), 8]:
    torch.randn(m, 64, dtype=torch.bfloat16) @ w
"""


def last_kernel_lookup(user_setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    env["ONEDNN_VERBOSE"] = "profile_create"
    if user_setting is not None:
        env[ONEDNN_CACHE_ENV] = user_setting
    proc = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, check=True, timeout=120,
                          env=env)
    lookups = [line.split(",")[3] for line in (proc.stdout + proc.stderr).splitlines()
               if ",primitive,create:cache_" in line and ",matmul," in line]
    if len(lookups) < ONEDNN_CACHE_KERNELS:
        pytest.skip("bf16 matmuls do not run on oneDNN kernels on this CPU: nothing to cap")
    return lookups[-1]


def test_kernel_cache_keeps_the_last_128_shapes_and_the_users_setting_wins():
    # Capped: 200 newer shapes evicted the first one's kernel, so it is built again.
    assert last_kernel_lookup(None) == "create:cache_miss"
    # The user's own setting is kept: with room for 1,024 kernels the first one is still there.
    assert last_kernel_lookup("1024") == "create:cache_hit"
