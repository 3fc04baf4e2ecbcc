"""Reuse of the large host buffers that outputs and gradients are written to.

A large numpy array lives in memory the OS maps afresh for every allocation (glibc serves
allocations of 32 MiB and more, and numpy's 2 MiB-page advice, from new mappings), so each call
that returns one pays a page fault per page before the kernel writes a byte: on the test machine
that was 30 of the 70 ms of a box-head forward (a 100 MB output), and a fresh 2 MiB page at times
took 1.5 ms to map. Arena allocators (onnxruntime's, PyTorch's CUDA cache) keep freed blocks
for the next call; this module does the same for our host outputs.

An output is a view of a block held here; when the caller drops the last reference to it, the
block comes back to the cache, still mapped, and the next call of that size reuses it. A caller
who keeps the output keeps the block: nothing is ever handed out twice. At most
512 MiB of idle blocks are kept (the oldest are freed first); set it with
``set_output_cache`` or the ``ROIALIGN_CY_CACHE_BYTES`` environment variable (0 turns the cache
off: every output is a plain ``numpy.empty``/``numpy.zeros``).
"""
import os
import threading
from typing import Dict

import numpy as np

# blocks smaller than this come from malloc's heap, already mapped: nothing to gain
MIN_BYTES = 4 << 20
# a block is reused for a request of at least this fraction of its size (else it is too wasteful)
FIT = 0.8
DEFAULT_CACHE_BYTES = 512 << 20
ALIGN = 64


def _from_environment():
    value = os.environ.get("ROIALIGN_CY_CACHE_BYTES", "")
    if not value.strip():
        return DEFAULT_CACHE_BYTES
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"ROIALIGN_CY_CACHE_BYTES must be a whole number of bytes, "
                         f"got {value!r}") from None
    if n < 0:
        raise ValueError(f"ROIALIGN_CY_CACHE_BYTES must be >= 0, got {n}")
    return n


class _Cache:
    """Idle blocks (uint8 numpy arrays), oldest first, and their total size."""

    def __init__(self, limit):
        self.limit = limit
        self.idle = []
        self.idle_bytes = 0
        self.lock = threading.Lock()

    def take(self, nbytes):
        with self.lock:
            best = None
            for i, block in enumerate(self.idle):
                if nbytes <= block.nbytes - ALIGN and nbytes >= FIT * block.nbytes and (
                        best is None or block.nbytes < self.idle[best].nbytes):
                    best = i
            if best is None:
                return None
            block = self.idle.pop(best)
            self.idle_bytes -= block.nbytes
            return block

    def give(self, block):
        # called from a finaliser, which may run inside take() on the same thread (a garbage
        # collection): never wait for the lock, drop the block instead
        if not self.lock.acquire(blocking=False):
            return
        try:
            if block.nbytes > self.limit:
                return
            self.idle.append(block)
            self.idle_bytes += block.nbytes
            self.trim()
        finally:
            self.lock.release()

    def trim(self):
        """Free the oldest idle blocks past the limit (the lock held)."""
        while self.idle_bytes > self.limit:
            self.idle_bytes -= self.idle.pop(0).nbytes


_cache = _Cache(_from_environment())


def _after_fork_in_child():
    # a lock that another thread of the parent held at fork() stays locked in the child, whose
    # first large output would then wait forever: the child starts with a fresh one
    _cache.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Lease:
    """The owner of an output's memory: numpy keeps it as the array's base, and its finaliser
    gives the block back when the array (and every view of it) is gone."""

    __slots__ = ("block", "__array_interface__")

    def __init__(self, block, offset, shape, dtype):
        self.block = block
        self.__array_interface__ = {
            "version": 3, "shape": tuple(shape), "typestr": dtype.str,
            "data": (block.ctypes.data + offset, False),
        }

    def __del__(self):
        try:
            _cache.give(self.block)
        except Exception:  # interpreter shutdown: module globals may be gone
            pass


def host_array(shape, dtype, zeros=False):
    """A C-contiguous numpy array of ``shape`` and ``dtype`` (zero-filled if ``zeros``): a view of
    a cached block when one fits, else of a new one that comes back to the cache when the array
    is dropped; a plain numpy array when small or when the cache is off."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= int(n)
    if nbytes < MIN_BYTES or nbytes + ALIGN > _cache.limit:
        return _fresh(shape, dtype, zeros)
    block = _cache.take(nbytes)
    reused = block is not None
    if not reused:
        block = _fresh(nbytes + ALIGN, np.uint8, zeros)
    offset = -block.ctypes.data % ALIGN
    if reused and zeros:  # only the span the array covers (a block may be up to 1 / FIT larger)
        zero(block[offset:offset + nbytes])
    return np.asarray(_Lease(block, offset, shape, dtype))


def zero(a):
    """Zero-fill a C-contiguous array in place: a large one by the threads, each a contiguous
    share (several threads fill memory faster than one)."""
    if a.nbytes < MIN_BYTES:
        a.fill(0)
        return
    from ._cpu import _openmp, effective_n_threads

    _openmp.zero_fill(a.reshape(-1).view(np.uint8), effective_n_threads())


def _fresh(shape, dtype, zeros):
    """A new numpy array; a large zero-filled one has its pages mapped in order, a contiguous
    share per thread, before the kernels' threads touch them in scattered order: their page
    faults contend in the kernel (measured: a 60 MB gradient took 46 ms to fill on 2 threads
    against 22 ms when already mapped; faulting 124 MB in first took 10 ms on 2 threads, 15 ms on
    one)."""
    a = (np.zeros if zeros else np.empty)(shape, dtype)
    if zeros and a.nbytes >= MIN_BYTES:
        from ._cpu import _openmp, effective_n_threads

        _openmp.touch_pages(a.reshape(-1).view(np.uint8), 4096, effective_n_threads())
    return a


def output_cache() -> Dict[str, int]:
    """The output block cache: ``{"max_bytes": the most idle bytes kept, "idle_bytes": held now,
    "idle_blocks": how many}``."""
    with _cache.lock:
        return {"max_bytes": _cache.limit, "idle_bytes": _cache.idle_bytes,
                "idle_blocks": len(_cache.idle)}


def set_output_cache(max_bytes: int) -> int:
    """Keep at most ``max_bytes`` of idle output blocks for reuse by later calls (0: keep none,
    and free those held now; default 512 MiB, or ``ROIALIGN_CY_CACHE_BYTES``). Returns the previous
    limit. Outputs still referenced are never affected."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
        raise TypeError(f"max_bytes must be an int number of bytes, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    with _cache.lock:
        previous = _cache.limit
        _cache.limit = int(max_bytes)
        _cache.trim()
    return previous
