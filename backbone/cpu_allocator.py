"""Keep freed tensor memory in the process on Linux CPUs (glibc), instead of handing it back to
the kernel and faulting it in again on the next allocation.

Why: glibc serves allocations above ``M_MMAP_THRESHOLD`` with ``mmap`` and unmaps them on free,
and trims the top of the heap when more than ``M_TRIM_THRESHOLD`` is free. Both thresholds
move on their own as the process frees memory, so whether a 12 MB activation costs a few
thousand page faults (each page zeroed by the kernel) depends on the process's history. A
masked forward allocates partial batches of ever-new sizes: measured on an AMD EPYC with
oneDNN's AVX2 kernels (docs/results.md, "Real skipping on every CPU"), a ResNet-56 forward at
batch 256 took 60,000-110,000 minor page faults per call, ran 1.27-1.4x slower than without
them, and the masked/full time ratio swung from run to run (efficiency 0.63-1.08 for the same
masks). With both thresholds fixed, the same calls take no page faults at all.

:func:`tune_cpu_allocator` fixes them: every allocation comes from the heap (no mmap at all, so
also ImageNet-sized activations above glibc's largest threshold of 32 MiB: a torchvision
ResNet-50 at batch 32 took 225,000 page faults per forward and ran 1.3x slower with them), and
freed memory stays there (the heap is trimmed only above 1 GiB free). It is applied once when
``backbone`` is imported; ``DYNDEPTH_CPU_ALLOCATOR=system`` leaves glibc's defaults alone. The
cost: freed memory stays in the process (its resident size stays near its high-water mark), as
with the caching allocators torch uses on GPUs, so the resident size says little about what a
call needs: :func:`allocated_bytes` (what malloc has handed out and not taken back) does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: Largest mmap threshold glibc accepts on 64-bit (4 MiB · sizeof(long)).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
#: No allocation is served by mmap (M_MMAP_MAX 0), not even those above the largest threshold
#: (ImageNet activations: 100 MB at batch 32), which would be unmapped on free again; the
#: threshold is set too, since setting any of them switches glibc's own adjustments off.
_TUNED = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_MAX, 0))
ENV = "DYNDEPTH_CPU_ALLOCATOR"

_state = {"tuned": False}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); True if they are set.
    A no-op returning False off glibc, or with ``DYNDEPTH_CPU_ALLOCATOR=system``."""
    if os.environ.get(ENV, "tuned") == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in _TUNED)
    _state["tuned"] = ok
    return ok


def allocator_setting() -> str:
    """What the benchmark records: ``tuned`` or ``system``."""
    return "tuned" if _state["tuned"] else "system"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    libc = _glibc()
    function = getattr(libc, "mallinfo2", None) if libc is not None else None  # glibc >= 2.33
    if function is not None:
        function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def allocated_bytes() -> int | None:
    """Bytes malloc has handed out and not yet taken back (glibc's ``mallinfo2``: heap chunks in
    use plus mmapped blocks), whatever the allocator keeps resident; None off glibc >= 2.33.
    Tensors, oneDNN's buffers and NumPy arrays all come from malloc on Linux CPUs."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd
