"""The prepared store: written once, resumed after a kill, refused when tampered with."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pchmr.core.kit.store import (
    ChecksumMismatchError,
    ChunkSpec,
    IncompleteStoreError,
    PreparedStore,
    file_sha256,
    prepare_store,
)

N, CHUNK = 10, 3
CHUNKED = {"images": ChunkSpec((4, 4, 3), "uint8")}


def expected_images(start: int, stop: int) -> np.ndarray:
    idx = np.arange(start, stop, dtype=np.uint8)
    return np.broadcast_to(idx[:, None, None, None], (stop - start, 4, 4, 3)).copy()


def arrays() -> dict:
    return {"value": np.arange(N, dtype=np.float32) * 0.5, "label": np.array([f"s{i}" for i in range(N)])}


class Producer:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail_at = fail_at

    def __call__(self, start: int, stop: int) -> dict:
        if self.fail_at is not None and start >= self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((start, stop))
        return {"images": expected_images(start, stop)}


def build(directory: Path, producer: Producer) -> PreparedStore:
    return prepare_store(
        directory,
        num_samples=N,
        arrays=arrays(),
        chunked=CHUNKED,
        produce=producer,
        chunk_size=CHUNK,
        info={"what": "test"},
    )


def test_store_round_trip_and_second_call_produces_nothing(tmp_path):
    producer = Producer()
    store = build(tmp_path / "s", producer)
    assert producer.calls == [(0, 3), (3, 6), (6, 9), (9, 10)]
    np.testing.assert_array_equal(store.chunked("images"), expected_images(0, N))
    np.testing.assert_array_equal(store.arrays["value"], np.arange(N) * 0.5)
    assert store.arrays["label"][7] == "s7" and store.info == {"what": "test"}
    again = Producer()
    build(tmp_path / "s", again)
    assert again.calls == []
    store.verify()


def test_interrupted_preparation_resumes_from_the_finished_chunks(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", Producer(fail_at=6))
    with pytest.raises(IncompleteStoreError, match="interrupted.*resume"):
        PreparedStore(tmp_path / "s")
    resumed = Producer()
    store = build(tmp_path / "s", resumed)
    assert resumed.calls == [(6, 9), (9, 10)]
    np.testing.assert_array_equal(store.chunked("images"), expected_images(0, N))


def test_a_damaged_finished_chunk_is_redone_on_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", Producer(fail_at=6))
    images = np.load(tmp_path / "s" / "images.npy", mmap_mode="r+")
    images[4] = 255  # inside chunk 1 (samples 3..5), already recorded as done
    images.flush()
    del images
    resumed = Producer()
    store = build(tmp_path / "s", resumed)
    assert resumed.calls == [(3, 6), (6, 9), (9, 10)]
    np.testing.assert_array_equal(store.chunked("images"), expected_images(0, N))


_KILLED_WRITER = """
import sys, time
import numpy as np
from pchmr.core.kit.store import ChunkSpec, prepare_store
def produce(start, stop):
    time.sleep(0.3)
    idx = np.arange(start, stop, dtype=np.uint8)
    return {"images": np.broadcast_to(idx[:, None, None, None], (stop - start, 4, 4, 3)).copy()}
prepare_store(sys.argv[1], num_samples=10, arrays={"value": np.arange(10, dtype=np.float32) * 0.5,
              "label": np.array([f"s{i}" for i in range(10)])}, chunked={"images": ChunkSpec((4, 4, 3), "uint8")},
              produce=produce, chunk_size=3, info={"what": "test"})
"""


def test_a_killed_process_leaves_a_store_that_resumes(tmp_path):
    directory = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(directory)])
    state = directory / "state.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["chunks"]:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads(state.read_text())["chunks"])
    assert 1 <= done < 4 and not (directory / "manifest.json").exists()
    resumed = Producer()
    store = build(directory, resumed)
    assert resumed.calls == [(s, min(s + CHUNK, N)) for s in range(CHUNK * done, N, CHUNK)]  # finished ones kept
    np.testing.assert_array_equal(store.chunked("images"), expected_images(0, N))


def test_tampered_arrays_and_chunks_fail_their_checksums(tmp_path):
    build(tmp_path / "s", Producer())
    values = tmp_path / "s" / "arrays" / "value.npy"
    np.save(values, np.arange(N, dtype=np.float32))
    with pytest.raises(ChecksumMismatchError, match=r"value\.npy.*SHA-256.*manifest expects"):
        PreparedStore(tmp_path / "s")
    build(tmp_path / "t", Producer())
    images = np.load(tmp_path / "t" / "images.npy", mmap_mode="r+")
    images[9] = 7
    images.flush()
    del images
    store = PreparedStore(tmp_path / "t")  # small arrays are fine
    with pytest.raises(ChecksumMismatchError, match=r"images\.npy: samples 9\.\.9"):
        store.verify()


def test_file_checksum_is_sha256_and_cached_by_size_and_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(path, tmp_path / "cache") == digest
    cache = json.loads((tmp_path / "cache" / "checksums.json").read_text())
    assert cache[str(path.resolve())]["sha256"] == digest
    path.write_bytes(b"abd" * 1000)
    assert file_sha256(path, tmp_path / "cache") == hashlib.sha256(b"abd" * 1000).hexdigest()
    with pytest.raises(FileNotFoundError, match="file not found"):
        file_sha256(tmp_path / "nope")
