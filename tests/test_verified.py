"""Remembered sha256 of model files: reused only while a file's identity and change stamps are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time

import pytest

from smolora_mlflow.models import hashing
from smolora_mlflow.models import verified as _verified


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private record file; files count as settled at once (the 2 s guard has its own test)."""
    monkeypatch.setenv("SMOLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_verified, "_SETTLE_S", 0.0)
    return tmp_path / "cache" / "verified-files.json"


def _records(record_file) -> dict:
    return json.loads(record_file.read_text())


def test_hash_is_recorded_and_reused_while_the_file_is_unchanged(tmp_path, cache):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    true = hashlib.sha256(f.read_bytes()).hexdigest()
    assert _verified.sha256(f) == true
    (key, entry), = _records(cache).items()
    st = os.stat(f)
    assert key.startswith(f"{st.st_dev}:{st.st_ino}:") and entry == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, true]
    # The record is what answers now: a forged digest under unchanged stamps is returned as is.
    cache.write_text(json.dumps({key: [*entry[:3], "f" * 64]}))
    _verified._memory.clear()
    assert _verified.sha256(f) == "f" * 64


def test_a_rewritten_file_is_hashed_again_even_with_its_old_mtime(tmp_path, cache):
    f = tmp_path / "tokenizer.json"
    f.write_bytes(b'{"a": 1}')
    before = os.stat(f)
    _verified.sha256(f)
    time.sleep(0.05)  # past a coarse timestamp tick (4-10 ms on older kernels), which the 2 s guard covers
    f.write_bytes(b'{"a": 2}')  # same size
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime cannot be
    assert _verified.sha256(f) == hashlib.sha256(b'{"a": 2}').hexdigest()


def test_a_copy_is_hashed_on_its_own(tmp_path, cache):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    _verified.sha256(f)
    g = tmp_path / "b.bin"
    shutil.copy2(f, g)  # same bytes and mtime, new inode
    assert _verified.sha256(g) == hashlib.sha256(b"x" * 100).hexdigest()
    assert len(_records(cache)) == 2


def test_fresh_files_are_not_remembered(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(_verified, "_SETTLE_S", 2.0)
    f = tmp_path / "young.bin"
    f.write_bytes(b"y")
    assert _verified.sha256(f) == hashlib.sha256(b"y").hexdigest()
    assert not cache.exists()


def test_turned_off_by_environment(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("SMOLORA_VERIFY_CACHE", "0")
    f = tmp_path / "z.bin"
    f.write_bytes(b"z")
    assert _verified.sha256(f) == hashlib.sha256(b"z").hexdigest()
    assert not cache.exists()


def test_unreadable_record_is_ignored_and_replaced(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    f = tmp_path / "q.bin"
    f.write_bytes(b"q")
    assert _verified.sha256(f) == hashlib.sha256(b"q").hexdigest()
    assert len(_records(cache)) == 1


def test_tampering_after_a_remembered_load_is_still_refused(tmp_path, cache, demo_model_dir):
    import mlflow
    from mlflow.exceptions import MlflowException

    from smolora_mlflow import flavor

    path = tmp_path / "m"
    flavor.save_model(path, demo_model_dir, pip_requirements=["torch", "transformers"])
    mlflow.pyfunc.load_model(str(path))
    assert any(k.endswith("model.safetensors") for k in _records(cache))
    target = path / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the last tensor, keep size and mtime
    time.sleep(0.05)
    st = os.stat(target)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(MlflowException, match=r"model\.safetensors` does not match the sha256"):
        mlflow.pyfunc.load_model(str(path))


def test_malformed_record_entries_are_ignored(tmp_path, cache):
    f = tmp_path / "r.bin"
    f.write_bytes(b"r")
    _verified.sha256(f)
    (key,) = _records(cache)
    for bad in (5, [1, 2, 3], [1, 2, 3, 4], ["1", 2, 3, "f" * 64]):
        cache.write_text(json.dumps({key: bad}))
        _verified._memory.clear()
        assert _verified.sha256(f) == hashlib.sha256(b"r").hexdigest()


def test_a_file_truncated_while_hashed_gives_a_wrong_hash_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "_BLOCK", 1 << 16)  # many reads, so the truncation lands mid-hash
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(64 << 20))
    full = hashlib.sha256(f.read_bytes()).hexdigest()
    cut = threading.Timer(0.01, lambda: os.truncate(f, 1 << 20))
    cut.start()
    got = hashing.file_sha256(f)
    cut.join()
    assert got != full or os.path.getsize(f) == 1 << 20  # the process is alive; a cut file never matches
