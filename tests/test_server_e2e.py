"""End to end over real loopback gRPC with mutual TLS and provisioned certificates: 3 sites, 3 rounds."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lightning_fhe.client import AggregatorClient, FederationError
from lightning_fhe.proto.wire import SERVICE_NAME
from lightning_fhe.provision import load_site_kit
from lightning_fhe.server.store import StateStore
from test_server_support import (
    ENCRYPTED,
    MODEL_STATE,
    PLAINTEXT,
    WEIGHTS,
    Site,
    initial_values,
    provision_kits,
    run_sites,
    site_channel,
    start_server,
)

SITES = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("kits"), SITES)


def sites_for(kits, port, names=SITES):
    return [Site(load_site_kit(kits / name), f"127.0.0.1:{port}") for name in names]


def test_three_sites_three_rounds_each_decrypts_the_exact_weighted_average(kits, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_fhe.server")
    server = start_server(kits, tmp_path / "state", rounds=3)
    try:
        sites = sites_for(kits, server.port)
        run_sites(sites)
        assert server.wait(timeout=30) == 0  # exits once every member fetched the last global model
    finally:
        server.stop()
    first = sites[0].models[0]
    for site in sites:
        # Round 0: every site starts from the same weights, those of the first site that joined.
        assert site.models[0].plaintext.tolist() == first.plaintext.tolist()
        assert site.models[0].encrypted_chunks == [] and site.models[0].total_share == 1.0
        for r in (1, 2, 3):
            site.check_round(r, SITES)
            assert site.models[r].total_share == pytest.approx(1.0)
    assert len(first.participants) == 1  # round 0 came from one site: the first that joined
    assert {site.models[3].participants for site in sites} == {sites[0].models[3].participants}
    summaries = [r.getMessage() for r in caplog.records if " closed: " in r.getMessage()]
    assert len(summaries) == 4  # rounds 0..3, one line each
    assert all(" in " in s and " out " in s and " s, stored " in s and "peak RSS" in s for s in summaries)
    assert "round 3 closed: 3/3 sites" in summaries[-1]
    stored = StateStore(tmp_path / "state")
    assert stored.load_federation().last_closed_round == 3 and stored.stored_rounds() == [1, 2, 3]


def test_a_configured_initial_model_is_what_every_site_starts_from(kits, tmp_path):
    state = {k: torch.randn_like(v) for k, v in MODEL_STATE.items()}
    checkpoint = tmp_path / "init.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, checkpoint)  # a Lightning-style checkpoint
    server = start_server(kits, tmp_path / "state", rounds=1, initial_model=str(checkpoint))
    try:
        sites = sites_for(kits, server.port)
        run_sites(sites)
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()
    expected = np.concatenate([ENCRYPTED.flatten(state), PLAINTEXT.flatten(state)])
    for site in sites:
        assert site.models[0].plaintext.tolist() == expected.tolist()
        assert site.models[0].participants == ()
        site.check_round(1, SITES)


def test_health_checking_and_status(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1)
    try:
        kit = load_site_kit(kits / "site-1")
        with site_channel(kit, f"127.0.0.1:{server.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", SERVICE_NAME):
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with AggregatorClient(kit, f"127.0.0.1:{server.port}") as client:
            status = client.status()
        assert status.phase == "forming" and status.current_round == 0 and status.last_closed_round == -1
    finally:
        server.stop()


def test_insecure_mode_names_sites_by_metadata_and_warns(kits, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    server = start_server(kits, tmp_path / "state", insecure=True, rounds=1, clients="[site-1]")
    try:
        assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)
        kit = load_site_kit(kits / "site-1")
        address = f"127.0.0.1:{server.port}"
        with AggregatorClient(kit, address, insecure=True) as client:
            info = client.join(WEIGHTS["site-1"], ENCRYPTED, PLAINTEXT)
            assert info.site == "site-1" and info.members == ("site-1",) and info.share == 1.0
        with grpc.insecure_channel(address) as channel:  # no name at all
            from lightning_fhe.proto import aggregator_pb2 as pb
            from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc

            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.AggregatorStub(channel).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "site_name" in info.value.details()
    finally:
        server.stop()
    with pytest.raises(ValueError, match="only for insecure mode"):
        AggregatorClient(kit, address, site_name="site-2")


def test_client_refuses_updates_that_do_not_match_its_layouts(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1, clients="[site-1]")
    try:
        site = sites_for(kits, server.port, ("site-1",))[0]
        with site.client() as client:
            with pytest.raises(RuntimeError, match="join\\(\\) first"):
                client.submit(1, [], np.zeros(PLAINTEXT.numel))
            info = client.join(WEIGHTS["site-1"], ENCRYPTED, PLAINTEXT)
            with pytest.raises(ValueError, match="plaintext holds 3 values; expected 20010"):
                client.submit(0, [], np.zeros(3))
            client.submit(0, [], initial_values())
            client.fetch_global(0)
            chunks = list(site.chunks(1, info.share))
            with pytest.raises(ValueError, match="yielded 2 chunks; the encrypted layout takes 3"):
                client.submit(1, chunks[:2], np.zeros(PLAINTEXT.numel))
            with pytest.raises(ValueError, match="more than the 3 chunks"):
                client.submit(1, chunks + chunks[:1], np.zeros(PLAINTEXT.numel))

            def failing():
                yield chunks[0]
                raise ArithmeticError("encryption failed at chunk 1")

            with pytest.raises(ArithmeticError, match="encryption failed"):
                client.submit(1, failing(), np.zeros(PLAINTEXT.numel))
            assert client.status().submitted == ()  # none of it was kept
            receipt = client.submit(1, iter(chunks), np.zeros(PLAINTEXT.numel))
            assert receipt.round == 1 and receipt.bytes_sent == sum(map(len, chunks)) + 4 * PLAINTEXT.numel  # float32 model
            assert client.fetch_global(1).participants == ("site-1",)
    finally:
        server.stop()


def test_formation_below_quorum_fails_and_the_sites_are_told(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1, round_timeout_s=1, linger_s=0.5)
    try:
        site = sites_for(kits, server.port, ("site-1",))[0]
        with site.client() as client, pytest.raises(FederationError) as info:
            client.join(WEIGHTS["site-1"], ENCRYPTED, PLAINTEXT)
        assert info.value.code == grpc.StatusCode.ABORTED and info.value.reason == "failed"
        assert "the federation could not form: timeout_s=1 passed with 1 of 3 site(s); min_clients is 2" in str(
            info.value
        )
        assert server.wait(timeout=30) == 1
    finally:
        server.stop()
