"""The server's state and its inputs: what it keeps on disk (checksums, permissions, restart after the last round)
and what it accepts into it (layouts, weights, plaintext values, shares, rounds).

Pure pieces are tested directly; the federation with a fake clock and real CKKS ciphertexts; a restart after the
last round and damaged files with a real server process; an impossible layout over real mutual-TLS gRPC.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from lightning_fhe.he.layout import LayoutError, TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.wire import REFUSAL_REASON_METADATA
from lightning_fhe.provision import load_site_kit
from lightning_fhe.server.accumulator import Aggregate
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.membership import Formation, SiteDeclaration, check_identity
from lightning_fhe.server.messages import Phase
from lightning_fhe.server.rounds import QuorumRule
from lightning_fhe.server.store import StateError, StateStore
from test_server_federation import ENCRYPTED as ENCRYPTED_F
from test_server_federation import PLAINTEXT as PLAINTEXT_F
from test_server_federation import (  # noqa: F401 - cipher is a fixture
    SITES,
    FakeClock,
    cipher,
    declaration,
    form,
    make_federation,
    submit,
    update_parts,
)
from test_server_support import (
    ENCRYPTED,
    WEIGHTS,
    ServerProcess,
    Site,
    join_request_for,
    provision_kits,
    run_sites,
    site_channel,
    start_server,
    status_of,
    stub,
    wait_for,
)

EMPTY = TensorLayout(())


@pytest.fixture()
def clock():
    return FakeClock()


def layout_json(*tensors) -> str:
    return json.dumps({"tensors": [list(t) for t in tensors]})


# -- layouts (defect 4) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            layout_json(["a", [2], "float32"], ["conv.weight", [3, -1], "float32"]),
            "tensor 1 ('conv.weight'): dimension -1 in shape [3, -1] is not an integer >= 0",
        ),
        (layout_json(["a", [10**12], "float32"]), "tensor 0 ('a'): shape [1000000000000] brings the layout to"),
        (layout_json(["a", [2, True], "float32"]), "tensor 0 ('a'): dimension True"),
        (layout_json(["a", [2.0], "float32"]), "tensor 0 ('a'): dimension 2.0"),
        (layout_json(["", [2], "float32"]), "tensor 0: the name must be a non-empty string"),
        (layout_json(["a" * 2000, [2], "float32"]), "tensor 0: the name must be a non-empty string"),
        (layout_json(["a", [2], "float32"], ["a", [3], "float32"]), "tensor 1 ('a'): the name appears twice"),
        (layout_json(["a", [2], "int64"]), "tensor 0 ('a'): unsupported dtype 'int64'"),
        (layout_json(["a", [2]]), "tensor 0: expected [name, shape, dtype]"),
        (json.dumps({"tensors": [], "extra": 1}), 'expected {"tensors": [[name, shape, dtype], ...]}'),
        ("[" * 5000 + "]" * 5000, "the JSON is nested too deep for a layout"),
        ('{"tensors": [' + ",".join(['["x", [1], "float32"]'] * 250_000) + "]}", "characters of JSON, more than"),
        ("{nope", "not JSON"),
    ],
    ids=[
        "negative",
        "1e12",
        "bool",
        "float",
        "empty-name",
        "long-name",
        "duplicate",
        "dtype",
        "entry",
        "extra-key",
        "deep",
        "huge-json",
        "not-json",
    ],
)
def test_impossible_layouts_are_refused_naming_the_tensor(text, message):
    with pytest.raises(LayoutError) as info:
        TensorLayout.from_json(text)
    assert message in str(info.value)


def test_the_size_limit_counts_every_tensor():
    text = layout_json(["a", [6, 10], "float32"], ["b", [50], "float16"])
    assert TensorLayout.from_json(text, max_values=110).numel == 110
    with pytest.raises(LayoutError, match=r"tensor 1 \('b'\): shape \[50\] brings the layout to 110 values, more than"):
        TensorLayout.from_json(text, max_values=109)
    assert TensorLayout.from_json("") == EMPTY
    assert TensorLayout.from_json(layout_json(["s", [], "float64"], ["z", [0, 3], "float32"])).numel == 1


def test_an_impossible_layout_over_grpc_is_refused_and_nothing_is_stored(tmp_path):
    kits = provision_kits(tmp_path / "kits", ("site-1", "site-2"))
    state = tmp_path / "state"
    server = start_server(kits, state, min_clients=1, wait_after_min_s=0, rounds=1)
    address = f"127.0.0.1:{server.port}"
    kit = load_site_kit(kits / "site-1")
    try:
        for bad in (
            layout_json(["conv.weight", [100, -200], "float32"]),
            layout_json(["conv.weight", [10**12], "float32"]),
            "[" * 5000 + "]" * 5000,
        ):
            request = pb.JoinRequest(
                weight=1.0,
                encrypted_layout_json=bad,
                he_fingerprint=kit.he_fingerprint,
                params_fingerprint=kit.params.fingerprint(),
            )
            with site_channel(kit, address) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    stub(channel).Join(request, timeout=30)
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert err.details().startswith("encrypted_layout_json: ")
            assert dict(err.trailing_metadata())[REFUSAL_REASON_METADATA] == Reason.BAD_LAYOUT.value
            assert server.federation.phase is Phase.FORMING and not server.federation.formation.joined
        assert not (state / "federation.json").exists()
    finally:
        server.stop()
    # The state_dir is still good: a restarted server forms and runs a federation.
    server = start_server(kits, state, min_clients=2, wait_after_min_s=0, rounds=1)
    try:
        sites = [Site(load_site_kit(kits / s), f"127.0.0.1:{server.port}") for s in ("site-1", "site-2")]
        run_sites(sites, timeout=120)
        sites[0].check_round(1, ["site-1", "site-2"])
        # An aggregate edited on disk is not served: DATA_LOSS, naming the file.
        _edit_header(state / "round-0001.agg", total_share=0.5)
        with site_channel(sites[0].kit, sites[0].address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                list(stub(channel).GetGlobalModel(pb.GlobalModelRequest(round=1), timeout=30))
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert "round-0001.agg: the header does not match its checksum" in info.value.details()
    finally:
        server.stop()


# -- weights (defect 5) ----------------------------------------------------------------------------------------------


def test_weights_whose_total_overflows_are_refused_at_join(server_context, clock):
    params = server_context.params.fingerprint()
    formation = Formation(("a", "b"), QuorumRule(2, 0.0, 60.0), 0.0, "f", params)
    formation.join("a", SiteDeclaration(1e308, EMPTY, EMPTY, "f", params), now=1.0)
    with pytest.raises(Refusal) as info:
        formation.join("b", SiteDeclaration(1e308, EMPTY, EMPTY, "f", params), now=1.0)
    assert info.value.status is Status.INVALID_ARGUMENT and info.value.reason is Reason.BAD_REQUEST
    assert "weight 1e+308 of site 'b' is too large" in info.value.message and "overflows" in info.value.message
    assert list(formation.joined) == ["a"]
    # A share that would round to 0 is refused too: that member's update would vanish from the average.
    with pytest.raises(Refusal, match="leaves a share w_i/W of 0"):
        formation.join("b", SiteDeclaration(5e-324, EMPTY, EMPTY, "f", params), now=1.0)
    formation.join("b", SiteDeclaration(1e307, EMPTY, EMPTY, "f", params), now=1.0)
    assert math.isfinite(formation.close(server_has_initial_model=False).total_weight)


def test_a_federation_whose_weights_would_overflow_still_forms_or_fails_by_its_deadline(
    tmp_path, server_context, clock
):
    fed = make_federation(tmp_path, server_context, clock, min_clients=2, round_timeout_s=100.0)
    big = SiteDeclaration(1e308, ENCRYPTED_F, PLAINTEXT_F, "he-fp", server_context.params.fingerprint())
    fed.join("a", big)
    with pytest.raises(Refusal) as info:
        fed.join("b", big)
    assert info.value.status is Status.INVALID_ARGUMENT
    assert fed.phase is Phase.FORMING and list(fed.formation.joined) == ["a"]
    clock.now += 101.0
    fed.tick()
    assert fed.phase is Phase.FAILED and "could not form" in fed.failure


def test_an_error_while_formation_closes_fails_the_federation_instead_of_hanging(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock, min_clients=2, wait_after_min_s=0.0)
    big = SiteDeclaration(1e308, ENCRYPTED_F, PLAINTEXT_F, "he-fp", server_context.params.fingerprint())
    fed.join("a", big)
    fed.formation.joined["b"] = (big, clock.now)  # as if a check had let it through: W overflows at close
    fed.tick()
    assert fed.phase is Phase.FAILED and fed.failure.startswith("the federation could not form: weight 1e+308")
    with pytest.raises(Refusal) as info:
        fed.join("c", declaration("c", server_context))
    assert info.value.status is Status.ABORTED


def test_weights_that_overflow_are_refused_over_grpc(tmp_path):
    kits = provision_kits(tmp_path / "kits", ("site-1", "site-2"))
    server = start_server(kits, tmp_path / "state", min_clients=2, wait_after_min_s=0, rounds=1)
    try:
        address = f"127.0.0.1:{server.port}"
        results = {}
        for name in ("site-1", "site-2"):
            kit = load_site_kit(kits / name)
            request = join_request_for(kit, weight=1e308)
            with site_channel(kit, address) as channel:
                try:
                    results[name] = stub(channel).Join(request, timeout=30)
                except grpc.RpcError as err:
                    results[name] = err
        assert not results["site-1"].formed
        err = results["site-2"]
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "weight 1e+308 of site 'site-2' is too large" in err.details()
        assert server.federation.phase is Phase.FORMING
    finally:
        server.stop()


# -- rounds (defect 14, the server's half) ---------------------------------------------------------------------------


def test_a_rounds_mismatch_is_refused_by_check_identity(server_context):
    params = server_context.params.fingerprint()
    ten = SiteDeclaration(1.0, EMPTY, EMPTY, "f", params, rounds=10)
    with pytest.raises(Refusal) as info:
        check_identity("a", ten, ("a",), "f", params, rounds=3)
    assert info.value.status is Status.FAILED_PRECONDITION and info.value.reason is Reason.ROUNDS_MISMATCH
    assert "10 rounds, but the server runs 3" in info.value.message
    check_identity("a", ten, ("a",), "f", params, rounds=10)
    check_identity("a", SiteDeclaration(1.0, EMPTY, EMPTY, "f", params), ("a",), "f", params, rounds=3)  # 0: any


def test_a_rounds_mismatch_is_refused_before_the_join_is_recorded(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)  # rounds=2
    with pytest.raises(Refusal) as info:
        fed.join("a", SiteDeclaration(1.0, ENCRYPTED_F, PLAINTEXT_F, "he-fp", server_context.params.fingerprint(), 7))
    assert info.value.reason is Reason.ROUNDS_MISMATCH
    assert not fed.formation.joined


# -- the store: checksums and permissions (defects 7 and 11) ---------------------------------------------------------


def finished_federation(tmp_path, server_context, clock, cipher, **options):
    """A federation (of ``test_server_federation``'s sites and layouts) that ran all its rounds, every aggregate
    kept."""
    fed = make_federation(tmp_path, server_context, clock, keep_rounds=0, **options)
    form(fed, server_context)
    fed.submit("a", update_parts(0, [], np.zeros(ENCRYPTED_F.numel + PLAINTEXT_F.numel)))
    for r in range(1, fed.config.rounds + 1):
        for s in SITES:
            submit(fed, cipher, s, r)
    assert fed.phase is Phase.FINISHED
    return fed


def test_state_dir_is_made_private_and_files_are_written_0600(tmp_path, server_context, clock, cipher):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    old = os.umask(0)
    try:
        finished_federation(tmp_path, server_context, clock, cipher)
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = sorted(p.name for p in state.iterdir())
    assert "federation.json" in files and "round-0002.agg" in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {name: 0o600 for name in files}


def test_an_edited_member_weight_is_refused_at_start(tmp_path, server_context, clock, cipher):
    fed = finished_federation(tmp_path, server_context, clock, cipher)
    path = fed.store.root / "federation.json"
    data = json.loads(path.read_text())
    data["members"][0]["weight"] = 100.0
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(StateError, match=r"federation.json: does not match its checksum; it was edited or is corrupt"):
        make_federation(tmp_path, server_context, clock)


def _edit_header(path: Path, **fields) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12 : 12 + size])
    header.update(fields)
    new = json.dumps(header).encode()
    path.write_bytes(raw[:8] + struct.pack("<I", len(new)) + new + raw[12 + size :])


def test_an_edited_total_share_is_refused_at_start_and_on_download(tmp_path, server_context, clock, cipher):
    fed = finished_federation(tmp_path, server_context, clock, cipher, rounds=2)
    _edit_header(fed.store.aggregate_path(1), total_share=0.5)
    with pytest.raises(Refusal) as info:
        fed.open_global("a", 1)
    assert info.value.status is Status.DATA_LOSS and info.value.reason is Reason.DATA_LOSS
    assert "round-0001.agg: the header does not match its checksum" in info.value.message
    with pytest.raises(StateError, match=r"round-0001.agg: the header does not match its checksum"):
        make_federation(tmp_path, server_context, clock)


def test_a_flipped_body_byte_is_found_before_the_last_block_is_served(tmp_path, server_context, clock, cipher):
    fed = finished_federation(tmp_path, server_context, clock, cipher)
    path = fed.store.aggregate_path(2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # the plaintext average
    path.write_bytes(bytes(raw))
    with fed.open_global("a", 2) as reader:
        list(reader.iter_chunks())
        with pytest.raises(StateError, match="do not match their checksum"):
            list(reader.iter_plaintext(1))
    with pytest.raises(StateError, match=r"round-0002.agg: the chunks and plaintext do not match their checksum"):
        make_federation(tmp_path, server_context, clock)


def test_the_store_round_trips_an_aggregate(tmp_path):
    store = StateStore(tmp_path / "s")
    store.prepare()
    aggregate = Aggregate(4, [b"abc", b"de"], np.array([1.5, -2.0]), 0.75, ("x", "y"))
    store.write_aggregate(aggregate)
    with store.open_aggregate(4) as reader:
        got = reader.read()
    assert got.encrypted_chunks == [b"abc", b"de"] and got.plaintext.tolist() == [1.5, -2.0]
    assert (got.total_share, got.participants) == (0.75, ("x", "y"))


# -- restart after the last round (defect 3) -------------------------------------------------------------------------


def test_a_finished_federation_restarts_finished(tmp_path, server_context, clock, cipher):
    fed = finished_federation(tmp_path, server_context, clock, cipher)
    again = make_federation(tmp_path, server_context, clock)
    assert again.phase is Phase.FINISHED and again.last_closed_round == 2
    with again.open_global("b", 2) as reader:
        assert reader.read().participants == fed.open_global("b", 2).header.participants


def test_raising_rounds_on_a_finished_federation_is_refused(tmp_path, server_context, clock, cipher):
    finished_federation(tmp_path, server_context, clock, cipher)  # rounds=2
    with pytest.raises(StateError, match=r"finished its 2 rounds; this server is configured with rounds=5"):
        make_federation(tmp_path, server_context, clock, rounds=5)


def test_planted_and_mislabelled_aggregates_are_refused(tmp_path, server_context, clock, cipher):
    fed = finished_federation(tmp_path, server_context, clock, cipher)
    root = fed.store.root
    (root / "round-0099.agg").write_bytes((root / "round-0002.agg").read_bytes())
    with pytest.raises(StateError, match=r"round-0099.agg is beyond what this federation closed"):
        make_federation(tmp_path, server_context, clock)
    (root / "round-0099.agg").unlink()
    (root / "round-0002.agg").write_bytes((root / "round-0001.agg").read_bytes())
    with pytest.raises(StateError, match=r"round-0002.agg: its header says round 1; the file was renamed or planted"):
        make_federation(tmp_path, server_context, clock)


@pytest.mark.slow
def test_a_server_killed_while_lingering_restarts_and_serves_the_last_model(tmp_path):
    kits = provision_kits(tmp_path / "kits", ("site-1", "site-2"))
    state, log = tmp_path / "state", tmp_path / "server.log"
    options = dict(min_clients=2, wait_after_min_s=0, rounds=1, linger_s=600)
    server = ServerProcess(kits, state, log, **options)
    try:
        address = f"127.0.0.1:{server.port}"
        # Only site-1 fetches the last model, so the server lingers for site-2.
        sites = [Site(load_site_kit(kits / s), address) for s in ("site-1", "site-2")]
        run_sites(sites, timeout=120)
        wait_for(lambda: "federation finished" in server.output(), 30, "the last round to close")
        assert server.process.poll() is None
        expected = sites[0].decrypted[1]
    finally:
        server.kill()
    restarted = ServerProcess(kits, state, log, **options)
    try:
        site = Site(load_site_kit(kits / "site-2"), f"127.0.0.1:{restarted.port}")
        status = status_of(site.kit, site.address)
        assert status.phase == pb.RoundStatus.FINISHED and status.last_closed_round == 1
        with site.client() as client:
            model = client.fetch_global(1)
        decrypted = site.cipher.decrypt(model.encrypted_chunks, ENCRYPTED.numel, model.total_share)
        assert np.array_equal(decrypted, expected) and sorted(model.participants) == ["site-1", "site-2"]
        assert "RuntimeError" not in restarted.output()
    finally:
        restarted.kill()


@pytest.mark.slow
def test_a_server_with_an_edited_state_file_exits_1_with_one_error_line(tmp_path):
    kits = provision_kits(tmp_path / "kits", ("site-1", "site-2"))
    state, log = tmp_path / "state", tmp_path / "server.log"
    server = ServerProcess(kits, state, log, min_clients=2, wait_after_min_s=0, rounds=1)
    try:
        sites = [Site(load_site_kit(kits / s), f"127.0.0.1:{server.port}") for s in ("site-1", "site-2")]
        run_sites(sites, timeout=120)
        assert server.wait(60) == 0
    finally:
        if server.process.poll() is None:
            server.kill()
    path = state / "federation.json"
    data = json.loads(path.read_text())
    data["members"][1]["weight"] = WEIGHTS["site-2"] * 2
    path.write_text(json.dumps(data, indent=1))
    log.write_text("")
    with pytest.raises(AssertionError, match="exited with 1"):
        ServerProcess(kits, state, log, min_clients=2, rounds=1)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "federation.json: does not match its checksum" in errors[0], log.read_text()
    assert "Traceback" not in log.read_text()
