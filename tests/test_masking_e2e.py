"""Masked federations end to end: exactness against unmasked and raw ones, and a server that substitutes a key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
import torch
from test_federation_e2e import ROUNDS, federate, federated_names
from test_server_support import (
    Site,
    join_request_for,
    provision_kits,
    run_sites,
    site_channel,
    start_server,
    stub,
)

from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.provision import load_site_kit

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("kits"), SITES)


def test_masked_he_unmasked_he_and_raw_give_the_same_global_model_bit_for_bit(kits, tmp_path):
    settings = {
        "masked": ["--masking", "true"],
        "unmasked": ["--masking", "false"],
        "raw": ["--encrypt", "none"],
    }
    for name in settings:
        (tmp_path / name).mkdir()
    # One federation per setting, at once (each its own server and state); one cipher worker per site.
    with ThreadPoolExecutor(len(settings)) as pool:
        runs = {
            name: pool.submit(
                federate,
                kits,
                tmp_path / name,
                {site: ["--seed", str(i), "--he-workers", "1", *args] for i, site in enumerate(SITES)},
            )
            for name, args in settings.items()
        }
        results = {name: run.result() for name, run in runs.items()}
    history = results["masked"]["site-1"]["history"]
    assert all(sorted(h["participants"]) == list(SITES) for h in history)
    for epoch in range(ROUNDS):
        after = {name: result["site-1"]["records"][epoch]["after"] for name, result in results.items()}
        for tensor in federated_names(after["raw"]):
            torch.testing.assert_close(after["masked"][tensor], after["raw"][tensor], rtol=0, atol=0)
            torch.testing.assert_close(after["unmasked"][tensor], after["raw"][tensor], rtol=0, atol=0)
        for site in SITES[1:]:  # every site of the masked federation holds the same model
            other = results["masked"][site]["records"][epoch]["after"]
            for tensor in federated_names(other):
                assert torch.equal(other[tensor], after["masked"][tensor])


def test_a_server_that_substitutes_a_mask_key_is_caught_by_every_site_before_any_upload(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1, min_clients=3)
    federation = server.federation
    honest_join = federation.join
    forged = bytes(range(32))  # the key a lying server would hold the private half of

    def lying_join(*args, **kwargs):
        result = honest_join(*args, **kwargs)
        keys = tuple(replace(k, public_key=forged) if k.site == "site-3" else k for k in result.mask_keys)
        return replace(result, mask_keys=keys)

    federation.join = lying_join
    try:
        sites = [Site(load_site_kit(kits / name), f"127.0.0.1:{server.port}") for name in SITES]
        with pytest.raises(AssertionError):
            run_sites(sites, timeout=60)
        for site in sites:
            assert site.error is not None and "site-3" in str(site.error), (site.name, site.error)
            assert "substituted" in str(site.error), str(site.error)
            assert not site.models  # not even the initial model was sent or fetched
        assert federation.last_closed_round == -1 and federation.uploads_in_progress() == {}
        assert federation.round is not None and federation.round.participants == ()
    finally:
        server.stop()


def test_a_join_with_a_mask_key_of_impossible_form_is_refused_over_grpc(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1)
    kit = load_site_kit(kits / "site-1")
    request = join_request_for(
        kit,
        mask_key=pb.MaskAnnouncement(site="site-1", certificate=kit.cert, public_key=bytes(31), signature=bytes(70)),
    )
    try:
        with site_channel(kit, f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as info:
            stub(channel).Join(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "site 'site-1': the mask key takes 32 bytes (X25519), got 31"
        assert server.federation.status("site-1").joined == ()
    finally:
        server.stop()
