"""sha256 of model files, read in large blocks."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 16 << 20  # bytes read and hashed per call


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file."""
    with open(path, "rb", buffering=0) as f:
        return sha256_of_open_file(f)


def sha256_of_open_file(f) -> str:
    """sha256 of an open binary file from its current position, read in 16 MiB blocks.

    Large blocks keep the GIL free for long stretches (``readinto`` and ``update`` both leave it), so a
    hash in a helper thread really overlaps a model load on the main thread; small reads hand the GIL back
    and forth and serialise the two. Plain reads, not a memory map: a file truncated while it is
    hashed gives a wrong hash (and a clear error), never a SIGBUS that kills the process.
    """
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    with memoryview(buf) as view:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
