"""Remember the sha256 of model files already hashed, so reloading a model does not hash it again.

The flavor checks the sha256 of every file of a model before it hands the model out: a truncated
download or an edited weight file must never serve. Hashing costs about as much as loading the weights
(both read every byte; sha256 on one core is the slower of the two), so the hash of each file is
remembered against the file's identity and change stamps: device, inode, size, ``mtime_ns`` and
``ctime_ns``. On local POSIX filesystems a ``write``, truncate or ``utime`` moves the ctime, which no
user-space call can set back, so a remembered hash does not vouch for bytes rewritten since. Not
covered: writes through a shared writable memory map to pages already dirty, a wall clock set back, and
network or FUSE filesystems with loose ctime semantics; set ``SMOLORA_VERIFY_CACHE=0`` there. Files
whose stamps are younger than ``_SETTLE_S`` are hashed but not remembered: a write in the same clock
tick as the hash would leave the stamps unchanged (the "racily clean" case git guards the same way). A
fresh download has new inodes and is always hashed; so is everything on Windows, where ``st_ctime`` is
the creation time.

The record is ``$SMOLORA_CACHE/verified-files.json`` (default ``~/.cache/smolora_mlflow``, mode 0600),
written atomically; two processes racing only lose an entry, never corrupt one. It is as trustworthy as
that folder: someone who can write it could vouch for altered files, but someone who can write a
model's folder can already rewrite the hashes in its ``MLmodel``. ``SMOLORA_VERIFY_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from smolora_mlflow.models.cache import cache_root
from smolora_mlflow.models.hashing import sha256_of_open_file

logger = logging.getLogger(__name__)

_FILE_NAME = "verified-files.json"
_SETTLE_S = 2.0
_MAX_ENTRIES = 4096
_lock = threading.Lock()
_memory: dict[Path, dict[str, list]] = {}  # record file -> {key: [size, mtime_ns, ctime_ns, sha256]}


def enabled() -> bool:
    """Whether hashes are remembered: not on Windows (ctime is the creation time) nor when turned off."""
    return os.name != "nt" and os.environ.get("SMOLORA_VERIFY_CACHE", "1").strip().lower() not in ("0", "false", "no")


def _record_path() -> Path | None:
    try:
        return cache_root() / _FILE_NAME
    except RuntimeError:  # no home directory to put it in: hash every time
        return None


def _read(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entries(record: Path) -> dict[str, list]:
    if record not in _memory:
        _memory[record] = _read(record)
    return _memory[record]


def _save(record: Path, key: str, entry: list) -> None:
    """Merge one entry into the record on disk (re-read first, so other processes' entries survive)."""
    on_disk = _read(record)
    on_disk.pop(key, None)
    on_disk[key] = entry
    while len(on_disk) > _MAX_ENTRIES:
        on_disk.pop(next(iter(on_disk)))
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".verified-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(on_disk, f)
            os.replace(tmp, record)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only home must not stop a model from loading
        logger.debug("could not record verified hashes in %s: %s", record, e)


def _valid(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, int) for x in entry[:3])
            and isinstance(entry[3], str) and len(entry[3]) == 64)


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256: remembered when its identity and stamps are unchanged, else computed.

    The file is opened once; its identity and stamps come from that descriptor, before and after the
    hash, so a file replaced or written meanwhile is neither answered from nor put in the record.
    """
    p = Path(path)
    record = _record_path() if enabled() else None
    with open(p, "rb", buffering=0) as f:
        if record is None:
            return sha256_of_open_file(f)
        before = os.fstat(f.fileno())
        key = f"{before.st_dev}:{before.st_ino}:{p.resolve()}"
        stamps = [before.st_size, before.st_mtime_ns, before.st_ctime_ns]
        with _lock:
            known = _entries(record).get(key)
        if _valid(known) and known[:3] == stamps:
            return known[3]
        started_ns = time.time_ns()
        digest = sha256_of_open_file(f)
        after = os.fstat(f.fileno())
    settled = started_ns - max(before.st_mtime_ns, before.st_ctime_ns) > _SETTLE_S * 1e9
    unchanged = [after.st_size, after.st_mtime_ns, after.st_ctime_ns] == stamps
    if settled and unchanged:
        entry = [*stamps, digest]
        with _lock:
            _entries(record)[key] = entry
            _save(record, key, entry)
    return digest


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over every ``*.safetensors`` file of a folder, in name order (names are hashed too).

    Each file's hash is remembered against its inode and change stamps (see :func:`sha256`), so a base
    model checked once is not hashed again at every training start or adapter load.
    """
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weight files in `{root}`; only safetensors weights are supported.")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256(f).encode())
    return h.hexdigest()
