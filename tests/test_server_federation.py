"""The federation coordinator without a network: formation, rounds, exclusion, failure, restart, with a fake clock
and real CKKS ciphertexts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.server.config import ServerConfig
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.federation import Federation
from lightning_fhe.server.membership import SiteDeclaration
from lightning_fhe.server.messages import ChunkPart, Phase, PlaintextPart, StatusView, UploadHeader
from lightning_fhe.server.store import StateError, StateStore

ENCRYPTED = TensorLayout((TensorSpec("w", (100, 100), "float32"),))  # 10,000 values: 2 chunks
PLAINTEXT = TensorLayout((TensorSpec("b", (4,), "float32"),))
SITES = ("a", "b", "c")
WEIGHTS = {"a": 1.0, "b": 2.0, "c": 5.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock():
    return FakeClock()


def make_federation(tmp_path, server_context, clock, initial_state=None, **options) -> Federation:
    defaults = dict(rounds=2, min_clients=2, wait_after_min_s=10.0, round_timeout_s=100.0, linger_s=5.0)
    config = ServerConfig(**{**defaults, **options}).with_kit(SITES, 0)
    return Federation(config, server_context, "he-fp", "test", StateStore(tmp_path / "state"), initial_state, clock)


def declaration(site, server_context):
    return SiteDeclaration(WEIGHTS[site], ENCRYPTED, PLAINTEXT, "he-fp", server_context.params.fingerprint())


def update_parts(round_number, chunks, plaintext):
    yield UploadHeader(round_number, len(chunks), plaintext.size)
    yield PlaintextPart(0, np.asarray(plaintext, "<f8").tobytes())
    for i, blob in enumerate(chunks):
        yield ChunkPart(i, blob)


@pytest.fixture(scope="module")
def cipher(site_context):
    return UpdateCipher(site_context)


def values_of(site, round_number):
    rng = np.random.default_rng([ord(site), round_number])
    return rng.normal(0, 0.1, ENCRYPTED.numel), rng.normal(0, 1, PLAINTEXT.numel)


def submit(fed, cipher, site, round_number):
    encrypted, plaintext = values_of(site, round_number)
    share = fed.membership.share(site)
    return fed.submit(site, update_parts(round_number, cipher.encrypt(encrypted, share), plaintext))


def form(fed, server_context, sites=SITES):
    results = [fed.join(s, declaration(s, server_context)) for s in sites]
    return results


def refusal(call, *args, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args, **kwargs)
    return info.value


def test_a_federation_runs_from_formation_to_the_last_round(tmp_path, server_context, cipher, clock):
    fed = make_federation(tmp_path, server_context, clock)
    results = form(fed, server_context)
    assert [r.formed for r in results] == [False, False, True]  # the third join closes formation (all arrived)
    info = fed.join("a", declaration("a", server_context))
    assert info.formed and info.members == SITES and info.total_weight == 8.0 and info.share == 1 / 8
    assert info.send_initial_model and info.current_round == 1
    assert not fed.join("b", declaration("b", server_context)).send_initial_model

    initial = np.concatenate(values_of("a", 0))
    fed.submit("a", iter([UploadHeader(0, 0, initial.size), PlaintextPart(0, initial.tobytes())]))
    with fed.open_global("c", 0) as reader:
        round0 = reader.read()
    assert round0.plaintext.tolist() == initial.tolist() and round0.participants == ("a",)

    for r in (1, 2):
        for site in SITES:
            submit(fed, cipher, site, r)
        with fed.open_global("b", r) as reader:
            aggregate = reader.read()
        assert aggregate.participants == SITES and aggregate.total_share == pytest.approx(1.0)
        expected_enc = sum(WEIGHTS[s] / 8 * values_of(s, r)[0] for s in SITES)
        expected_plain = sum(WEIGHTS[s] / 8 * values_of(s, r)[1] for s in SITES)
        decrypted = cipher.decrypt(aggregate.encrypted_chunks, ENCRYPTED.numel, aggregate.total_share)
        assert np.abs(decrypted - expected_enc).max() < 1e-6
        np.testing.assert_allclose(aggregate.plaintext, expected_plain, atol=2.0**-cipher.params.grid_bits)
    assert fed.phase is Phase.FINISHED and fed.current_round == 3
    assert fed.exit_code() is None
    for site in SITES:
        fed.note_download(site, 2, 100, complete=True)
    assert fed.exit_code() == 0


def test_the_configured_initial_model_is_round_0(tmp_path, server_context, clock):
    state = {"w": torch.full((100, 100), 0.5), "b": torch.arange(4, dtype=torch.float32), "extra": torch.zeros(1)}
    fed = make_federation(tmp_path, server_context, clock, initial_state=state, initial_model="init.pt")
    infos = form(fed, server_context)
    assert not infos[-1].send_initial_model and fed.current_round == 1
    with fed.open_global("a", 0) as reader:
        round0 = reader.read()
    assert round0.plaintext.tolist() == [0.5] * 10_000 + [0.0, 1.0, 2.0, 3.0]


def test_an_initial_model_that_does_not_fit_refuses_the_first_join(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock, initial_state={"w": torch.zeros(3)}, initial_model="init.pt")
    err = refusal(fed.join, "a", declaration("a", server_context))
    assert err.status is Status.FAILED_PRECONDITION and "initial_model init.pt does not fit" in str(err)
    assert fed.snapshot()[-1] == ()  # nobody joined


def test_the_lone_first_site_joining_again_with_other_layouts_is_checked_against_the_initial_model(
    tmp_path, server_context, clock
):
    state = {"w": torch.full((100, 100), 0.5), "b": torch.arange(4, dtype=torch.float32)}
    fed = make_federation(tmp_path, server_context, clock, initial_state=state, initial_model="init.pt")
    fed.join("a", declaration("a", server_context))
    fed.join("a", declaration("a", server_context))  # asking again with the same layouts
    other_model = TensorLayout((TensorSpec("v", (3,), "float32"),))
    restarted = replace(declaration("a", server_context), encrypted_layout=other_model)
    err = refusal(fed.join, "a", restarted)
    assert err.status is Status.FAILED_PRECONDITION and "initial_model init.pt does not fit" in str(err)
    form(fed, server_context, ("a", "b", "c"))
    with fed.open_global("a", 0) as reader:
        assert reader.read().plaintext.tolist() == [0.5] * 10_000 + [0.0, 1.0, 2.0, 3.0]


def test_formation_closes_at_quorum_plus_grace_and_fixes_w(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    form(fed, server_context, ("c", "a"))
    clock.now += 9.9
    fed.tick()
    assert fed.phase is Phase.FORMING
    clock.now += 0.1
    fed.tick()
    assert fed.membership.members == ("c", "a") and fed.membership.total_weight == 6.0
    err = refusal(fed.join, "b", declaration("b", server_context))
    assert err.status is Status.PERMISSION_DENIED and "formed with c, a" in str(err)
    err = refusal(fed.submit, "b", iter([UploadHeader(1, 2, 4)]))
    assert err.status is Status.PERMISSION_DENIED and "never joined" in str(err)


def test_formation_fails_below_quorum_and_joins_are_told(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    fed.join("a", declaration("a", server_context))
    clock.now += 100
    fed.tick()
    assert fed.phase is Phase.FAILED
    err = refusal(fed.join, "b", declaration("b", server_context))
    assert err.status is Status.ABORTED and "could not form" in str(err) and "joined: a" in str(err)
    clock.now += 5
    assert fed.exit_code() == 1


def formed(tmp_path, server_context, clock, **options):
    """A federation past round 0 (the initial model from site a), round 1 open."""
    fed = make_federation(tmp_path, server_context, clock, **options)
    form(fed, server_context)
    initial = np.zeros(ENCRYPTED.numel + PLAINTEXT.numel)
    fed.submit("a", iter([UploadHeader(0, 0, initial.size), PlaintextPart(0, initial.tobytes())]))
    assert fed.current_round == 1
    return fed


def test_a_round_closes_at_quorum_plus_grace_without_the_missing_site(tmp_path, server_context, cipher, clock):
    fed = formed(tmp_path, server_context, clock)
    submit(fed, cipher, "a", 1)
    submit(fed, cipher, "c", 1)
    status = fed.status("b")
    assert status.submitted == ("a", "c") and not status.this_site_submitted
    clock.now += 10
    fed.tick()
    with fed.open_global("b", 1) as reader:
        aggregate = reader.read()
    assert aggregate.participants == ("a", "c") and aggregate.total_share == pytest.approx(6 / 8)
    expected = (values_of("a", 1)[0] * 1 + values_of("c", 1)[0] * 5) / 6
    decrypted = cipher.decrypt(aggregate.encrypted_chunks, ENCRYPTED.numel, aggregate.total_share)
    assert np.abs(decrypted - expected).max() < 1e-6
    err = refusal(submit, fed, cipher, "b", 1)  # late
    assert err.status is Status.FAILED_PRECONDITION and str(err) == "round 1 is closed (current round 2)"


def test_an_upload_in_flight_when_the_round_closes_is_excluded_exactly(tmp_path, server_context, cipher, clock):
    fed = formed(tmp_path, server_context, clock)
    submit(fed, cipher, "a", 1)
    submit(fed, cipher, "c", 1)
    encrypted, plaintext = values_of("b", 1)
    parts = update_parts(1, cipher.encrypt(encrypted, fed.membership.share("b")), plaintext)

    def slow_parts():
        for i, part in enumerate(parts):
            if i == 3:  # header, plaintext and chunk 0 are in: the grace period ends now
                clock.now += 10
                fed.tick()
            yield part

    err = refusal(fed.submit, "b", slow_parts())
    assert err.status is Status.FAILED_PRECONDITION and "round 1 closed while this update was arriving" in str(err)
    with fed.open_global("b", 1) as reader:
        aggregate = reader.read()
    assert aggregate.participants == ("a", "c")
    expected = (values_of("a", 1)[0] * 1 + values_of("c", 1)[0] * 5) / 6
    decrypted = cipher.decrypt(aggregate.encrypted_chunks, ENCRYPTED.numel, aggregate.total_share)
    assert np.abs(decrypted - expected).max() < 1e-6


def test_a_round_below_quorum_fails_and_downloads_are_told(tmp_path, server_context, cipher, clock):
    fed = formed(tmp_path, server_context, clock)
    submit(fed, cipher, "a", 1)
    clock.now += 100
    fed.tick()
    err = refusal(fed.open_global, "a", 1)
    assert err.status is Status.ABORTED and err.reason is Reason.FAILED
    assert "round 1 failed: timeout_s=100 passed with 1 of 3 site(s); min_clients is 2 (submitted: a)" == str(err)
    assert fed.status("a").failure == str(err)


def test_a_download_of_an_open_round_returns_the_status_after_the_wait(tmp_path, server_context, cipher, clock):
    fed = formed(tmp_path, server_context, clock)
    submit(fed, cipher, "a", 1)
    pending = fed.open_global("a", 1, max_wait_s=0.0)
    assert isinstance(pending, StatusView) and pending.this_site_submitted and pending.current_round == 1


@pytest.mark.parametrize(
    "site, header, status, words",
    [
        ("a", UploadHeader(0, 0, 10_004), Status.FAILED_PRECONDITION, "round 0 is closed (current round 1)"),
        ("a", UploadHeader(2, 2, 4), Status.FAILED_PRECONDITION, "round 2 is not open yet (current round 1)"),
        ("a", UploadHeader(9, 2, 4), Status.INVALID_ARGUMENT, "round 9 does not exist"),
        ("a", UploadHeader(1, 3, 4), Status.INVALID_ARGUMENT, "declares 3 ciphertext chunks, but round 1 takes 2"),
        ("a", UploadHeader(1, 2, 5), Status.INVALID_ARGUMENT, "declares 5 plaintext values, but there are 4"),
        ("z", UploadHeader(1, 2, 4), Status.PERMISSION_DENIED, "'z' is not one of the expected sites"),
    ],
)
def test_a_bad_header_is_refused_before_anything_is_read(tmp_path, server_context, clock, site, header, status, words):
    fed = formed(tmp_path, server_context, clock)
    before = fed.snapshot()
    err = refusal(fed.submit, site, iter([header]))
    assert err.status is status and words in str(err)
    assert fed.snapshot() == before


def test_a_restarted_federation_resumes_and_forgets_the_open_rounds_submissions(
    tmp_path, server_context, cipher, clock
):
    fed = formed(tmp_path, server_context, clock)
    for site in SITES:
        submit(fed, cipher, site, 1)
    submit(fed, cipher, "a", 2)  # round 2 open, a's update recorded in memory only
    restarted = make_federation(tmp_path, server_context, clock)
    assert restarted.phase is Phase.OPEN and restarted.current_round == 2 and restarted.last_closed_round == 1
    status = restarted.status("a")
    assert not status.this_site_submitted  # the site must resubmit; its client does so by itself
    assert restarted.join("a", declaration("a", server_context)).current_round == 2
    with restarted.open_global("a", 1) as reader:
        assert reader.read().participants == SITES
    for site in SITES:
        submit(restarted, cipher, site, 2)
    assert restarted.phase is Phase.FINISHED


def test_a_restart_before_the_initial_model_arrived_waits_for_it_again(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    form(fed, server_context)
    restarted = make_federation(tmp_path, server_context, clock)
    assert restarted.current_round == 0
    assert restarted.join("a", declaration("a", server_context)).send_initial_model


def test_state_from_another_federation_is_refused(tmp_path, server_context, clock):
    formed(tmp_path, server_context, clock)
    config = ServerConfig(rounds=2).with_kit(SITES, 0)
    with pytest.raises(StateError, match="belongs to a federation with HE fingerprint he-fp"):
        Federation(config, server_context, "other-fp", "test", StateStore(tmp_path / "state"), None, clock)


def test_old_aggregates_are_pruned_and_say_so(tmp_path, server_context, cipher, clock):
    fed = formed(tmp_path, server_context, clock, keep_rounds=1, rounds=3)
    for r in (1, 2):
        for site in SITES:
            submit(fed, cipher, site, r)
    err = refusal(fed.open_global, "a", 1)
    assert err.status is Status.NOT_FOUND and "keep_rounds=1" in str(err) and "latest is round 2" in str(err)
