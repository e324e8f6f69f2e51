"""Large byte buffers without the zero-fill.

``bytearray(n)`` writes n zero bytes before the caller writes its own: 46 ms for a
125 MB 3d_fullres model here, more than the copy that follows (6 ms). Weights are
encoded and downloaded into buffers that are then overwritten end to end, so they are
allocated uninitialised (CPython's ``PyByteArray_FromStringAndSize(NULL, n)``).
Such a buffer is hashed as it fills (:class:`SpanHasher`), not in a pass after.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import threading

# Below this, zero-filling costs nothing worth a foreign call.
_SMALL = 1 << 20

try:
    _from_string_and_size = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _from_string_and_size.restype = ctypes.py_object
    _from_string_and_size.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
except (AttributeError, OSError):  # not CPython: zero-filled buffers, same results
    _from_string_and_size = None


def uninitialized_bytearray(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose content is undefined: the caller must
    overwrite all of it, or cut off what it did not write, before anyone reads it."""
    if size < 0:
        raise ValueError(f"negative buffer size {size}")
    if size < _SMALL or _from_string_and_size is None:
        return bytearray(size)
    return _from_string_and_size(None, size)


class SpanHasher:
    """sha256 of spans handed to it in order, computed by its own thread (hashlib drops
    the GIL on large spans): whoever fills the buffer (an encoder, a download) writes
    the next span while this one is hashed. Each span is released once hashed."""

    def __init__(self, name: str) -> None:
        self._digest = hashlib.sha256()
        self._spans: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (span := self._spans.get()) is not None:
            self._digest.update(span)
            span.release()

    def add(self, span: memoryview) -> None:
        """Hash ``span`` next; it must not change until :meth:`finish` returns."""
        self._spans.put(span)

    def finish(self) -> str:
        """Wait for every span handed over; the hex digest of all of them, in order."""
        self._spans.put(None)
        self._thread.join()
        return self._digest.hexdigest()
