"""A site's pipelined exchange (FederatedSite over a CipherPool): encryption while the upload streams, decryption
while the download arrives, the update kept for a resubmission in a temporary file.

Everything is real: kits from the provisioning tool, a server over loopback with mutual TLS, TenSEAL, and spawned
pool workers. The model has 20,000 encrypted values (3 chunks) and 10 plaintext ones; the pools here take one chunk
per task, so several tasks are in flight whenever a chunk arrives.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from test_server_support import (
    ENCRYPTED,
    MODEL_STATE,
    PLAINTEXT,
    WEIGHTS,
    initial_values,
    provision_kits,
    start_server,
    update_of,
    weighted_average,
)

from lightning_fhe.client import AggregatorClient
from lightning_fhe.client.upload import KeptUpdate
from lightning_fhe.he.pool import CipherPool
from lightning_fhe.proto.update_shape import update_shape
from lightning_fhe.provision import load_site_kit
from lightning_fhe.selection import TensorSplit
from lightning_fhe.site import FederatedSite

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2")
ROUNDS = 2
SPLIT = TensorSplit(encrypted=("conv.weight",), plaintext=("norm.weight", "norm.bias"), local=())


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    return provision_kits(tmp_path_factory.mktemp("kits"), SITES)


def state_of(site: str, round_number: int) -> dict[str, torch.Tensor]:
    """The site's model after local training in ``round_number``: the known update of test_server_support."""
    return {**ENCRYPTED.unflatten(update_of(site, round_number)[0]), **PLAINTEXT.unflatten(update_of(site, round_number)[1])}


def site_for(kits: Path, name: str, port: int, workers: int) -> FederatedSite:
    kit = load_site_kit(kits / name)
    site = FederatedSite(AggregatorClient(kit, f"127.0.0.1:{port}"), kit.he_context, SPLIT, MODEL_STATE, workers=1)
    site.pool = CipherPool(kit.he_context, workers=workers, batch=1, window=1)  # one chunk a task: a real pipeline
    return site


def federate(kits: Path, state_dir: Path, workers: int, before_round=None) -> dict[str, dict[int, dict]]:
    """Both sites through all rounds, each with ``workers`` pool processes; the global tensors each one loaded."""
    server = start_server(kits, state_dir, rounds=ROUNDS, linger_s=1)
    globals_: dict[str, dict[int, dict]] = {name: {} for name in SITES}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        site = site_for(kits, name, server.port, workers)
        try:
            site.join(WEIGHTS[name], state_of("site-1", 0))
            globals_[name][0] = site.global_state(0)
            for r in range(1, ROUNDS + 1):
                if before_round is not None:
                    before_round(site, r)
                tensors, metrics = site.exchange(r, state_of(name, r))
                assert metrics.round_s >= metrics.upload_s > 0 and metrics.ciphertext_bytes > 0
                globals_[name][r] = tensors
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            site.close()

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in SITES]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
            assert not t.is_alive(), f"{t.name} is stuck"
        assert not errors, errors
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()
    return globals_


def assert_exact_average(globals_: dict[str, dict[int, dict]]) -> None:
    np.testing.assert_array_equal(
        np.concatenate([ENCRYPTED.flatten(globals_["site-1"][0]), PLAINTEXT.flatten(globals_["site-1"][0])]),
        initial_values().astype(np.float32),
    )
    for r in range(1, ROUNDS + 1):
        expected_encrypted, expected_plaintext = weighted_average(SITES, r)
        for name in SITES:
            np.testing.assert_allclose(ENCRYPTED.flatten(globals_[name][r]), expected_encrypted, rtol=0, atol=1e-6)
            np.testing.assert_allclose(PLAINTEXT.flatten(globals_[name][r]), expected_plaintext, rtol=0, atol=1e-6)
            for tensor in globals_[name][r]:  # every site holds the same weights, bit for bit
                assert torch.equal(globals_[name][r][tensor], globals_["site-1"][r][tensor]), (name, r, tensor)


def test_two_workers_and_one_give_the_same_global_weights_bit_for_bit(kits, tmp_path):
    two = federate(kits, tmp_path / "two", workers=2)
    one = federate(kits, tmp_path / "one", workers=1)
    assert_exact_average(two)
    assert_exact_average(one)
    for r in range(ROUNDS + 1):
        for tensor in MODEL_STATE:
            assert torch.equal(two["site-1"][r][tensor], one["site-1"][r][tensor]), (r, tensor)
            assert two["site-1"][r][tensor].dtype == MODEL_STATE[tensor].dtype


class Unavailable(grpc.RpcError, grpc.Call):
    """What a stream that breaks midway raises: UNAVAILABLE, the code the client retries."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset (a test broke the download midway)"

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return True

    def add_callback(self, callback):
        return False


def break_first_download_of(site: FederatedSite, round_number: int, after_chunks: int, broken: list[int]) -> None:
    """The first download of ``round_number``'s global model breaks after ``after_chunks`` chunks (the real ones)."""
    client = site.client
    real = client._stub.GetGlobalModel

    def get_global_model(request, **kwargs):
        stream = real(request, **kwargs)
        if request.round != round_number or broken:
            return stream

        class Breaking:  # the real stream's messages, until it breaks
            def __init__(self):
                self.chunks = 0

            def __iter__(self):
                return self

            def __next__(self):
                part = next(stream)
                if part.WhichOneof("part") == "chunk":
                    if self.chunks == after_chunks:
                        stream.cancel()
                        broken.append(self.chunks)
                        raise Unavailable()
                    self.chunks += 1
                return part

            def cancel(self):
                stream.cancel()

        return Breaking()

    client._stub.GetGlobalModel = get_global_model


def test_a_download_broken_midway_is_retried_and_still_decrypts_exactly(kits, tmp_path):
    broken: dict[str, list[int]] = {name: [] for name in SITES}

    def before_round(site: FederatedSite, r: int) -> None:
        if r == 1:
            break_first_download_of(site, 1, after_chunks=2, broken=broken[site.client.site])

    globals_ = federate(kits, tmp_path / "broken", workers=2, before_round=before_round)
    assert broken == {"site-1": [2], "site-2": [2]}  # each site's first download of round 1 broke after 2 chunks
    assert_exact_average(globals_)  # and the retried one started over and decrypted exactly


def test_a_site_starts_no_worker_processes_for_an_update_of_one_task_unless_asked(kits):
    # 20,000 encrypted values are 3 chunks, one task of 16: a second process could never be busy. (No server is
    # needed: the client connects on its first call.)
    kit = load_site_kit(kits / "site-1")
    for workers, expected in ((None, 1), (2, 2)):
        before = {child.pid for child in psutil.Process().children()}
        site = FederatedSite(AggregatorClient(kit, "127.0.0.1:1"), kit.he_context, SPLIT, MODEL_STATE, workers=workers)
        try:
            started = {child.pid for child in psutil.Process().children()} - before
            assert site.pool.workers == expected
            assert len(started) >= expected if workers else not started  # (multiprocessing's tracker may start too)
        finally:
            site.close()


def test_the_kept_update_is_read_back_from_its_file_not_kept_in_memory(kits):
    kit = load_site_kit(kits / "site-1")
    shape = update_shape(1, ENCRYPTED, PLAINTEXT, kit.params)
    with CipherPool(kit.he_context, workers=1) as pool:
        pulled = []

        def chunks():
            for chunk in pool.iter_encrypt(update_of("site-1", 1)[0], 0.5):
                pulled.append(chunk)
                yield chunk

        kept = KeptUpdate.for_round(shape, chunks(), update_of("site-1", 1)[1])
        first = [m.chunk.data for m in kept.messages(None) if m.WhichOneof("part") == "chunk"]
        again = [m.chunk.data for m in kept.messages(None) if m.WhichOneof("part") == "chunk"]  # a resubmission
    assert len(pulled) == shape.num_chunks == 3  # the encryption ran once
    assert first == again == pulled
    assert kept.ciphertext_bytes == sum(map(len, pulled)) and not hasattr(kept, "_chunks")
    assert kept._file.tell() == 0 and Path(f"/proc/self/fd/{kept._file.fileno()}").exists()  # pwrite, pread only
    kept.close()
    assert [m for m in kept.messages(None) if m.WhichOneof("part") == "chunk"] == []  # dropped: nothing more to send
