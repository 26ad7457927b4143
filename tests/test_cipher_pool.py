"""Encryption and decryption on worker processes: the same results as one process, errors that name the chunk,
and a pipeline that never runs far ahead of whoever consumes it.

One two-worker pool serves the module: spawning workers (each imports TenSEAL) takes about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from lightning_fhe.he.codec import ChunkSum, CiphertextError
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.pool import CipherPool, CipherWorkerError, default_workers

BATCH, WINDOW = 2, 2


@pytest.fixture(scope="module")
def pool2(site_context):
    with CipherPool(site_context, workers=2, batch=BATCH, window=WINDOW) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool1(site_context):
    with CipherPool(site_context, workers=1, batch=BATCH, window=WINDOW) as pool:
        yield pool


@pytest.fixture(scope="module")
def update(site_context):
    """Values over 9 chunks (more than one batch per worker, a partial last chunk) and a site's share."""
    count = 8 * site_context.params.values_per_ciphertext + 1000
    return np.random.default_rng(0).normal(0, 0.1, count), 0.375


@pytest.fixture(scope="module")
def global_chunks(site_context, pool2, update):
    values, share = update
    frames = list(pool2.iter_encrypt(values, share))
    total = ChunkSum.for_context(site_context.without_keys(), len(frames))
    for i, frame in enumerate(frames):
        total.add(i, frame)
    return total.chunks()


def _on_grid(values, share, pool) -> np.ndarray:
    return round_to_grid(values * share, pool.params.grid_bits) / share


def test_two_workers_decrypt_to_the_same_bits_as_one(pool1, pool2, global_chunks, update):
    count = update[0].size
    one, two = pool1.decrypt(global_chunks, count, 0.375), pool2.decrypt(global_chunks, count, 0.375)
    assert one.size == two.size == count and np.array_equal(one, two)


def test_chunks_encrypted_by_either_pool_decrypt_to_the_plaintext_on_the_grid(site_context, pool1, pool2, update):
    values, share = update
    for encrypting in (pool1, pool2):
        frames = list(encrypting.iter_encrypt(values, share))
        assert len(frames) == 9
        total = ChunkSum.for_context(site_context, len(frames))
        for i, frame in enumerate(frames):
            total.add(i, frame)
        for decrypting in (pool1, pool2):
            decrypted = decrypting.decrypt(total.chunks(), values.size, share)
            assert np.array_equal(decrypted, _on_grid(values, share, decrypting))


def test_encryption_checks_the_update_before_the_first_chunk(pool2):
    with pytest.raises(ValueError, match="finite"):
        pool2.iter_encrypt(np.array([0.0, np.nan]))  # raises on the call, not on the first next()
    with pytest.raises(ValueError, match="weight_fraction"):
        pool2.iter_encrypt(np.zeros(4), 1.5)


@pytest.mark.parametrize("bad", [0, 3, 8])  # first batch, inside a batch, the last (partial) batch
@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupted_global_chunk_is_named_by_its_position(pool1, pool2, global_chunks, bad, workers):
    pool = pool1 if workers == 1 else pool2
    frames = list(global_chunks)
    corrupted = bytearray(frames[bad])
    corrupted[len(corrupted) // 2] ^= 0x10
    frames[bad] = bytes(corrupted)
    with pytest.raises(CiphertextError, match=f"^chunk {bad}: .*checksum") as caught:
        pool.decrypt(frames, count=9 * pool.params.values_per_ciphertext, total_weight_fraction=1.0)
    assert caught.value.reason == "corrupt"


def test_the_pool_still_works_after_an_error(pool2, global_chunks, update):
    frames = list(global_chunks)
    frames[1] = frames[1][:-1]
    with pytest.raises(CiphertextError, match="^chunk 1: "):
        pool2.decrypt(frames, len(frames) * pool2.params.values_per_ciphertext)
    values, share = update
    assert np.array_equal(pool2.decrypt(global_chunks, values.size, share), _on_grid(values, share, pool2))


def test_a_wrong_number_of_chunks_is_refused(pool2, global_chunks, update):
    values, _ = update
    with pytest.raises(CiphertextError, match="got 8") as caught:
        pool2.decrypt(global_chunks[:-1], values.size)
    assert caught.value.reason == "index"
    with pytest.raises(CiphertextError, match="got more"):
        pool2.decrypt(global_chunks + global_chunks[:1], values.size)


@pytest.mark.parametrize("workers", [1, 2])
def test_decryption_runs_at_most_window_times_workers_batches_ahead(pool1, pool2, global_chunks, workers):
    pool = pool1 if workers == 1 else pool2
    frames = global_chunks * 2  # 18 chunks: more than the window holds
    per_chunk = pool.params.values_per_ciphertext
    written = []  # (start, values) of each write: a batch of chunks at a time
    decryption = pool.decryption(len(frames) * per_chunk, 1.0, lambda at, values: written.append((at, values.size)))
    ahead = []  # after each chunk added: chunks added and not yet written
    for added, frame in enumerate(frames, 1):
        decryption.add(frame)
        ahead.append(added - sum(size for _, size in written) // per_chunk)
    decryption.finish()
    batches = range(0, len(frames), BATCH)
    assert written == [(i * per_chunk, min(BATCH, len(frames) - i) * per_chunk) for i in batches]  # all, in order
    if workers == 1:
        assert max(ahead) == BATCH - 1  # decrypted as soon as its batch is complete
    else:
        # Pipelined (so it overlaps), never beyond the window's batches in flight and the one being filled.
        assert BATCH < max(ahead) < (WINDOW * workers + 1) * BATCH


def test_by_default_no_more_workers_start_than_an_update_has_tasks():
    cores = len(os.sched_getaffinity(0))
    assert default_workers() == cores
    assert default_workers(chunks=0) == 1  # nothing encrypted: no process to start
    assert default_workers(chunks=1) == default_workers(chunks=16) == 1  # one task
    assert default_workers(chunks=17) == min(cores, 2)
    assert default_workers(chunks=10**6) == cores
    assert default_workers(chunks=17, batch=4) == min(cores, 5)


def test_bad_settings_are_refused(site_context):
    for kwargs in ({"workers": 0}, {"batch": 0}, {"window": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            CipherPool(site_context, **kwargs)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_chunk_with_another_number_of_seeds_than_the_header_names_is_refused(pool1, pool2, global_chunks, workers):
    """A server that drops or adds a participant's seed would make the site decrypt garbage: the count is checked."""
    pool = pool1 if workers == 1 else pool2
    per_chunk = pool.params.values_per_ciphertext
    decryption = pool.decryption(len(global_chunks) * per_chunk, 1.0, lambda start, values: None, participants=2)
    with pytest.raises(CiphertextError, match="^chunk 0: .*the sum of 2 participants") as caught:
        for frame in global_chunks:  # each lists 1 seed
            decryption.add(frame)
        decryption.finish()
    assert caught.value.reason == "size"


def _shared_memory_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_every_operation_gives_its_shared_memory_back(site_context, global_chunks, update):
    """Finished, abandoned midway, or failed: an operation's block goes back, kept for the next operation of its kind
    or unlinked, and closing the pool unlinks the kept ones, so a long fit never grows."""
    before = _shared_memory_files()
    values, share = update
    with CipherPool(site_context, workers=2, batch=BATCH, window=WINDOW) as pool:
        list(pool.iter_encrypt(values, share))
        abandoned = pool.iter_encrypt(values, share)
        next(abandoned)
        abandoned.close()  # an upload that stopped reading
        frames = list(global_chunks)
        frames[4] = frames[4][:-1]
        with pytest.raises(CiphertextError):
            pool.decrypt(frames, values.size, share)
        stopped = pool.decryption(values.size, share, lambda start, values: None)
        for frame in global_chunks[:5]:
            stopped.add(frame)
        stopped.close()  # a download that broke off
        pool.decrypt(global_chunks, values.size, share)
        assert not pool._blocks
        kept = {name for name in _shared_memory_files() - before if name.startswith("psm_")}  # not the pipes' locks
        assert len(kept) <= 2  # an upload's block and a download's, for the next ones
    assert _shared_memory_files() <= before


def test_an_operation_reuses_the_block_of_one_that_finished_not_of_one_abandoned_midway(pool2, update):
    """Reused, a block costs no fresh pages; but an upload abandoned with batches in flight may still be written to by
    a worker, so its block is unlinked instead."""
    values, share = update
    list(pool2.iter_encrypt(values, share))
    kept = {block.name for block in pool2._spare.values()}
    list(pool2.iter_encrypt(values, share))
    assert {block.name for block in pool2._spare.values()} == kept
    abandoned = pool2.iter_encrypt(values, share)
    next(abandoned)
    abandoned.close()
    assert kept.isdisjoint(_shared_memory_files())
    frames = list(pool2.iter_encrypt(values, share))  # in a new block
    total = ChunkSum.for_context(pool2.cipher.context, len(frames))
    for i, frame in enumerate(frames):
        total.add(i, frame)
    assert np.array_equal(pool2.decrypt(total.chunks(), values.size, share), _on_grid(values, share, pool2))


def test_a_chunk_larger_than_the_sums_chunks_is_refused_in_its_place(pool2, global_chunks, update):
    """Chunks that do not fit the shared cells (sized by the first batch) are decrypted here, and refused in order."""
    values, share = update
    frames = list(global_chunks)
    frames[5] = frames[5] + bytes(2 * len(frames[5]))
    with pytest.raises(CiphertextError, match="^chunk 5: .*checksum") as caught:
        pool2.decrypt(frames, values.size, share)
    assert caught.value.reason == "corrupt"


def test_a_worker_that_dies_fails_the_upload_with_a_clear_error_and_the_next_one_works(site_context, update):
    """A worker killed mid-upload (the kernel's OOM killer, say) must not leave the site waiting forever."""
    values, share = update
    before = set(psutil.Process().children())
    with CipherPool(site_context, workers=2, batch=1, window=1) as pool:
        workers = [p for p in set(psutil.Process().children()) - before if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        chunks = pool.iter_encrypt(np.tile(values, 20), share)  # 180 chunks: the worker dies midway
        next(chunks)
        victim = workers[0]
        victim.kill()
        _wait_for_exit_unreaped(victim)
        with pytest.raises(CipherWorkerError, match="cipher worker process died"):
            list(chunks)
        assert not pool._blocks  # its shared memory went back
        frames = list(pool.iter_encrypt(values, share))  # new workers
        total = ChunkSum.for_context(site_context, len(frames))
        for i, frame in enumerate(frames):
            total.add(i, frame)
        assert np.array_equal(pool.decrypt(total.chunks(), values.size, share), _on_grid(values, share, pool))


def _wait_for_exit_unreaped(process: psutil.Process, timeout: float = 10.0) -> None:
    """Waits until ``process`` has exited, without reaping it: the pool reaps its own workers, and psutil's ``wait()``
    would leave multiprocessing taking the worker for alive forever (its ``waitpid`` fails, which it reads as "not
    started yet")."""
    deadline = time.monotonic() + timeout
    try:
        while process.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"worker {process.pid} still running {timeout} s after SIGKILL"
            time.sleep(0.01)
    except psutil.NoSuchProcess:  # the pool reaped it already
        pass


_SITE = """
import json, sys, time
import numpy as np
from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.pool import CipherPool
pool = CipherPool(HEContext.generate(CKKSParams()), workers=2)
chunks = pool.iter_encrypt(np.zeros(8192 * 50))
next(chunks)
print(json.dumps(os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []), flush=True)
time.sleep(60)
"""


def test_a_killed_site_leaves_no_worker_and_no_shared_memory_behind(tmp_path):
    before = _shared_memory_files()  # /dev/shm is the machine's: other processes' blocks are not the site's
    site = subprocess.Popen([sys.executable, "-c", "import os\n" + _SITE], stdout=subprocess.PIPE, text=True)
    try:
        during = set(json.loads(site.stdout.readline()))
        workers = [p for p in psutil.Process(site.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        blocks = {name for name in during - before if name.startswith("psm_")}
        assert blocks  # the upload's block
    finally:
        site.kill()
        site.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    deadline = time.monotonic() + 10  # the resource tracker removes the block once it sees the site gone
    while blocks & _shared_memory_files() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not blocks & _shared_memory_files()


def test_workers_that_cannot_start_are_refused_once_not_restarted_forever(site_context, monkeypatch):
    monkeypatch.setattr(type(site_context), "serialize", lambda self, **kwargs: b"not a context")
    with pytest.raises(CipherWorkerError, match="could not start"):
        CipherPool(site_context, workers=2)
