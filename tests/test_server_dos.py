"""The server's gate over real gRPC with mutual TLS: one site, or one certificate holder, cannot take what the
others need. Calls per site are capped, stalled uploads lose their slot, waits are clamped, non-members get
nothing, the operator sees everything; and the DoS test: 100 idle streams against a server process while the
other members finish their rounds with exact averages, in flat memory.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
import torch

from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.wire import REFUSAL_REASON_METADATA
from lightning_fhe.provision import CertificateAuthority, issue_client_cert, load_server_kit, load_site_kit
from lightning_fhe.server.messages import Phase
from test_server_support import (
    MODEL_STATE,
    PLAINTEXT,
    WEIGHTS,
    ServerProcess,
    Site,
    join_request_for,
    provision_kits,
    run_sites,
    site_channel,
    start_server,
    stub,
    wait_for,
)

SITES = ("site-1", "site-2", "site-3", "site-4")


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    kits = provision_kits(tmp / "kits", SITES)
    torch.manual_seed(0)
    torch.save({k: torch.randn_like(v) for k, v in MODEL_STATE.items()}, kits / "init.pt")
    return kits


def reason_of(err: grpc.RpcError) -> Reason | None:
    return Reason.parse(dict(err.trailing_metadata() or ()).get(REFUSAL_REASON_METADATA))


def mallory_credentials(kits):
    """A certificate of the federation's own CA whose name is no expected site."""
    ca_dir = kits / "ca"
    ca = CertificateAuthority.from_pem((ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes())
    return issue_client_cert(ca, "mallory")


def join_request(kit, max_wait_s: float) -> pb.JoinRequest:
    return join_request_for(kit, weight=WEIGHTS[kit.name], max_wait_s=max_wait_s)


def never_sends(stop: threading.Event):
    """A request stream that sends nothing until ``stop``."""
    stop.wait(60)
    return
    yield  # a generator


def header_only(stop: threading.Event, round_number: int):
    """An update stream that sends its header (3 chunks: the test model), then nothing until ``stop``."""
    header = pb.UpdateHeader(round=round_number, num_chunks=3, plaintext_count=PLAINTEXT.numel)
    yield pb.UpdatePart(header=header)
    stop.wait(60)


def test_one_site_cannot_hold_more_than_its_calls_and_others_are_served(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", clients="[site-1,site-2,site-3]", max_calls_per_site=4)
    address = f"127.0.0.1:{server.port}"
    site_1, site_2 = load_site_kit(kits / "site-1"), load_site_kit(kits / "site-2")
    stop = threading.Event()
    pool = ThreadPoolExecutor(8)
    try:
        with site_channel(site_1, address) as channel:
            waits = [pool.submit(stub(channel).Join, join_request(site_1, 60), timeout=30) for _ in range(4)]
            wait_for(lambda: server.federation.snapshot()[-1] == ("site-1",), 10, "site-1's joins to wait")
            wait_for(lambda: server._servicer.limiter.held("site-1") == 4, 10, "site-1 to hold 4 calls")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(info.value) is Reason.TOO_MANY_CALLS
            assert "max_calls_per_site=4" in info.value.details()
            # a name the federation does not expect is refused before its stream is read
            mallory = mallory_credentials(kits)
            with site_channel(site_1, address, key=mallory.key_pem, cert=mallory.cert_pem) as intruder:
                with pytest.raises(grpc.RpcError) as info:
                    stub(intruder).SubmitUpdate(never_sends(stop), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(info.value) is Reason.UNKNOWN_SITE and "'mallory'" in info.value.details()
            # the other sites are answered at once
            with site_channel(site_2, address) as other:
                status = stub(other).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
            assert status.phase == pb.RoundStatus.FORMING and status.site == "site-2"
            assert time.monotonic() - started < 5
            for call in waits:
                call.cancel()
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop(0)


@pytest.mark.slow
def test_a_member_that_sends_only_headers_does_not_stop_the_others(kits, tmp_path):
    """site-3 opens a header-only update stream in rounds 1 and 2 (two streams, the two upload slots); with a
    short stream_idle_s each is refused as idle and site-1 and site-2 finish their 3 rounds with exact averages."""
    server = start_server(
        kits,
        tmp_path / "state",
        clients="[site-1,site-2,site-3]",
        min_clients=2,
        wait_after_min_s=1,
        round_timeout_s=40,
        max_concurrent_uploads=2,
        stream_idle_s=0.5,
        initial_model=str(kits / "init.pt"),
    )
    address = f"127.0.0.1:{server.port}"
    site_3 = load_site_kit(kits / "site-3")
    stop = threading.Event()
    refused: dict[int, grpc.RpcError] = {}
    try:
        with site_channel(site_3, address) as channel:
            assert not stub(channel).Join(join_request(site_3, 0), timeout=10).formed  # the first to join

            def slowloris():
                calls = {}
                for r in (1, 2):  # the second while the first still stalls: without an idle deadline, both slots
                    wait_for(lambda: server.federation.current_round >= r, 30, f"round {r} to open")
                    calls[r] = stub(channel).SubmitUpdate.future(header_only(stop, r), timeout=50)
                for r, call in calls.items():
                    refused[r] = call.exception()

            attacker = threading.Thread(target=slowloris, daemon=True)
            attacker.start()
            sites = [Site(load_site_kit(kits / name), address) for name in ("site-1", "site-2")]
            run_sites(sites, timeout=30)  # before the stalled streams' own 50 s deadline could free their slots
            attacker.join(30)
            # the helper threads reading the refused streams end with their calls
            wait_for(
                lambda: not any(t.name == "aggregator-stream" for t in threading.enumerate()), 10, "stream readers"
            )
        for site in sites:
            for r in (1, 2, 3):
                site.check_round(r, ["site-1", "site-2"])
        for r in (1, 2):
            assert refused[r].code() == grpc.StatusCode.DEADLINE_EXCEEDED, refused[r]
            assert reason_of(refused[r]) is Reason.IDLE and "stream_idle_s" in refused[r].details()
    finally:
        stop.set()
        server.stop(0)


@pytest.fixture(scope="module")
def formed(kits, tmp_path_factory):
    """A federation formed by site-1 and site-2 without site-3 (expected), round 1 open."""
    server = start_server(
        kits,
        tmp_path_factory.mktemp("formed") / "state",
        clients="[site-1,site-2,site-3]",
        min_clients=2,
        wait_after_min_s=0,
        rounds=1,
        initial_model=str(kits / "init.pt"),
    )
    address = f"127.0.0.1:{server.port}"
    for name in ("site-1", "site-2"):
        kit = load_site_kit(kits / name)
        with site_channel(kit, address) as channel:
            stub(channel).Join(join_request(kit, 0), timeout=10)
    wait_for(lambda: server.federation.phase is Phase.OPEN, 10, "the federation to form")
    yield server, address
    server.stop(0)


def test_nan_and_negative_waits_answer_at_once(kits, formed, tmp_path):
    server, address = formed
    kit = load_site_kit(kits / "site-1")
    with site_channel(kit, address) as channel:
        started = time.monotonic()
        for wait in (math.nan, -math.inf, -1.0):
            parts = list(stub(channel).GetGlobalModel(pb.GlobalModelRequest(round=1, max_wait_s=wait), timeout=10))
            assert len(parts) == 1 and parts[0].WhichOneof("part") == "pending"
            assert parts[0].pending.phase == pb.RoundStatus.OPEN and parts[0].pending.site == "site-1"
        assert time.monotonic() - started < 3  # answered at once, not after 60 s nor spinning
    # a join with a NaN wait answers at once too, on a federation still forming
    other = start_server(kits, tmp_path / "forming", clients="[site-1,site-2]")
    try:
        with site_channel(kit, f"127.0.0.1:{other.port}") as channel:
            started = time.monotonic()
            reply = stub(channel).Join(join_request(kit, math.nan), timeout=10)
            assert not reply.formed and reply.joined == 1 and time.monotonic() - started < 3
    finally:
        other.stop(0)


def test_an_expected_site_that_missed_formation_is_served_nothing(kits, formed):
    server, address = formed
    kit = load_site_kit(kits / "site-3")
    with site_channel(kit, address) as channel:
        for call in (
            lambda: list(stub(channel).GetGlobalModel(pb.GlobalModelRequest(round=0), timeout=10)),
            lambda: stub(channel).GetRoundStatus(pb.RoundStatusRequest(), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(info.value) is Reason.NOT_MEMBER
            assert info.value.details().startswith("site 'site-3' never joined: the federation formed with")


def test_the_operator_sees_the_full_status_with_the_server_kits_certificate(kits, formed):
    server, address = formed
    server_kit = load_server_kit(kits / "server")
    site_kit = load_site_kit(kits / "site-1")
    with site_channel(site_kit, address, key=server_kit.key, cert=server_kit.cert) as channel:
        status = stub(channel).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
        assert status.site == "operator" and status.phase == pb.RoundStatus.OPEN
        assert sorted(status.members) == ["site-1", "site-2"]
        assert sorted(a.site for a in status.activity) == ["site-1", "site-2"]
        assert all(a.last_call in ("join", "download") and a.idle_s >= 0 for a in status.activity)
        assert 0 < status.seconds_left <= 3600
        with pytest.raises(grpc.RpcError) as info:
            list(stub(channel).GetGlobalModel(pb.GlobalModelRequest(round=0), timeout=10))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may only call GetRoundStatus" in info.value.details()


def _federation_rss(kits, tmp_path, name: str, attack: bool) -> tuple[int, dict[str, int]]:
    """Runs 3 rounds of site-1 and site-2 (site-3 a member that never submits) against a server process; with
    ``attack``, site-3 keeps 50 idle calls open (header-less update streams and long downloads) and a certificate
    of the federation's CA that names no expected site keeps 50 more. Returns the server's peak RSS and the codes
    the attackers' calls ended with."""
    server = ServerProcess(
        kits,
        tmp_path / f"state-{name}",
        tmp_path / f"server-{name}.log",
        clients="[site-1,site-2,site-3]",
        min_clients=2,
        wait_after_min_s=1,
        round_timeout_s=60,
        initial_model=str(kits / "init.pt"),
    )
    address = f"127.0.0.1:{server.port}"
    process = psutil.Process(server.process.pid)
    peak, stop, codes = [process.memory_info().rss], threading.Event(), {}

    def sample():
        while not stop.is_set():
            try:
                peak.append(process.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.05)

    site_3 = load_site_kit(kits / "site-3")
    mallory = mallory_credentials(kits)
    member = site_channel(site_3, address)
    intruder = site_channel(site_3, address, key=mallory.key_pem, cert=mallory.cert_pem)
    calls: list = []

    def attack_calls():
        """Keeps 50 calls in flight from each attacker, topped up every 0.2 s (bounded traffic)."""
        while not stop.is_set():
            live = [c for c in calls if not c.done()]
            for c in calls:
                if c.done():
                    code = c.code().name
                    codes[code] = codes.get(code, 0) + 1
            calls[:] = live
            mine = sum(1 for c in live if c.mine)
            for i in range(50 - mine):
                if i % 2:
                    c = stub(member).GetGlobalModel(pb.GlobalModelRequest(round=3, max_wait_s=60), timeout=30)
                else:
                    c = stub(member).SubmitUpdate.future(never_sends(stop), timeout=30)
                c.mine = True
                calls.append(c)
            for _ in range(50 - (len(live) - mine)):
                c = stub(intruder).SubmitUpdate.future(never_sends(stop), timeout=30)
                c.mine = False
                calls.append(c)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    attacker = threading.Thread(target=attack_calls, daemon=True)
    try:
        assert not stub(member).Join(join_request(site_3, 0), timeout=10).formed
        sampler.start()
        if attack:
            attacker.start()
            wait_for(lambda: len(calls) >= 100, 10, "the attackers' 100 calls")
        sites = [Site(load_site_kit(kits / n), address) for n in ("site-1", "site-2")]
        run_sites(sites, timeout=60)
        for site in sites:
            for r in (1, 2, 3):
                site.check_round(r, ["site-1", "site-2"])
    finally:
        stop.set()
        attacker.join(10) if attack else None
        sampler.join(5)
        for c in calls:
            c.cancel()
        member.close()
        intruder.close()
        assert server.wait(30) == 0, server.output()
    return max(peak), codes


@pytest.mark.slow
def test_100_idle_streams_do_not_stop_the_others_nor_grow_the_server(kits, tmp_path):
    clean, _ = _federation_rss(kits, tmp_path, "clean", attack=False)
    attacked, codes = _federation_rss(kits, tmp_path, "attacked", attack=True)
    print(f"server peak RSS: clean {clean / 1e6:.1f} MB, attacked {attacked / 1e6:.1f} MB; attackers' calls: {codes}")
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("PERMISSION_DENIED", 0) >= 50
    assert attacked <= 1.2 * clean
