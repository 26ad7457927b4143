"""Bad inputs over real gRPC with mutual TLS: each gets its own status and a message saying what was wrong, and
leaves the server's state (who joined and submitted, the running sum bit for bit) exactly as it was.

One server serves the whole module: site-1 has submitted a good update to round 1, so the sum is not empty and an
undone stream must restore it exactly. Bad streams come from site-2, which has not submitted yet. The last test
lets site-2 and site-3 submit and checks every site decrypts the exact weighted average: nothing of the refused
inputs leaked into it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch

from lightning_fhe.client import AggregatorClient, FederationError, ServerUnavailableError
from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.he.frames import decode_upload_chunk, encode_upload_chunk, upload_chunk_bytes
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.wire import REFUSAL_REASON_METADATA
from lightning_fhe.provision import CertificateAuthority, issue_client_cert, load_site_kit, make_ca
from test_server_support import (
    ENCRYPTED,
    MODEL_STATE,
    PLAINTEXT,
    WEIGHTS,
    Site,
    join_request_for,
    provision_kits,
    site_channel,
    start_server,
    stub,
    update_of,
    weighted_average,
)

SITES = ("site-1", "site-2", "site-3", "site-4")  # site-4 is expected but never joins
MEMBERS = SITES[:3]


class Federation:
    """The module's server, its address and its sites."""

    def __init__(self, kits, server, initial):
        self.kits, self.server, self.initial = kits, server, initial
        self.address = f"127.0.0.1:{server.port}"
        self.sites = {name: Site(load_site_kit(kits / name), self.address) for name in SITES}
        self.clients: dict[str, AggregatorClient] = {}
        self.shares: dict[str, float] = {}

    def snapshot(self):
        return self.server.federation.snapshot()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    kits = provision_kits(tmp / "kits", SITES)
    initial = {k: torch.randn_like(v) for k, v in MODEL_STATE.items()}
    torch.save(initial, tmp / "init.pt")
    server = start_server(
        kits, tmp / "state", rounds=2, min_clients=3, wait_after_min_s=0, initial_model=str(tmp / "init.pt")
    )
    f = Federation(kits, server, initial)
    try:
        infos = {}

        def join(name):
            # Unmasked: the raw requests below carry no masks (masked uploads: test_rounds.py, test_masking_*.py)
            client = f.clients[name] = f.sites[name].client(masking=False)
            infos[name] = client.join(WEIGHTS[name], ENCRYPTED, PLAINTEXT)

        threads = [threading.Thread(target=join, args=(name,)) for name in MEMBERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        f.shares = {name: info.share for name, info in infos.items()}
        assert set(infos) == set(MEMBERS) and infos["site-1"].current_round == 1
        site1 = f.sites["site-1"]
        f.clients["site-1"].fetch_global(0)
        f.clients["site-1"].submit(1, site1.chunks(1, f.shares["site-1"]), update_of("site-1", 1)[1])
        yield f
    finally:
        for client in f.clients.values():
            client.close()
        server.stop()


# -- helpers ---------------------------------------------------------------------------------------------------------


def header(round_number=1, num_chunks=3, plaintext_count=PLAINTEXT.numel):
    return pb.UpdatePart(
        header=pb.UpdateHeader(round=round_number, num_chunks=num_chunks, plaintext_count=plaintext_count)
    )


def plaintext(values):
    return pb.UpdatePart(plaintext=pb.PlaintextBlock(offset=0, float64_le=np.asarray(values, "<f8").tobytes()))


def chunk(index, data):
    return pb.UpdatePart(chunk=pb.Chunk(index=index, data=data))


def good_parts(fed, site="site-2", round_number=1):
    blobs = list(fed.sites[site].chunks(round_number, fed.shares[site]))
    return [header(round_number), plaintext(update_of(site, round_number)[1])] + [
        chunk(i, b) for i, b in enumerate(blobs)
    ]


def refused(fed, parts, site="site-2", kit=None, **channel) -> grpc.RpcError:
    """Sends an update stream that must be refused; checks the server's state did not change."""
    before = fed.snapshot()
    with site_channel(kit or fed.sites[site].kit, fed.address, **channel) as ch:
        with pytest.raises(grpc.RpcError) as info:
            stub(ch).SubmitUpdate(iter(parts), timeout=30)
    assert fed.snapshot() == before, "a refused update changed the server's state"
    return info.value


def reason(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(REFUSAL_REASON_METADATA)


def forged_chunk(good: bytes, edit) -> bytes:
    """A well-framed upload chunk (valid checksum) whose parts ``edit(c0, seed) -> (c0, prng, seed)`` changed."""
    parts = decode_upload_chunk(good, len_n(good), 2**61 - 1)
    c0, prng, seed = edit(parts.c0.copy(), parts.seed)
    return encode_upload_chunk(c0, prng, seed)


def len_n(frame: bytes) -> int:
    return (len(frame) - 70) * 2 // 15


# -- chunks ----------------------------------------------------------------------------------------------------------


def test_corrupt_chunk_bytes(fed):
    parts = good_parts(fed)
    data = bytearray(parts[3].chunk.data)  # chunk 1
    data[len(data) // 2] ^= 0x01
    parts[3] = chunk(1, bytes(data))
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "chunk 1: chunk bytes do not match their checksum: corrupted in transit or storage"
    assert reason(err) == "bad_chunk"


def test_a_ciphertext_made_with_other_parameters(fed):
    other = UpdateCipher(HEContext.generate(CKKSParams(4096, (40, 20, 20), 20)))
    parts = good_parts(fed)
    parts[2] = chunk(0, other.encrypt(np.zeros(10))[0])
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "chunk 0: chunk of 30790 bytes; an upload chunk of N=8192 takes 61510"
    assert reason(err) == "bad_chunk"


def test_a_coefficient_beyond_the_first_prime(fed):
    """Only a ciphertext's coefficients are below q0; anything else would make the sum wrap and decrypt to garbage."""
    parts = good_parts(fed)
    def beyond_q0(c0, seed):
        c0[7] = 2**60 - 1
        return c0, 1, seed

    parts[4] = chunk(2, forged_chunk(parts[4].chunk.data, beyond_q0))
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"chunk 2: coefficient 7 is {2**60 - 1}, not below the first prime ")
    assert reason(err) == "bad_chunk"


@pytest.mark.parametrize(
    "forge, message",
    [
        (lambda data: b"\x01" + data[1:], "chunk 0: chunk format 1; this version reads format 2"),
        (lambda data: forged_chunk(data, lambda c0, seed: (c0, 9, seed)), "chunk 0: chunk names PRNG type 9; SEAL's are (1, 2)"),
    ],
    ids=["format-1", "unknown-prng"],
)
def test_a_chunk_of_another_format(fed, forge, message):
    parts = good_parts(fed)
    parts[2] = chunk(0, forge(parts[2].chunk.data))
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == message


def test_a_wrong_chunk_count(fed):
    err = refused(fed, [header(num_chunks=4)] + good_parts(fed)[1:])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares 4 ciphertext chunks, but round 1 takes 3 (20000 encrypted values, 8192 per chunk)" in err.details()
    assert reason(err) == "chunk_count"


def test_a_stream_that_ends_early(fed):
    err = refused(fed, good_parts(fed)[:-1])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "the update stream ended after 2 of 3 chunks; nothing of it was kept"


def test_chunks_out_of_order(fed):
    parts = good_parts(fed)
    parts[3], parts[4] = parts[4], parts[3]
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "chunk 2 arrived where chunk 1 was expected; chunks must come in order 0..2"
    assert reason(err) == "chunk_order"


def test_an_oversized_chunk_is_refused_before_parsing(fed):
    size = upload_chunk_bytes(fed.sites["site-2"].kit.params.poly_modulus_degree)
    parts = good_parts(fed)
    parts[2] = chunk(0, b"\0" * (size + 1))
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"chunk 0: chunk of {size + 1} bytes; an upload chunk of N=8192 takes {size}"


def test_an_8_mb_message_is_refused_by_grpc_itself(fed):
    parts = good_parts(fed)
    parts[2] = chunk(0, b"\0" * (8 << 20))
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()


def test_a_non_finite_plaintext_value(fed):
    values = update_of("site-2", 1)[1].copy()
    values[7] = np.inf
    parts = good_parts(fed)
    parts[1] = plaintext(values)
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "plaintext value 7 (tensor 'norm.bias'[1]) is inf; values must be finite"


def test_a_huge_finite_plaintext_value(fed):
    # 1e308 is finite, but weighted and summed it would make the global plaintext +-inf.
    values = update_of("site-2", 1)[1].copy()
    values[7] = 1e308
    parts = good_parts(fed)
    parts[1] = plaintext(values)
    err = refused(fed, parts)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err) == "bad_plaintext"
    assert err.details() == (
        "plaintext value 7 (tensor 'norm.bias'[1]) is 1e+308, outside the range the server sums exactly "
        "(|x| < 2^29 = 5.36871e+08); nothing of this update was kept"
    )


# -- rounds and sites ------------------------------------------------------------------------------------------------


def test_a_stale_round(fed):
    err = refused(fed, [header(0, 0, ENCRYPTED.numel + PLAINTEXT.numel)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "round 0 is closed (current round 1)" and reason(err) == "round_closed"


def test_a_future_round(fed):
    err = refused(fed, [header(2)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "round 2 is not open yet (current round 1)" and reason(err) == "round_not_open"


def test_a_duplicate_submission(fed):
    err = refused(fed, good_parts(fed, "site-1"), site="site-1")
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details() == "site 'site-1' already submitted its update for round 1"


def test_a_site_that_never_joined(fed):
    err = refused(fed, [header()], site="site-4")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details().startswith("site 'site-4' never joined: the federation formed with")


def test_a_site_that_never_joined_cannot_join_late(fed):
    before = fed.snapshot()
    with fed.sites["site-4"].client() as client, pytest.raises(FederationError) as info:
        client.join(WEIGHTS["site-4"], ENCRYPTED, PLAINTEXT)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "site 'site-4' is not a member: the federation formed with" in str(info.value)
    assert fed.snapshot() == before


def test_an_unknown_site_name_with_a_certificate_from_our_ca(fed):
    ca_dir = fed.kits / "ca"
    ca = CertificateAuthority.from_pem((ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes())
    mallory = issue_client_cert(ca, "mallory")
    err = refused(fed, [header()], key=mallory.key_pem, cert=mallory.cert_pem)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details().startswith("site 'mallory' is not one of the expected sites (site-1, site-2, site-3, site-4)")


def join_request(fed, **fields):
    return join_request_for(fed.sites["site-2"].kit, **{"weight": WEIGHTS["site-2"], **fields})


def refused_join(fed, request) -> grpc.RpcError:
    before = fed.snapshot()
    with site_channel(fed.sites["site-2"].kit, fed.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            stub(ch).Join(request, timeout=30)
    assert fed.snapshot() == before
    return info.value


def test_a_layout_mismatch(fed):
    other = TensorLayout.from_tensors({"conv.weight": torch.zeros(100, 201)})
    err = refused_join(fed, join_request(fed, encrypted_layout_json=json.dumps(other.to_dict())))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        "layout mismatch: encrypted tensor 0 is 'conv.weight' float32 [100, 201] at this site but 'conv.weight' "
        "float32 [100, 200] in the federation; every site must select the same tensors of the same model"
    )
    assert reason(err) == "mismatch"


def test_an_he_fingerprint_from_another_provisioning_run(fed):
    err = refused_join(fed, join_request(fed, he_fingerprint="0" * 32))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("HE fingerprint mismatch: this site's kit has '000")


def test_a_changed_weight_on_joining_again(fed):
    err = refused_join(fed, join_request(fed, weight=1.0))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "joined with weight 300; it now declares 1, but weights are fixed" in err.details()


def test_a_malformed_layout(fed):
    err = refused_join(fed, join_request(fed, plaintext_layout_json="{nope"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("plaintext_layout_json:")


def test_a_site_with_other_rounds_is_refused_before_anything_is_recorded(fed):
    err = refused_join(fed, join_request(fed, rounds=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err) == "rounds_mismatch"
    assert err.details() == (
        "site 'site-2' means to train 5 rounds, but the server runs 2: give the site rounds=2 (or leave it unset to "
        "take the server's), or restart the server with rounds=5"
    )


@pytest.mark.parametrize(
    "layout, message",
    [
        (
            {"tensors": [["norm.weight", [6], "float32"], ["norm.bias", [-1, 4], "float32"]]},
            "plaintext_layout_json: tensor 1 ('norm.bias'): dimension -1 in shape [-1, 4] is not an integer >= 0",
        ),
        (
            {"tensors": [["big", [10**6, 10**6], "float32"]]},
            "plaintext_layout_json: tensor 0 ('big'): shape [1000000, 1000000] brings the layout to 1000000000000 "
            "values, more than the 2147463648 allowed (the server's max_model_values)",
        ),
    ],
    ids=["negative-dimension", "1e12-values"],
)
def test_an_impossible_layout(fed, layout, message):
    err = refused_join(fed, join_request(fed, plaintext_layout_json=json.dumps(layout)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err) == "bad_layout"
    assert err.details() == message


def test_a_layout_nested_5000_deep(fed):
    err = refused_join(fed, join_request(fed, encrypted_layout_json="[" * 5000 + "]" * 5000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err) == "bad_layout"
    assert err.details() == "encrypted_layout_json: the JSON is nested too deep for a layout"


# -- transport -------------------------------------------------------------------------------------------------------


def test_a_plaintext_connection(fed):
    before = fed.snapshot()
    with grpc.insecure_channel(fed.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            stub(ch).SubmitUpdate(iter(good_parts(fed)), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing reaches the service
    assert fed.snapshot() == before


def test_no_client_certificate(fed):
    before = fed.snapshot()
    credentials = grpc.ssl_channel_credentials(fed.sites["site-2"].kit.ca_cert)
    with grpc.secure_channel(fed.address, credentials) as ch:
        with pytest.raises(grpc.RpcError) as info:
            stub(ch).GetRoundStatus(pb.RoundStatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fed.snapshot() == before


def test_a_certificate_from_another_ca(fed):
    intruder = issue_client_cert(make_ca("intruder"), "site-2")  # the right name, signed by the wrong CA
    err = refused(fed, good_parts(fed), key=intruder.key_pem, cert=intruder.cert_pem)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    kit = fed.sites["site-2"].kit
    stranger = replace(kit, key=intruder.key_pem, cert=intruder.cert_pem)
    with AggregatorClient(stranger, fed.address, retry_budget_s=0.5) as client:
        with pytest.raises(ServerUnavailableError, match="same provisioning run"):
            client.status()


# -- and after all that ----------------------------------------------------------------------------------------------


def test_after_every_refusal_the_round_still_sums_exactly(fed):
    for name in ("site-2", "site-3"):
        site = fed.sites[name]
        fed.clients[name].submit(1, site.chunks(1, fed.shares[name]), update_of(name, 1)[1])
    for name in MEMBERS:
        site = fed.sites[name]
        model = fed.clients[name].fetch_global(1)
        assert sorted(model.participants) == list(MEMBERS)
        expected_enc, expected_plain = weighted_average(MEMBERS, 1)
        decrypted = site.cipher.decrypt(model.encrypted_chunks, ENCRYPTED.numel, model.total_share)
        assert np.abs(decrypted - expected_enc).max() < 1e-6
        np.testing.assert_allclose(model.plaintext, expected_plain, rtol=0, atol=1e-6)  # float32 on the wire
