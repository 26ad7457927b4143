"""The round state machine and federation formation, as pure logic: no network, no clock, no ciphertexts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.membership import Formation, Membership, SiteDeclaration, layout_difference
from lightning_fhe.server.rounds import Outcome, QuorumRule, RoundState

ENCRYPTED = TensorLayout((TensorSpec("conv.weight", (4, 3), "float32"), TensorSpec("conv.bias", (4,), "float32")))
PLAINTEXT = TensorLayout((TensorSpec("norm.weight", (4,), "float32"),))


def declaration(weight=1.0, encrypted=ENCRYPTED, plaintext=PLAINTEXT, he="he-fp", params="params-fp"):
    return SiteDeclaration(weight, encrypted, plaintext, he, params)


# -- the quorum rule -----------------------------------------------------------------------------------------------


RULE = QuorumRule(min_clients=2, wait_after_min_s=10.0, timeout_s=100.0)


def test_closes_as_soon_as_every_expected_site_arrived():
    decision = RULE.decide(expected=3, arrivals=[1.0, 2.0, 3.0], opened_at=0.0, now=3.0)
    assert decision.outcome is Outcome.CLOSE and "all 3" in decision.why


def test_waits_for_the_others_during_the_grace_period_then_closes():
    assert RULE.decide(3, [1.0, 5.0], 0.0, now=14.99).outcome is Outcome.WAIT
    assert RULE.decide(3, [1.0, 5.0], 0.0, now=14.99).wake_at == 15.0  # quorum at 5 + grace 10
    decision = RULE.decide(3, [1.0, 5.0], 0.0, now=15.0)
    assert decision.outcome is Outcome.CLOSE and "wait_after_min_s=10" in decision.why


def test_the_grace_period_starts_when_the_quorum_is_reached_not_at_the_first_arrival():
    assert RULE.decide(3, [5.0, 1.0], 0.0, now=12.0).outcome is Outcome.WAIT  # order of arrivals does not matter


def test_fails_below_quorum_at_the_timeout_and_says_why():
    assert RULE.decide(3, [1.0], 0.0, now=99.9).outcome is Outcome.WAIT
    decision = RULE.decide(3, [1.0], 0.0, now=100.0)
    assert decision.outcome is Outcome.FAIL
    assert "timeout_s=100" in decision.why and "1 of 3" in decision.why and "min_clients is 2" in decision.why


def test_the_timeout_caps_the_grace_period():
    decision = RULE.decide(3, [1.0, 95.0], 0.0, now=100.0)
    assert decision.outcome is Outcome.CLOSE and "timeout_s=100" in decision.why


def test_a_quorum_larger_than_the_expected_sites_means_all_of_them():
    rule = QuorumRule(min_clients=5, wait_after_min_s=0.0, timeout_s=10.0)
    assert rule.decide(2, [1.0, 2.0], 0.0, now=2.0).outcome is Outcome.CLOSE


def test_nobody_arriving_fails_at_the_timeout():
    assert RULE.decide(3, [], 0.0, now=50.0).outcome is Outcome.WAIT
    assert RULE.decide(3, [], 0.0, now=100.0).outcome is Outcome.FAIL


@pytest.mark.parametrize("kwargs", [dict(min_clients=0), dict(wait_after_min_s=-1.0), dict(timeout_s=0.0)])
def test_an_invalid_rule_is_refused(kwargs):
    with pytest.raises(ValueError):
        QuorumRule(**{"min_clients": 1, "wait_after_min_s": 0.0, "timeout_s": 1.0, **kwargs})


# -- one round -----------------------------------------------------------------------------------------------------


def open_round(number=3, members=("a", "b", "c")):
    return RoundState(number, members, RULE, opened_at=0.0)


def refusal(call, *args, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args, **kwargs)
    return info.value


def test_a_round_records_submissions_and_closes_when_all_arrived():
    state = open_round()
    for t, site in enumerate("abc", start=1):
        state.start_upload(site, round_number=3)
        state.finish_upload(site, recorded=True, now=float(t))
    assert state.participants == ("a", "b", "c")
    assert state.decide(now=3.0).outcome is Outcome.CLOSE


def test_a_stale_round_is_refused_as_closed():
    err = refusal(open_round().start_upload, "a", round_number=2)
    assert (err.status, err.reason) == (Status.FAILED_PRECONDITION, Reason.ROUND_CLOSED)
    assert str(err) == "round 2 is closed (current round 3)"


def test_a_future_round_is_refused_as_not_open_yet():
    err = refusal(open_round().start_upload, "a", round_number=5)
    assert (err.status, err.reason) == (Status.FAILED_PRECONDITION, Reason.ROUND_NOT_OPEN)
    assert str(err) == "round 5 is not open yet (current round 3)"


def test_a_duplicate_submission_is_refused_and_changes_nothing():
    state = open_round()
    state.start_upload("a", 3)
    state.finish_upload("a", recorded=True, now=1.0)
    err = refusal(state.start_upload, "a", 3)
    assert err.status is Status.ALREADY_EXISTS and "already submitted" in str(err)
    assert state.submitted == {"a": 1.0} and not state.uploading


def test_a_second_stream_while_the_first_is_arriving_is_a_retryable_refusal():
    state = open_round()
    state.start_upload("a", 3)
    err = refusal(state.start_upload, "a", 3)
    assert err.status is Status.UNAVAILABLE and "still arriving" in str(err)


def test_a_broken_upload_leaves_the_site_free_to_submit_again():
    state = open_round()
    state.start_upload("a", 3)
    state.finish_upload("a", recorded=False, now=1.0)
    assert not state.submitted
    state.start_upload("a", 3)  # accepted


def test_a_non_member_may_not_submit():
    err = refusal(open_round().start_upload, "z", 3)
    assert err.status is Status.PERMISSION_DENIED and "'z'" in str(err)


def test_uploads_in_progress_do_not_count_towards_the_quorum():
    state = open_round()
    for site in "abc":
        state.start_upload(site, 3)
    state.finish_upload("a", recorded=True, now=1.0)
    assert state.decide(now=99.0).outcome is Outcome.WAIT
    assert state.decide(now=100.0).outcome is Outcome.FAIL


# -- formation -----------------------------------------------------------------------------------------------------


def formation(expected=("a", "b", "c"), rule=RULE):
    return Formation(expected, rule, opened_at=0.0, he_fingerprint="he-fp", params_fingerprint="params-fp")


def test_formation_fixes_members_in_join_order_and_their_shares():
    f = formation()
    f.join("b", declaration(weight=30.0), now=1.0)
    f.join("a", declaration(weight=10.0), now=2.0)
    assert f.decide(now=5.0).outcome is Outcome.WAIT
    assert f.decide(now=12.0).outcome is Outcome.CLOSE  # quorum of 2 at t=2, grace 10
    membership = f.close(server_has_initial_model=False)
    assert membership.members == ("b", "a")
    assert membership.total_weight == 40.0
    assert membership.share("b") == 0.75 and membership.share("a") == 0.25
    assert membership.initial_model_site == "b"  # the first site that joined sends round 0
    assert f.close(server_has_initial_model=True).initial_model_site is None


def test_formation_fails_below_quorum_at_the_timeout():
    f = formation()
    f.join("a", declaration(), now=1.0)
    assert f.decide(now=100.0).outcome is Outcome.FAIL


def test_joining_again_before_formation_closes_updates_the_weight_but_keeps_the_join_time():
    f = formation()
    f.join("a", declaration(weight=1.0), now=1.0)
    f.join("a", declaration(weight=2.0), now=50.0)
    assert f.joined["a"][0].weight == 2.0 and f.joined["a"][1] == 1.0


@pytest.mark.parametrize(
    "site, decl, status, words",
    [
        ("x", declaration(), Status.PERMISSION_DENIED, "'x' is not one of the expected sites"),
        ("b", declaration(weight=0.0), Status.INVALID_ARGUMENT, "weight must be a finite number > 0"),
        ("b", declaration(weight=float("nan")), Status.INVALID_ARGUMENT, "weight"),
        ("b", declaration(he="other"), Status.FAILED_PRECONDITION, "HE fingerprint mismatch"),
        ("b", declaration(params="other"), Status.FAILED_PRECONDITION, "CKKS parameters mismatch"),
        (
            "b",
            declaration(plaintext=TensorLayout((TensorSpec("norm.weight", (5,), "float32"),))),
            Status.FAILED_PRECONDITION,
            "plaintext tensor 0 is 'norm.weight' float32 [5] at this site but 'norm.weight' float32 [4]",
        ),
        (
            "b",
            declaration(encrypted=TensorLayout(ENCRYPTED.specs[:1])),
            Status.FAILED_PRECONDITION,
            "encrypted layout has 1 tensors at this site but 2 in the federation (first extra: 'conv.bias')",
        ),
    ],
)
def test_a_bad_join_is_refused_with_what_was_wrong_and_changes_nothing(site, decl, status, words):
    f = formation()
    f.join("a", declaration(), now=1.0)
    err = refusal(f.join, site, decl, now=2.0)
    assert err.status is status and words in str(err)
    assert list(f.joined) == ["a"]


def test_the_only_site_joined_may_join_again_with_another_layout():
    f = formation()
    f.join("a", declaration(), now=1.0)
    other = TensorLayout(ENCRYPTED.specs[:1])
    f.join("a", declaration(encrypted=other), now=2.0)
    assert f.layouts == (other, PLAINTEXT)


def test_a_member_joining_again_must_declare_what_it_declared_at_formation():
    membership = Membership(("a", "b"), (1.0, 3.0), ENCRYPTED, PLAINTEXT, None)
    membership.check_rejoin("b", declaration(weight=3.0))
    assert "weights are fixed" in str(refusal(membership.check_rejoin, "b", declaration(weight=4.0)))
    assert "layout mismatch" in str(refusal(membership.check_rejoin, "b", declaration(3.0, plaintext=ENCRYPTED)))
    err = refusal(membership.check_rejoin, "c", declaration())
    assert err.status is Status.PERMISSION_DENIED and "formed with a, b" in str(err)


def test_membership_round_trips_through_its_dict():
    membership = Membership(("a", "b"), (1.0, 3.0), ENCRYPTED, PLAINTEXT, "a")
    assert Membership.from_dict(membership.to_dict()) == membership


def test_layout_difference_is_none_for_equal_layouts():
    assert layout_difference("encrypted", ENCRYPTED, TensorLayout.from_dict(ENCRYPTED.to_dict())) is None


# -- members that leave ------------------------------------------------------------------------------------------------


def test_a_round_closes_once_every_remaining_member_submitted_after_one_left():
    state = RoundState(1, ("a", "b", "c"), RULE, opened_at=0.0)
    state.start_upload("a", 1)
    state.finish_upload("a", recorded=True, now=1.0)
    state.start_upload("b", 1)
    state.finish_upload("b", recorded=True, now=2.0)
    assert state.decide(now=3.0).outcome is Outcome.WAIT  # quorum reached, grace period for c
    state.leave("c")
    decision = state.decide(now=3.0)
    assert decision.outcome is Outcome.CLOSE and "all 2" in decision.why
    assert state.participants == ("a", "b") and state.remaining == ("a", "b")


def test_a_member_that_submitted_then_left_is_summed_but_not_counted_as_waited_for():
    state = RoundState(1, ("a", "b", "c"), RULE, opened_at=0.0)
    state.start_upload("a", 1)
    state.finish_upload("a", recorded=True, now=1.0)
    state.leave("a")
    state.start_upload("b", 1)
    state.finish_upload("b", recorded=True, now=2.0)
    assert state.decide(now=2.0).outcome is Outcome.WAIT  # c, still a member, has not arrived yet
    assert state.participants == ("a", "b")


def test_fewer_members_than_the_quorum_left_fails_the_round_at_once():
    state = RoundState(1, ("a", "b", "c"), RULE, opened_at=0.0)
    state.leave("b")
    assert state.decide(now=0.0).outcome is Outcome.WAIT  # 2 remain: the quorum of 2 can still be reached
    state.leave("c")
    decision = state.decide(now=0.0)
    assert decision.outcome is Outcome.FAIL
    assert "1 member(s) remain" in decision.why and "b, c left" in decision.why and "quorum of 2" in decision.why


def test_a_member_that_left_may_not_submit_and_leaving_twice_changes_nothing():
    state = RoundState(1, ("a", "b", "c"), RULE, opened_at=0.0)
    state.leave("a")
    state.leave("a")
    state.leave("z")  # not a member: nothing to stop waiting for
    assert state.left == {"a"}
    with pytest.raises(Refusal) as refused:
        state.start_upload("a", 1)
    assert refused.value.status is Status.FAILED_PRECONDITION and refused.value.reason is Reason.LEFT
    assert "left" in refused.value.message and not state.uploading


# -- masked rounds: re-collection instead of a partial sum --------------------------------------------------------


def _masked_round(members=("a", "b", "c", "d"), min_clients=2) -> RoundState:
    return RoundState(1, members, QuorumRule(min_clients, 10.0, 600.0), opened_at=0.0, masked=True)


def _upload(state: RoundState, site: str, now: float, attempt: int | None = None) -> None:
    state.start_upload(site, 1, state.attempt if attempt is None else attempt)
    state.finish_upload(site, recorded=True, now=now)


def test_a_masked_round_with_everyone_closes_as_an_unmasked_one():
    state = _masked_round()
    for i, site in enumerate("abcd"):
        _upload(state, site, now=float(i))
    assert state.decide(now=4.0).outcome is Outcome.CLOSE


def test_a_masked_round_missing_a_site_is_recollected_among_those_who_uploaded():
    state = _masked_round()
    for site in "abc":
        _upload(state, site, now=1.0)
    assert state.decide(now=5.0).outcome is Outcome.WAIT  # the grace period for d
    decision = state.decide(now=11.0)
    assert decision.outcome is Outcome.RECOLLECT and "lacks d" in decision.why
    assert state.next_attempt(now=11.0) == ("a", "b", "c")
    assert (state.attempt, state.submitted, state.opened_at) == (2, {}, 11.0)
    # d may not join attempt 2, and an update masked for attempt 1 is refused as such
    with pytest.raises(Refusal) as refused:
        state.check_upload("d", 1, 2)
    assert refused.value.reason is Reason.NOT_IN_ATTEMPT
    with pytest.raises(Refusal) as refused:
        state.check_upload("a", 1, 1)
    assert refused.value.reason is Reason.ATTEMPT_CHANGED and "attempt 2 is open" in str(refused.value)
    for site in "abc":
        _upload(state, site, now=12.0)
    assert state.decide(now=12.0).outcome is Outcome.CLOSE
    assert state.participants == ("a", "b", "c")


def test_a_recollection_below_the_quorum_fails_the_round():
    state = _masked_round(min_clients=3)
    for site in "abc":
        _upload(state, site, now=1.0)
    state.decide(now=11.0)
    state.next_attempt(now=11.0)
    _upload(state, "a", now=12.0)
    _upload(state, "b", now=12.0)
    assert state.decide(now=30.0).outcome is Outcome.WAIT  # below the quorum: c may still come, until the timeout
    decision = state.decide(now=611.0)
    assert decision.outcome is Outcome.FAIL and "min_clients is 3" in decision.why


def test_an_attempt_whose_members_left_below_the_quorum_fails_at_once():
    state = _masked_round(min_clients=3)
    for site in "abc":
        _upload(state, site, now=1.0)
    state.decide(now=11.0)
    state.next_attempt(now=11.0)
    state.leave("c")
    decision = state.decide(now=12.0)
    assert decision.outcome is Outcome.FAIL and "fewer than the quorum of 3" in decision.why


def test_a_site_that_left_after_uploading_is_not_asked_again():
    state = _masked_round()
    for site in "abc":
        _upload(state, site, now=1.0)
    state.leave("b")
    state.leave("d")  # never uploaded: the sum lacks its masks
    assert state.decide(now=1.0).outcome is Outcome.RECOLLECT
    assert state.next_attempt(now=1.0) == ("a", "c")


def test_an_unmasked_round_refuses_an_attempt_number():
    state = RoundState(1, ("a", "b"), QuorumRule(2, 10.0, 600.0), opened_at=0.0)
    with pytest.raises(Refusal) as refused:
        state.check_upload("a", 1, 3)
    assert refused.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(RuntimeError):
        state.next_attempt(now=1.0)


# -- mask keys at join: checked for form by the server (for authenticity by every site) -----------------------------


def _key(site="a", **fields) -> Announcement:
    values = {"certificate": b"-----BEGIN CERTIFICATE-----", "public_key": bytes(32), "signature": bytes(70)}
    return Announcement(site=site, **{**values, **fields})


def _masking(key, require=False):
    return replace(declaration(), mask_key=key, require_masking=require)


@pytest.mark.parametrize(
    "key, message",
    [
        (_key(site="b"), "the mask key names site 'b', but the caller is 'a'"),
        (_key(public_key=bytes(31)), "the mask key takes 32 bytes (X25519), got 31"),
        (_key(certificate=b""), "a PEM of 1 to 16384 ASCII bytes is expected"),
        (_key(certificate=b"x" * (16 * 1024 + 1)), "a PEM of 1 to 16384 ASCII bytes is expected"),
        (_key(certificate="é".encode()), "a PEM of 1 to 16384 ASCII bytes is expected"),
        (_key(signature=b""), "signature takes 0 bytes; 1 to 80 allowed"),
        (_key(signature=bytes(81)), "signature takes 81 bytes; 1 to 80 allowed"),
        (_key(key_fingerprint="f" * 129), "the key fingerprint exceeds 128 characters"),
    ],
)
def test_a_mask_key_of_impossible_form_is_refused_at_join_and_nothing_is_recorded(key, message):
    forming = formation()
    with pytest.raises(Refusal) as refused:
        forming.join("a", _masking(key), now=1.0)
    assert refused.value.status is Status.INVALID_ARGUMENT and refused.value.reason is Reason.BAD_REQUEST
    assert message in refused.value.message and "site 'a'" in refused.value.message
    assert not forming.joined


def test_a_federation_masks_when_every_member_sent_a_key_and_there_are_three_or_one_requires_it():
    def formed(sites, keys, require=()):
        forming = formation(sites, QuorumRule(len(sites), 0.0, 60.0))
        for site in sites:
            forming.join(site, _masking(_key(site) if site in keys else None, site in require), now=1.0)
        return forming.close(server_has_initial_model=False)

    assert formed(("a", "b", "c"), "abc").masked
    assert not formed(("a", "b", "c"), "ab").masked  # c does not mask: nobody does
    assert not formed(("a", "b"), "ab").masked  # two sites: each reads the other from the average anyway
    membership = formed(("a", "b"), "ab", require="b")
    assert membership.masked and [k.site for k in membership.mask_keys] == ["a", "b"]


def test_a_member_of_a_masked_federation_rejoins_with_the_key_it_formed_with():
    forming = formation(rule=QuorumRule(3, 0.0, 60.0))
    for site in "abc":
        forming.join(site, _masking(_key(site)), now=1.0)
    membership = forming.close(server_has_initial_model=False)
    membership.check_rejoin("b", _masking(_key("b")))
    for key, status, reason, message in (
        (None, Status.FAILED_PRECONDITION, Reason.MISMATCH, "joined without a mask key"),
        (_key("b", public_key=bytes([1]) * 32), Status.FAILED_PRECONDITION, Reason.MISMATCH, "another mask key"),
        (_key("b", public_key=bytes(33)), Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, "takes 32 bytes"),
    ):
        with pytest.raises(Refusal) as refused:
            membership.check_rejoin("b", _masking(key))
        assert (refused.value.status, refused.value.reason) == (status, reason)
        assert message in refused.value.message
