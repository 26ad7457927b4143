"""Faults with real processes: a site killed mid-upload, and the server killed with SIGKILL mid-round."""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from lightning_fhe.provision import load_site_kit
from lightning_fhe.server.store import StateStore
from test_server_support import (
    MODEL_STATE,
    PYTHON,
    REPO,
    ServerProcess,
    Site,
    provision_kits,
    start_server,
    status_of,
    wait_for,
)

SITES = ("site-1", "site-2", "site-3")

pytestmark = pytest.mark.slow

# site-3 as its own process: joins, waits until site-1's update is in, then uploads one chunk every 30 s.
SLOW_SITE = r"""
import sys, time
sys.path.insert(0, sys.argv[3])
from lightning_fhe.client import AggregatorClient
from lightning_fhe.he.codec import UpdateCipher
from test_server_support import ENCRYPTED, PLAINTEXT, WEIGHTS, update_of

client = AggregatorClient(sys.argv[1], sys.argv[2])
info = client.join(WEIGHTS["site-3"], ENCRYPTED, PLAINTEXT)
client.fetch_global(0)
while "site-1" not in client.status().submitted:
    time.sleep(0.05)
cipher = UpdateCipher(client.kit.he_context)

def slowly():
    for blob in cipher.iter_encrypt(update_of("site-3", 1)[0], info.share):
        yield blob
        time.sleep(30)

client.submit(1, slowly(), update_of("site-3", 1)[1])
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("kits"), SITES)


def test_a_site_killed_mid_upload_is_excluded_exactly(kits, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_fhe.server")
    torch.save(MODEL_STATE, tmp_path / "init.pt")  # so that round 0 does not wait for site-3, which joins first
    # wait_after_min_s is also how long site-2 has to join after site-1 (formation closes at the quorum of 2 plus
    # that wait): 10 s, not 2, so that a loaded machine cannot make site-2 miss formation.
    server = start_server(
        kits, tmp_path / "state", rounds=1, min_clients=2, wait_after_min_s=10, initial_model=str(tmp_path / "init.pt")
    )
    address = f"127.0.0.1:{server.port}"
    slow = subprocess.Popen(
        [PYTHON, "-c", SLOW_SITE, str(kits / "site-3"), address, str(Path(__file__).parent)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        federation = server.federation
        wait_for(
            lambda: "site-3" in federation.status("site-3").joined or slow.poll() is not None, 60, "site-3 to join"
        )
        assert slow.poll() is None, slow.stdout.read().decode()
        killed = threading.Event()

        def site_2_waits_for_the_kill(site, round_number):
            if site.name == "site-2":
                assert killed.wait(60)

        sites = [Site(load_site_kit(kits / name), address) for name in ("site-1", "site-2")]
        threads = [
            threading.Thread(target=s.run, kwargs={"before_submit": site_2_waits_for_the_kill}, daemon=True)
            for s in sites
        ]
        for t in threads:
            t.start()
        # site-1's update is in; site-3's first chunk went into the same sum: kill it there.
        wait_for(lambda: federation.uploads_in_progress().get("site-3", 0) >= 1, 60, "site-3 to be mid-upload")
        slow.kill()
        slow.wait(10)
        wait_for(lambda: "site-3" not in federation.uploads_in_progress(), 30, "the server to notice")
        killed.set()
        for t in threads:
            t.join(60)
        for s in sites:
            assert s.error is None, s.error
            s.check_round(1, ("site-1", "site-2"))  # site-3's chunk came back out of the sum, exactly
            assert s.models[1].total_share == pytest.approx((100 + 300) / 1000)
        assert server.wait(timeout=30) == 0
    finally:
        if slow.poll() is None:
            slow.kill()
        server.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("update from site-3 discarded after 1 chunks" in m for m in messages), messages
    assert any("round 1 closed: 2/3 sites (" in m and "missing site-3" in m for m in messages)


def test_the_server_killed_mid_round_and_restarted_loses_nothing(kits, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_fhe.client")
    state, log = tmp_path / "state", tmp_path / "server.log"
    server = ServerProcess(kits, state, log, rounds=3)
    address = f"127.0.0.1:{server.port}"
    site3_mid_upload, resume = threading.Event(), threading.Event()
    sites = {name: Site(load_site_kit(kits / name), address) for name in SITES}

    def site_3_chunks(round_number, share):
        chunks = sites["site-3"].chunks(round_number, share)
        if round_number != 2:
            return chunks

        def held_back():
            yield next(chunks)
            site3_mid_upload.set()
            assert resume.wait(120)
            yield from chunks

        return held_back()

    def site_3_waits(site, round_number):
        if site.name == "site-3" and round_number == 2:
            kit1 = sites["site-1"].kit
            wait_for(lambda: len(status_of(kit1, address).submitted) == 2, 60, "site-1 and site-2 in round 2")

    threads = [
        threading.Thread(
            target=site.run,
            kwargs={"before_submit": site_3_waits, "chunk_source": site_3_chunks if name == "site-3" else None},
            name=name,
            daemon=True,
        )
        for name, site in sites.items()
    ]
    try:
        for t in threads:
            t.start()
        assert site3_mid_upload.wait(90), server.output()
        status = status_of(sites["site-1"].kit, address)
        assert status.current_round == 2 and sorted(status.submitted) == ["site-1", "site-2"]
        server.kill()  # round 2 open: two updates recorded in memory only, a third arriving
        assert StateStore(state).load_federation().last_closed_round == 1
        server = ServerProcess(kits, state, log, rounds=3, port=server.port)
        resume.set()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), f"{t.name} is stuck"
        assert server.wait(60) == 0, server.output()
    finally:
        resume.set()
        if server.process.poll() is None:
            server.kill()
    output = server.output()
    print(output)
    for site in sites.values():
        assert site.error is None, f"{site.name}: {site.error!r}\n{output}"
        for r in (1, 2, 3):
            site.check_round(r, SITES)  # every site in every round: nothing lost to the kill
    assert "resuming federation" in output and "last closed round 1 of 3" in output
    resubmitted = [r.threadName for r in caplog.records if "submitting it again" in r.getMessage()]
    assert sorted(resubmitted) == ["site-1", "site-2"]  # told by the restarted server, they sent their updates again
    closed = [line.split(":")[0] for line in server.summary_lines()]
    assert closed == ["round 0 closed", "round 1 closed", "round 2 closed", "round 3 closed"], output
