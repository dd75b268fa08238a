"""CPU memory: let glibc's malloc keep freed activations for reuse instead of unmapping them.

glibc serves a request above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB)
with a fresh ``mmap`` and unmaps it again on ``free``; it also trims the heap's free top beyond
a trim threshold. A CPU training step allocates and frees its activations, several MiB to
hundreds of MiB each, at every step, so every step faults their pages in again and the kernel
zeroes them: on the 2-core development machine that was a sixth to a fifth of a one-thread
step's CPU time (``sys``), and an evaluation pass over 10,000 images in batches of 1,000 took 2.9
times as long as with the thresholds raised (``bench/bench_allocator.py``,
``docs/performance.md``). PyTorch's CPU tuning guide gives the same cause for its advice to
preload jemalloc or tcmalloc.

:func:`tune_malloc` raises both thresholds to 1 GiB in this process, through ``mallopt``. The
price: up to that much freed memory stays in the process (its resident size stays near its
peak) rather than going back to the system. The command line (``lightning fit ...``) calls it
at start; set ``MARGINBOOST_MALLOC_TUNING=0`` to keep glibc's defaults. Nothing is changed when
the process does not use glibc, when ``LD_PRELOAD`` brings another allocator, or when the user
set glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``: those choices win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

from .errors import ConfigError

ENV_VAR = "MARGINBOOST_MALLOC_TUNING"
THRESHOLD = 1 << 30
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_tuned = False


def malloc_tuning_skip_reason(environ: dict[str, str] | None = None) -> str | None:
    """Why :func:`tune_malloc` leaves the allocator alone here, or ``None`` when it tunes it.

    Raises:
        ConfigError: ``MARGINBOOST_MALLOC_TUNING`` is set to something other than ``0`` or ``1``.
    """
    env = os.environ if environ is None else environ
    switch = env.get(ENV_VAR, "1").strip()
    if switch not in ("0", "1"):
        raise ConfigError(ENV_VAR, switch, "0 (keep glibc's defaults) or 1 (default: tune)")
    if switch == "0":
        return f"{ENV_VAR}=0"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in OTHER_ALLOCATORS):
        return "LD_PRELOAD brings another allocator"
    given = [name for name in GLIBC_ENV_VARS if name in env]
    if given:
        return f"{given[0]} is set"
    return None


def tune_malloc(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes in this process.

    Returns whether they are raised (also by an earlier call); see the module's docstring for
    when it leaves them alone. Process-wide and not undone: meant for the program's entry point.

    Example:
        >>> from marginboost import tune_malloc
        >>> tuned = tune_malloc()  # True on Linux with glibc unless switched off
    """
    global _tuned
    skip = malloc_tuning_skip_reason()  # first: a bad switch is an error also on a second call
    if _tuned:
        return True
    if skip is not None:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # both or nothing: a raised mmap threshold with the default trim threshold would still trim
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1 or libc.mallopt(M_TRIM_THRESHOLD, threshold) != 1:
        return False
    _tuned = True
    return True
