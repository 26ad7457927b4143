"""What a coalition of the server with one site learns from another site's upload, with real processes.

The server runs as its own process; site-3, a process too, joins and is killed once site-1 and site-2 have uploaded
round 1, so the round is re-collected among them. Every byte site-2 sent the server over mutual TLS is kept. Then
the coalition of the server with site-1 (site-1's kit, with the CKKS secret key, and its pairwise secrets) takes the
masks it knows off site-2's attempt-1 upload and decrypts it: noise, uncorrelated with site-2's update. The same
procedure on site-2's unmasked chunks recovers the update, so the test can tell the two apart.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_server_support import PYTHON, REPO, ServerProcess, provision_kits, status_of, wait_for

from lightning_fhe.client import AggregatorClient
from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.he.frames import decode_upload_chunk, encode_global_chunk
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.he.seeded import CiphertextLayout
from lightning_fhe.masking.masks import chunk_nonce, keystream_mod
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.provision import load_site_kit
from lightning_fhe.provision.kits import SiteKit

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
WEIGHTS = {"site-1": 100.0, "site-2": 300.0, "site-3": 600.0}
# 204,800 encrypted values (50 chunks): a correlation below 0.01 is then 4.5 standard errors from noise.
STATE = {"w": torch.zeros(51200, 4), "b": torch.zeros(4)}
ENCRYPTED = TensorLayout.from_tensors(STATE, ["w"])
PLAINTEXT = TensorLayout.from_tensors(STATE, ["b"])


def update_of(site: str, round_number: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(site.rsplit("-", 1)[1]), round_number])
    return rng.normal(0, 0.1, ENCRYPTED.numel), rng.normal(0, 1.0, PLAINTEXT.numel).astype(np.float32).astype(float)


# site-3: joins, sends the initial model if asked, then stays silent in round 1 until it is killed.
SILENT_SITE = r"""
import sys, time
sys.path.insert(0, sys.argv[3])
from lightning_fhe.client import AggregatorClient
from test_masking_coalition import ENCRYPTED, PLAINTEXT, WEIGHTS, update_of
import numpy as np

client = AggregatorClient(sys.argv[1], sys.argv[2])
info = client.join(WEIGHTS["site-3"], ENCRYPTED, PLAINTEXT)
if info.send_initial_model:
    client.submit(0, [], np.concatenate(update_of("site-3", 0)))
client.fetch_global(0)
print("waiting", flush=True)
time.sleep(600)
"""


class RecordingSite:
    """A site in a thread of this process, keeping every chunk it sent (per attempt) and its unmasked chunks."""

    def __init__(self, kit: SiteKit, address: str) -> None:
        self.kit, self.address = kit, address
        self.cipher = UpdateCipher(kit.he_context)
        self.sent: dict[int, list[bytes]] = {}  # attempt -> the chunks as they went over the wire
        self.unmasked: list[bytes] = []
        self.share = 0.0
        self.decrypted: np.ndarray | None = None
        self.participants: tuple[str, ...] = ()
        self.error: BaseException | None = None
        self.pair_seeds: dict[str, bytes] = {}

    def run(self) -> None:
        try:
            with AggregatorClient(self.kit, self.address) as client:
                self._record(client)
                info = client.join(WEIGHTS[self.kit.name], ENCRYPTED, PLAINTEXT)
                self.share = info.share
                self.pair_seeds = dict(client._masking.seeds)
                if info.send_initial_model:
                    client.submit(0, [], np.concatenate(update_of(self.kit.name, 0)))
                client.fetch_global(0)
                client.submit(1, self._chunks(), update_of(self.kit.name, 1)[1])
                model = client.fetch_global(1)
                self.participants = model.participants
                self.decrypted = self.cipher.decrypt(model.encrypted_chunks, ENCRYPTED.numel, model.total_share)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def _chunks(self) -> Iterator[bytes]:
        for frame in self.cipher.iter_encrypt(update_of(self.kit.name, 1)[0], weight_fraction=self.share):
            self.unmasked.append(frame)
            yield frame

    def _record(self, client: AggregatorClient) -> None:
        submit = client._stub.SubmitUpdate

        def recording(messages, **kwargs):
            def tee(parts: Iterator[pb.UpdatePart]) -> Iterator[pb.UpdatePart]:
                attempt = 0
                for part in parts:
                    if part.WhichOneof("part") == "header":
                        attempt = part.header.attempt
                        self.sent[attempt] = []
                    elif part.WhichOneof("part") == "chunk":
                        self.sent[attempt].append(part.chunk.data)
                    yield part

            return submit(tee(messages), **kwargs)

        client._stub.SubmitUpdate = recording


def coalition_decrypts(frames: list[bytes], victim: str, colluder: RecordingSite, masks_of) -> np.ndarray:
    """What the server and ``colluder`` make of ``victim``'s chunks: the mask between the two taken off (the only
    one the coalition knows) where the chunks were masked for ``masks_of`` = (members, attempt), then decrypted
    with the colluder's CKKS key and divided by the victim's share."""
    layout = CiphertextLayout(colluder.kit.he_context)
    seed = colluder.pair_seeds[victim]  # the colluder's pairwise secret with the victim
    sign = 1 if victim < colluder.kit.name else -1  # the victim added sign * KS(victim, colluder)
    cipher = UpdateCipher(colluder.kit.he_context)
    values = []
    for index, frame in enumerate(frames):
        chunk = decode_upload_chunk(frame, layout.n, layout.q0)
        c0 = chunk.c0.astype(object)
        if masks_of is not None:
            nonce = chunk_nonce(1, masks_of[1], masks_of[0], index)
            c0 = (c0 - sign * keystream_mod(seed, nonce, layout.q0, layout.n).astype(object)) % layout.q0
        global_frame = encode_global_chunk(np.array(c0, dtype=np.uint64), [chunk.seed_entry])
        values.append(cipher.decrypt_chunk(global_frame, participants=1))
    return cipher.finish(np.concatenate(values), WEIGHTS[victim] / sum(WEIGHTS.values()))[: ENCRYPTED.numel]


@pytest.fixture(scope="module")
def recollected(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coalition")
    kits = provision_kits(tmp / "kits", SITES)
    server = ServerProcess(kits, tmp / "state", tmp / "server.log", rounds=1, min_clients=2, wait_after_min_s=2)
    address = f"127.0.0.1:{server.port}"
    silent = subprocess.Popen(
        [PYTHON, "-c", SILENT_SITE, str(kits / "site-3"), address, str(Path(__file__).parent)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sites = [RecordingSite(load_site_kit(kits / name), address) for name in ("site-1", "site-2")]
    threads = [threading.Thread(target=site.run, daemon=True) for site in sites]
    try:
        kit_1 = sites[0].kit
        # site-3 first, so that formation (quorum 2, then wait_after_min_s) cannot close without it
        wait_for(lambda: "site-3" in status_of(kit_1, address).joined, 120, "site-3 to join")
        for thread in threads:
            thread.start()
        wait_for(lambda: set(status_of(kit_1, address).submitted) >= {"site-1", "site-2"}, 120, "round 1's uploads")
        silent.kill()  # after the others uploaded: attempt 1 can never complete
        for thread in threads:
            thread.join(120)
        assert server.wait(timeout=60) == 0, server.output()
    finally:
        silent.kill()
        server.kill() if server.process.poll() is None else None
    for site in sites:
        assert site.error is None, f"{site.kit.name}: {site.error!r}\n{server.output()}"
    return sites, server


def test_a_killed_site_is_recollected_and_the_survivors_get_their_exact_average(recollected):
    sites, server = recollected
    total = WEIGHTS["site-1"] + WEIGHTS["site-2"]
    expected = (WEIGHTS["site-1"] * update_of("site-1", 1)[0] + WEIGHTS["site-2"] * update_of("site-2", 1)[0]) / total
    for site in sites:
        assert sorted(site.participants) == ["site-1", "site-2"]
        assert np.abs(site.decrypted - expected).max() < 1e-6
        assert sorted(site.sent) == [1, 2]  # attempt 1 with site-3, attempt 2 without it
    assert "attempt 1 lacks site-3" in server.output()


def test_the_coalition_of_the_server_and_site_1_learns_nothing_from_site_2s_attempt_1_upload(recollected):
    sites, _ = recollected
    site_1, site_2 = sites
    truth = update_of("site-2", 1)[0]
    seen = coalition_decrypts(site_2.sent[1], "site-2", site_1, masks_of=(SITES, 1))
    correlation = np.corrcoef(seen, truth)[0, 1]
    print(f"coalition: correlation {correlation:+.5f} over {seen.size} values")  # shown with pytest -s
    assert ENCRYPTED.numel >= 100_000 and abs(correlation) < 0.01, correlation
    # The power of the test: the same procedure on site-2's update as an unmasked federation uploads it (its
    # chunks before masking) gives the update back.
    control = coalition_decrypts(site_2.unmasked, "site-2", site_1, masks_of=None)
    assert np.abs(control - truth).max() < 1e-6
    # ... and on the masked bytes of attempt 2, whose only other member is site-1: the coalition knows every mask
    # there and reads the update (two members' sum tells each the other's: why min_clients guards attempts).
    assert site_2.sent[2] != site_2.unmasked
    exposed = coalition_decrypts(site_2.sent[2], "site-2", site_1, masks_of=(("site-1", "site-2"), 2))
    assert np.abs(exposed - truth).max() < 1e-6
