"""The server's gate without a network: who may call what (admission), calls per site, wait clamping, idle and
cancelled streams, and the activity the federation reports, with a fake clock and real CKKS ciphertexts."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest

from lightning_fhe.server.admission import (
    MAX_WAIT_S,
    OPERATOR,
    CallLimiter,
    Method,
    check_caller,
    check_upload_header,
    clamp_wait,
    worker_threads,
)
from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.server.membership import Membership
from lightning_fhe.server.rounds import QuorumRule, RoundState
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.messages import Phase, PlaintextPart, UploadHeader
from lightning_fhe.server.servicer import IdleDeadlineStream
from test_server_federation import (  # noqa: F401 - fixtures
    FakeClock,
    cipher,
    clock,
    declaration,
    form,
    make_federation,
    refusal,
    submit,
    values_of,
)
from test_server_support import wait_for

EXPECTED = ("a", "b", "c")


# -- admission rules --------------------------------------------------------------------------------------------------


def test_an_unknown_name_is_refused_for_every_call():
    for method in Method:
        err = refusal(check_caller, "mallory", method, EXPECTED, None)
        assert (err.status, err.reason) == (Status.PERMISSION_DENIED, Reason.UNKNOWN_SITE)
        assert "'mallory' is not one of the expected sites (a, b, c)" in err.message


def test_while_forming_every_expected_site_may_call():
    for method in Method:
        check_caller("c", method, EXPECTED, None)


def test_after_formation_only_members_get_models_status_and_uploads():
    for method in (Method.DOWNLOAD, Method.STATUS, Method.SUBMIT, Method.LEAVE):
        check_caller("a", method, EXPECTED, ("a", "b"))
        err = refusal(check_caller, "c", method, EXPECTED, ("a", "b"))
        assert (err.status, err.reason) == (Status.PERMISSION_DENIED, Reason.NOT_MEMBER)
        assert err.message.startswith("site 'c' never joined: the federation formed with a, b") and method.value in (
            err.message
        )
    check_caller("c", Method.JOIN, EXPECTED, ("a", "b"))  # the membership refuses it, in its own words


def test_the_operator_may_only_ask_for_the_status():
    check_caller(OPERATOR, Method.STATUS, EXPECTED, None, is_operator=True)
    check_caller(OPERATOR, Method.STATUS, EXPECTED, ("a",), is_operator=True)
    for method in (Method.JOIN, Method.SUBMIT, Method.DOWNLOAD, Method.LEAVE):
        err = refusal(check_caller, OPERATOR, method, EXPECTED, ("a",), is_operator=True)
        assert err.status is Status.PERMISSION_DENIED and "may only call GetRoundStatus" in err.message


# Rounds 1.. take 3 chunks (20000 encrypted values, 8192 per chunk) and 10 plaintext values.
_ENCRYPTED = TensorLayout((TensorSpec("w", (20000,), "float32"),))
_PLAINTEXT = TensorLayout((TensorSpec("b", (10,), "float32"),))
_TWO = Membership(("a", "b"), (1.0, 3.0), _ENCRYPTED, _PLAINTEXT, initial_model_site="a")
_PARAMS = CKKSParams()


@pytest.mark.parametrize(
    ("site", "header", "open_round", "status", "reason", "words"),
    [
        ("c", (1, 3, 10), 1, Status.PERMISSION_DENIED, Reason.NOT_MEMBER, "never joined"),
        ("a", (7, 3, 10), 1, Status.INVALID_ARGUMENT, Reason.NO_SUCH_ROUND, "round 7 does not exist"),
        ("a", (1, 3, 10), None, Status.FAILED_PRECONDITION, Reason.ROUND_CLOSED, "finished its 3 rounds"),
        ("a", (1, 3, 10), 2, Status.FAILED_PRECONDITION, Reason.ROUND_CLOSED, "round 1 is closed"),
        ("a", (3, 3, 10), 2, Status.FAILED_PRECONDITION, Reason.ROUND_NOT_OPEN, "not open yet"),
        ("b", (0, 3, 10), 0, Status.PERMISSION_DENIED, Reason.NOT_MEMBER, "which site 'a' sends"),
        ("a", (1, 4, 10), 1, Status.INVALID_ARGUMENT, Reason.CHUNK_COUNT, "declares 4 ciphertext chunks"),
        ("a", (1, 3, 11), 1, Status.INVALID_ARGUMENT, Reason.CHUNK_COUNT, "declares 11 plaintext values"),
    ],
)
def test_an_update_header_is_refused_before_any_data(site, header, open_round, status, reason, words):
    state = None if open_round is None else RoundState(open_round, ("a", "b"), QuorumRule(2, 0.0, 60.0), 0.0)
    with pytest.raises(Refusal) as refused:
        check_upload_header(site, *header, _TWO, 3, state, _PARAMS)
    assert (refused.value.status, refused.value.reason) == (status, reason) and words in refused.value.message
    assert state is None or not state.uploading  # refusing reserves nothing


def test_a_duplicate_header_is_refused_as_a_duplicate_before_its_sizes():
    state = RoundState(1, ("a", "b"), QuorumRule(2, 0.0, 60.0), 0.0)
    check_upload_header("a", 1, 3, 10, _TWO, 3, state, _PARAMS)  # well formed: no refusal
    state.start_upload("a", 1)
    state.finish_upload("a", recorded=True, now=1.0)
    with pytest.raises(Refusal) as refused:
        check_upload_header("a", 1, 99, 99, _TWO, 3, state, _PARAMS)
    assert refused.value.reason is Reason.DUPLICATE


@pytest.mark.parametrize(
    "requested, honoured",
    [(math.nan, 0.0), (-math.nan, 0.0), (math.inf, MAX_WAIT_S), (-math.inf, 0.0), (-5.0, 0.0), (0.0, 0.0),
     (2.5, 2.5), (1e300, MAX_WAIT_S)],
)
def test_every_wait_is_finite_and_clamped(requested, honoured):
    assert clamp_wait(requested) == honoured


def test_calls_per_site_are_capped_and_counted_per_site():
    limiter = CallLimiter(2)
    limiter.acquire("a", Method.DOWNLOAD)
    limiter.acquire("a", Method.JOIN)
    err = refusal(limiter.acquire, "a", Method.SUBMIT)
    assert (err.status, err.reason) == (Status.RESOURCE_EXHAUSTED, Reason.TOO_MANY_CALLS)
    assert "max_calls_per_site=2" in err.message and "SubmitUpdate" in err.message
    with limiter.hold("b", Method.STATUS):  # another site is not affected
        assert limiter.held("b") == 1
    assert limiter.held("b") == 0
    limiter.release("a")
    with limiter.hold("a", Method.SUBMIT):
        assert limiter.held("a") == 2
    assert limiter.held("a") == 1


def test_the_thread_pool_holds_every_site_at_its_cap_and_spare_threads():
    assert worker_threads(4, 30) == 128


# -- streams ------------------------------------------------------------------------------------------------------


def _stalled(first: list, release: threading.Event):
    """A request stream that sends ``first``, then nothing until ``release`` is set (then it ends)."""
    yield from first
    release.wait(30)


def test_a_stream_that_sends_nothing_is_given_up_with_deadline_exceeded():
    release = threading.Event()
    stream = IdleDeadlineStream(_stalled(["header"], release), idle_s=0.2)
    assert next(stream) == "header"
    err = refusal(next, stream)
    assert (err.status, err.reason) == (Status.DEADLINE_EXCEEDED, Reason.IDLE)
    assert "sent nothing for 0.2 s (stream_idle_s)" in err.message
    release.set()


def test_a_cancelled_stream_unblocks_its_reader_at_once():
    release = threading.Event()
    stream = IdleDeadlineStream(_stalled([], release), idle_s=60)
    raised: list[BaseException] = []

    def read():
        try:
            next(stream)
        except BaseException as err:  # noqa: BLE001
            raised.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: stream._thread is not None, 5, "the stream's helper to start")
    stream.cancel(Refusal(Status.FAILED_PRECONDITION, Reason.ROUND_CLOSED, "round 1 closed"))
    reader.join(5)
    assert not reader.is_alive() and isinstance(raised[0], Refusal) and raised[0].reason is Reason.ROUND_CLOSED
    release.set()


def test_a_stream_reads_only_when_asked():
    """gRPC flow control must still hold a sender back: nothing is read ahead of the handler."""
    sent = []

    def messages():
        for i in range(3):
            sent.append(i)
            yield i

    stream = IdleDeadlineStream(messages(), idle_s=5)
    assert next(stream) == 0
    assert sent == [0]
    assert list(stream) == [1, 2]


# -- the federation: stalled uploads, waits, members, activity -------------------------------------------------------


def test_a_stalled_upload_loses_its_slot_when_its_round_closes(tmp_path, server_context, cipher, clock):
    fed = make_federation(tmp_path, server_context, clock, max_concurrent_uploads=2)
    form(fed, server_context)
    initial = np.concatenate(values_of("a", 0))
    fed.submit("a", iter([UploadHeader(0, 0, initial.size), PlaintextPart(0, initial.tobytes())]))
    release = threading.Event()
    header = UploadHeader(1, fed.accumulator.num_chunks, fed.accumulator.plaintext_count)
    stream = IdleDeadlineStream(_stalled([header], release), idle_s=600)
    raised: list[BaseException] = []

    def stalled_upload():
        try:
            fed.submit("c", stream, cancel=stream.cancel)
        except BaseException as err:  # noqa: BLE001
            raised.append(err)

    uploader = threading.Thread(target=stalled_upload)
    uploader.start()
    try:
        wait_for(lambda: "c" in fed.uploads_in_progress(), 10, "c's upload to hold a slot")
        submit(fed, cipher, "a", 1)  # through the other slot
        submit(fed, cipher, "b", 1)
        clock.now += 10.0  # wait_after_min_s: the round closes without c
        fed.tick()
        uploader.join(5)
        assert not uploader.is_alive(), "the stalled upload still holds its slot after its round closed"
        assert isinstance(raised[0], Refusal) and raised[0].reason is Reason.ROUND_CLOSED
        assert fed.last_closed_round == 1 and fed.uploads_in_progress() == {}
        submit(fed, cipher, "a", 2)  # both slots are free again: round 2 goes on
        submit(fed, cipher, "c", 2)
    finally:
        release.set()
        uploader.join(5)


def test_waits_that_are_nan_answer_at_once(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    result = fed.join("a", declaration("a", server_context), max_wait_s=math.nan)
    assert not result.formed  # returned without waiting (a NaN deadline used to spin a core)


def test_an_expected_site_that_missed_formation_gets_no_model_and_no_status(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    form(fed, server_context, ("a", "b"))
    clock.now += 10.0
    fed.tick()
    assert fed.phase is Phase.OPEN and fed.membership.members == ("a", "b")
    for call in (lambda: fed.open_global("c", 0), lambda: fed.status("c")):
        err = refusal(call)
        assert (err.status, err.reason) == (Status.PERMISSION_DENIED, Reason.NOT_MEMBER)
    assert fed.status("a").members == ("a", "b")


def test_the_status_says_who_asked_time_left_and_when_each_member_was_heard(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    fed.join("a", declaration("a", server_context))
    clock.now += 3.0
    view = fed.status("a")
    assert view.phase is Phase.FORMING and view.site == "a" and view.seconds_left == pytest.approx(97.0)
    assert [(m.site, m.idle_s, m.last_call) for m in view.activity] == [("a", 0.0, "status")]
    fed.join("b", declaration("b", server_context))
    clock.now += 10.0
    fed.tick()  # formed with a, b
    clock.now += 4.0
    view = fed.status("b")
    assert view.phase is Phase.OPEN and view.seconds_left == pytest.approx(96.0)
    assert [(m.site, m.idle_s, m.last_call) for m in view.activity] == [("a", 14.0, "status"), ("b", 0.0, "status")]
    operator = fed.status(OPERATOR, operator=True)
    assert operator.site == OPERATOR and operator.members == ("a", "b")
    assert [m.idle_s for m in operator.activity] == [14.0, 0.0]  # the operator's call is no member's activity


def test_a_silent_member_is_logged_once_per_silence(tmp_path, server_context, clock, caplog):
    fed = make_federation(tmp_path, server_context, clock, silent_after_s=50.0, round_timeout_s=1000.0)
    form(fed, server_context)
    caplog.set_level(logging.INFO, logger="lightning_fhe.server")
    clock.now += 30.0
    fed.status("b")
    fed.tick()
    assert "not been heard from" not in caplog.text
    clock.now += 25.0
    fed.tick()
    fed.tick()
    warnings = [r.getMessage() for r in caplog.records if "not been heard from" in r.getMessage()]
    assert len(warnings) == 2 and all("round 0 waits for a" in w for w in warnings), warnings
    assert warnings[0].startswith("member a has not been heard from for 55 s (silent_after_s=50; last call: join)")
    assert any(w.startswith("member c ") for w in warnings)
    fed.status("a")
    assert "member a is heard from again (status) after 55 s" in caplog.text
