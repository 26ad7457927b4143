"""Shared pieces of the server tests: provisioned kits, a running server, sites with known updates.

Everything is real: kits from the provisioning tool, gRPC over loopback with mutual TLS, TenSEAL ciphertexts.
(This module holds no tests; its name only keeps it among the server's test files.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from lightning_fhe.client import AggregatorClient, GlobalModel
from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.provision import load_provision_config, load_server_kit, provision
from lightning_fhe.provision.kits import SiteKit
from lightning_fhe.server.app import AggregatorServer
from lightning_fhe.server.config import load_server_config

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A small model: 20,000 encrypted values (3 ciphertext chunks) and 10 plaintext values.
MODEL_STATE = {
    "conv.weight": torch.zeros(100, 200),
    "norm.weight": torch.zeros(6),
    "norm.bias": torch.zeros(4),
}
ENCRYPTED = TensorLayout.from_tensors(MODEL_STATE, ["conv.weight"])
PLAINTEXT = TensorLayout.from_tensors(MODEL_STATE, ["norm.weight", "norm.bias"])
WEIGHTS = {"site-1": 100.0, "site-2": 300.0, "site-3": 600.0, "site-4": 50.0}


def provision_kits(out: Path, sites: tuple[str, ...]) -> Path:
    config = load_provision_config(REPO / "configs" / "provision.yaml", [f"clients=[{','.join(sites)}]"])
    provision(config, out)
    return out


def server_options(state_dir: Path, **options) -> list[str]:
    defaults = {"port": 0, "bind": "127.0.0.1", "state_dir": str(state_dir), "linger_s": 2, "rounds": 3}
    return [f"{k}={v}" for k, v in {**defaults, **options}.items()]


def start_server(kits: Path, state_dir: Path, insecure: bool = False, **options) -> AggregatorServer:
    config = load_server_config(None, server_options(state_dir, **options))
    server = AggregatorServer(config, load_server_kit(kits / "server"), insecure=insecure)
    server.start()
    return server


def update_of(site: str, round_number: int) -> tuple[np.ndarray, np.ndarray]:
    """The (encrypted part, plaintext part) a site sends in a round: known, different for every site and round."""
    rng = np.random.default_rng([int(site.rsplit("-", 1)[1]), round_number])
    # The model is float32, so its plaintext part travels as float32: values it can hold exactly.
    return rng.normal(0, 0.1, ENCRYPTED.numel), rng.normal(0, 1.0, PLAINTEXT.numel).astype(np.float32).astype(float)


def initial_values() -> np.ndarray:
    return np.concatenate(update_of("site-1", 0))


def weighted_average(sites, round_number: int) -> tuple[np.ndarray, np.ndarray]:
    total = sum(WEIGHTS[s] for s in sites)
    encrypted = sum(WEIGHTS[s] * update_of(s, round_number)[0] for s in sites) / total
    plaintext = sum(WEIGHTS[s] * update_of(s, round_number)[1] for s in sites) / total
    return encrypted, plaintext


@dataclass
class Site:
    """A site as the Lightning callback drives one: join, round 0, then submit and fetch every round."""

    kit: SiteKit
    address: str
    cipher: UpdateCipher = field(init=False)
    models: dict[int, GlobalModel] = field(default_factory=dict)
    decrypted: dict[int, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.cipher = UpdateCipher(self.kit.he_context)

    @property
    def name(self) -> str:
        return self.kit.name

    def client(self, **kwargs) -> AggregatorClient:
        return AggregatorClient(self.kit, self.address, **kwargs)

    def chunks(self, round_number: int, share: float) -> Iterator[bytes]:
        return self.cipher.iter_encrypt(update_of(self.name, round_number)[0], weight_fraction=share)

    def run(self, before_submit=None, chunk_source=None, **client_options) -> None:
        """The whole federation from this site's side; any exception is kept in ``error``."""
        try:
            with self.client(**client_options) as client:
                info = client.join(WEIGHTS[self.name], ENCRYPTED, PLAINTEXT)
                if info.send_initial_model:
                    client.submit(0, [], initial_values())
                self.models[0] = client.fetch_global(0)
                for r in range(info.current_round, info.rounds + 1):
                    if before_submit is not None:
                        before_submit(self, r)
                    chunks = (chunk_source or self.chunks)(r, info.share)
                    client.submit(r, chunks, update_of(self.name, r)[1])
                    model = client.fetch_global(r)
                    self.models[r] = model
                    self.decrypted[r] = self.cipher.decrypt(model.encrypted_chunks, ENCRYPTED.numel, model.total_share)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def check_round(self, round_number: int, participants) -> None:
        """The global model this site got equals the exact weighted average over ``participants``."""
        model = self.models[round_number]
        # Participants are listed in the members' (join) order, which concurrent joins make vary.
        assert sorted(model.participants) == sorted(participants), (self.name, round_number, model.participants)
        expected_enc, expected_plain = weighted_average(participants, round_number)
        assert np.abs(self.decrypted[round_number] - expected_enc).max() < 1e-6
        # Averaged in float64 by the server, then sent back as float32 like the model's own tensors.
        np.testing.assert_allclose(model.plaintext, expected_plain, rtol=0, atol=1e-6)
        assert np.array_equal(model.plaintext, model.plaintext.astype(np.float32))


def run_sites(sites: list[Site], timeout: float = 120.0, **run_options) -> None:
    threads = [threading.Thread(target=s.run, kwargs=run_options, name=s.name, daemon=True) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"{t.name} did not finish within {timeout} s"
    for s in sites:
        if s.error is not None:
            raise AssertionError(f"{s.name} failed: {s.error!r}") from s.error


def stub(channel: grpc.Channel) -> pb_grpc.AggregatorStub:
    return pb_grpc.AggregatorStub(channel)


def join_request_for(kit: SiteKit, **fields) -> pb.JoinRequest:
    """A raw JoinRequest with the test layouts and ``kit``'s fingerprints; ``fields`` add to it or replace them."""
    request = dict(
        weight=1.0,
        encrypted_layout_json=json.dumps(ENCRYPTED.to_dict()),
        plaintext_layout_json=json.dumps(PLAINTEXT.to_dict()),
        he_fingerprint=kit.he_fingerprint,
        params_fingerprint=kit.params.fingerprint(),
    )
    return pb.JoinRequest(**{**request, **fields})


def site_channel(
    kit: SiteKit, address: str, *, key: bytes | None = None, cert: bytes | None = None, ca: bytes | None = None
):
    credentials = grpc.ssl_channel_credentials(ca or kit.ca_cert, key or kit.key, cert or kit.cert)
    return grpc.secure_channel(address, credentials)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class ServerProcess:
    """``python -m lightning_fhe.server`` as a child process, for what only a real process shows (SIGKILL)."""

    def __init__(self, kits: Path, state_dir: Path, log: Path, *extra: str, **options) -> None:
        port_file = state_dir.parent / f"port-{os.getpid()}-{id(self)}"
        port_file.unlink(missing_ok=True)
        empty_config = state_dir.parent / "empty-server.yaml"  # the built-in defaults, not configs/server.yaml
        empty_config.write_text("{}\n")
        args = [PYTHON, "-m", "lightning_fhe.server", "--kit", str(kits / "server"), "--config", str(empty_config)]
        args += [*extra, *server_options(state_dir, port_file=str(port_file), **options)]
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: port_file.exists() or self.process.poll() is not None, 60, "the server to listen")
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{log.read_text()}")
        self.port = int(port_file.read_text())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()

    def summary_lines(self) -> list[str]:
        return re.findall(r"round \d+ closed: .*", self.output())


def status_of(kit: SiteKit, address: str) -> pb.RoundStatus:
    with site_channel(kit, address) as channel:
        return stub(channel).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
