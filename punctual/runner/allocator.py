"""Keep glibc's allocator from handing step-sized buffers back to the OS after every step.

A decode step allocates and frees buffers of several MB per layer (gathered K/V, scores). With
glibc's defaults these come from mmap or from a heap top that is trimmed as soon as they are
freed, so the next step page-faults them in again: measured on the SmolLM-135M shape with 16
sequences of 1,104 tokens, every other step took 250 ms instead of 58 ms. Padding the heap top
and raising the trim and mmap thresholds keeps the pages mapped between steps. The memory this
holds is bounded by one step's peak working set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

TOP_PAD_BYTES = 256 << 20  # a decode step's transient buffers on the builtin shape are tens of MB
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for this parameter on 64-bit


def keep_step_buffers_mapped() -> bool:
    """Tune glibc malloc for the step loop (idempotent: the settings are process-wide); False
    where it is not glibc or a setting was refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_TOP_PAD, TOP_PAD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok = all([mallopt(param, value) == 1 for param, value in settings])  # a list: try every setting
    if not ok:
        logger.info("mallopt refused a setting; step buffers may be returned to the OS between steps")
    return ok
