"""Remember the sha256 of model files already hashed, so reloading a model does not hash it again.

The flavor checks the sha256 of every file of a model before it hands the model out: a truncated
download or an edited weight file must never serve. Hashing costs about as much as loading the
weights (sha256 runs near 1.5 GB/s on one core, ``from_pretrained`` near 2.5 GB/s), so the hash of
each file is remembered against the file's identity and change stamps: device, inode, size,
``mtime_ns`` and ``ctime_ns``. Any write to a file moves its ctime, which no user-space call can set
back, so a remembered hash never vouches for bytes that changed. Files whose stamps are younger than
``_SETTLE_S`` are hashed but not remembered: a write in the same clock tick as the hash would leave the
stamps unchanged (the "racily clean" case git guards the same way). A fresh download has new inodes
and is always hashed; so is everything on Windows, where ``st_ctime`` is the creation time.

The record is ``$SMOLORA_CACHE/verified-files.json`` (default ``~/.cache/smolora_mlflow``, mode 0600),
written atomically; two processes racing only lose an entry, never corrupt one. It is as trustworthy as
that folder: someone who can write it could vouch for altered files, but someone who can write a
model's folder can already rewrite the hashes in its ``MLmodel``. ``SMOLORA_VERIFY_CACHE=0`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from smolora_mlflow.modelio import cache_root, file_sha256

logger = logging.getLogger(__name__)

_FILE_NAME = "verified-files.json"
_SETTLE_S = 2.0
_MAX_ENTRIES = 4096
_lock = threading.Lock()
_memory: dict[Path, dict[str, list]] = {}  # record file -> {key: [size, mtime_ns, ctime_ns, sha256]}


def enabled() -> bool:
    return os.name != "nt" and os.environ.get("SMOLORA_VERIFY_CACHE", "1").strip().lower() not in ("0", "false", "no")


def _record_path() -> Path:
    return cache_root() / _FILE_NAME


def _read(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entries() -> dict[str, list]:
    path = _record_path()
    if path not in _memory:
        _memory[path] = _read(path)
    return _memory[path]


def _save(key: str, entry: list) -> None:
    """Merge one entry into the record on disk (re-read first, so other processes' entries survive)."""
    path = _record_path()
    on_disk = _read(path)
    on_disk.pop(key, None)
    on_disk[key] = entry
    while len(on_disk) > _MAX_ENTRIES:
        on_disk.pop(next(iter(on_disk)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verified-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(on_disk, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only home must not stop a model from loading
        logger.debug("could not record verified hashes in %s: %s", path, e)


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256: remembered when its identity and stamps are unchanged, else computed."""
    p = Path(path)
    if not enabled():
        return file_sha256(p)
    st = os.stat(p)
    key = f"{st.st_dev}:{st.st_ino}:{p.resolve()}"
    stamps = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    with _lock:
        known = _entries().get(key)
    if known is not None and known[:3] == stamps:
        return known[3]
    started_ns = time.time_ns()
    digest = file_sha256(p)
    settled = started_ns - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_S * 1e9
    if settled and _unchanged(p, stamps):  # not written to while it was being hashed
        entry = [*stamps, digest]
        with _lock:
            _entries()[key] = entry
            _save(key, entry)
    return digest


def _unchanged(path: Path, stamps: list) -> bool:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns] == stamps
