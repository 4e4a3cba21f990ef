"""Keep freed tensor memory from piling up in the C allocator (glibc), so a learner's RSS is what it holds.

glibc's malloc serves requests above a threshold with their own ``mmap`` and gives them back on ``free``,
but it *raises* that threshold (up to 32 MB) each time such a block is freed. After the first few steps the
activations of a forward pass (many blocks of 1-13 MB for SmolLM2 at batch 8 x 256 tokens) come from the
heap instead, and the heap keeps what was freed: measured on SmolLM2-135M at the learner's defaults, the
RSS peak of a step was 6.9 GB with 3.6 GB of live activations; with the threshold pinned at 256 KB, 3.8 GB
(1.6 GB with ``activation_checkpointing``), the same losses. ``pin_mmap_threshold`` pins it (``mallopt``,
which also turns the dynamic adjustment off); elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD_BYTES = 256 * 1024


@functools.cache
def pin_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold for this process; True when it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False
