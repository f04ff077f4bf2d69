"""Reuse of activation buffers between the ops of a graph run.

A conv of ResNet-20 on a 64-image chunk writes a new 3 MB activation; taken fresh from the
system each time, every such array is new pages (page faults, zeroed by the kernel, cold in
cache).  On a 2-core AMD EPYC Zen 3 that cost about a fifth of the whole forward pass (measured
with glibc's ``MALLOC_MMAP_THRESHOLD_`` raised, which keeps freed memory in the heap: 18-22 %
faster).  The executor instead runs each chunk with an :class:`Arena`: the convs take their
output arrays from it (:func:`empty`), and when the executor drops a tensor after its last
reader, the array goes back to the arena for the next conv of that shape.

An array is only taken back when it came from this arena, is not referenced by another live
tensor (e.g. an ``Identity`` or an in-place ``Relu`` that returned the same memory), and it is
never handed to the caller: the executor copies arena memory out of the outputs it returns.
Each thread has its own arena (the batch-split workers run whole chunks in parallel).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np

#: largest number of bytes an arena keeps in free arrays (beyond it, dropped arrays are freed)
MAX_FREE_BYTES = 256 << 20


class Arena:
    """Free float32 arrays by shape, and the arrays handed out that may come back.

    Examples
    --------
    >>> a = Arena()
    >>> x = a.empty((2, 3))
    >>> a.release(x, live=[])
    True
    >>> a.empty((2, 3)) is x                    # the same memory, taken again
    True
    """

    def __init__(self, max_free_bytes: int = MAX_FREE_BYTES):
        self.max_free_bytes = int(max_free_bytes)
        self.free: dict[tuple, list] = {}
        self.free_bytes = 0
        self._out = weakref.WeakValueDictionary()        # id -> array handed out, while it lives

    def empty(self, shape) -> np.ndarray:
        """A C-contiguous float32 array of ``shape`` (contents undefined), reused when possible."""
        shape = tuple(int(s) for s in shape)
        stack = self.free.get(shape)
        if stack:
            a = stack.pop()
            self.free_bytes -= a.nbytes
        else:
            a = np.empty(shape, np.float32)
        self._out[id(a)] = a
        return a

    def owner(self, x: np.ndarray):
        """The arena array whose memory ``x`` is (itself or a view of it), or None."""
        base = x if x.base is None else x.base
        return base if self._out.get(id(base)) is base else None

    def release(self, x: np.ndarray, live) -> bool:
        """Take back the memory of ``x`` (a dropped tensor) unless an array in ``live`` shares it;
        returns whether it was taken."""
        base = self.owner(x)
        if base is None:
            return False
        for v in live:
            if isinstance(v, np.ndarray) and (v is base or v.base is base):
                return False
        if self.free_bytes + base.nbytes > self.max_free_bytes:
            del self._out[id(base)]
            return False
        del self._out[id(base)]
        self.free.setdefault(base.shape, []).append(base)
        self.free_bytes += base.nbytes
        return True


_CURRENT = threading.local()


@contextlib.contextmanager
def use(arena: Arena):
    """Within this block, on the calling thread, :func:`empty` takes arrays from ``arena``."""
    before = getattr(_CURRENT, "arena", None)
    _CURRENT.arena = arena
    try:
        yield arena
    finally:
        _CURRENT.arena = before


def empty(shape) -> np.ndarray:
    """``np.empty(shape, float32)``, from the calling thread's current arena if there is one."""
    arena = getattr(_CURRENT, "arena", None)
    return np.empty(shape, np.float32) if arena is None else arena.empty(shape)


_THREAD_ARENA = threading.local()


def thread_arena() -> Arena:
    """The calling thread's own arena (kept between runs, so that its arrays are reused)."""
    a = getattr(_THREAD_ARENA, "arena", None)
    if a is None:
        a = _THREAD_ARENA.arena = Arena()
    return a
