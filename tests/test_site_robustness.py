"""A site that stops early, resumes with its kit elsewhere, disagrees on rounds, is told to stop, or waits: it
says so, and no other site is left waiting for it.

Real parts only: kits from the provisioning tool, a real server over mutual TLS, real site processes running real
Lightning Trainers (tests/sites/boring_site.py) where a process is what shows the behaviour.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from site_processes import start_site
from test_server_federation import (  # noqa: F401 - cipher is a fixture
    FakeClock,
    cipher,
    declaration,
    form,
    make_federation,
    refusal,
    submit,
    values_of,
)
from test_server_support import ENCRYPTED, PLAINTEXT, WEIGHTS, initial_values, start_server, update_of, wait_for

from lightning_fhe import HEFederation
from lightning_fhe.client import AggregatorClient, ClientClosedError, _WaitLog
from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.federation import FederationSetupError
from lightning_fhe.provision import load_provision_config, load_site_kit, provision
from lightning_fhe.server.errors import Reason, Status
from lightning_fhe.server.messages import Phase, PlaintextPart, UploadHeader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(load_provision_config(REPO / "configs" / "provision.yaml", ["clients=[site-1,site-2]"]), out)
    return out


@pytest.fixture()
def clock():
    return FakeClock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_process(kits: Path, name: str, port: int, out: Path, *args: str, kit: str | None = None, cwd=None):
    argv = ["--kit", kit or str(kits / name), "--server", f"localhost:{port}", "--out", str(out / f"{name}.pt")]
    return start_site([*argv, *args], out, name, cwd=cwd)


def trainer(federation: HEFederation, **options) -> L.Trainer:
    defaults = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    defaults |= dict(enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return L.Trainer(callbacks=[federation], **{**defaults, **options})


# -- leaving: the server's side (fake clock, real ciphertexts) -----------------------------------------------------


def test_a_member_that_leaves_is_no_longer_waited_for_in_this_round_or_the_next(
    tmp_path, server_context, cipher, clock
):
    fed = make_federation(tmp_path, server_context, clock, min_clients=2, wait_after_min_s=50.0, rounds=3)
    form(fed, server_context)
    initial = np.concatenate(values_of("a", 0))
    fed.submit("a", iter([UploadHeader(0, 0, initial.size), PlaintextPart(0, initial.tobytes())]))
    submit(fed, cipher, "a", 1)
    submit(fed, cipher, "b", 1)
    assert fed.current_round == 1  # quorum reached; c gets its grace period
    assert fed.leave("c", "max_steps=12 reached") == ("a", "b")
    assert fed.last_closed_round == 1 and fed.current_round == 2  # closed at once: the clock did not move
    assert fed.status("a").left == ("c",)
    assert refusal(submit, fed, cipher, "c", 2).reason is Reason.LEFT
    assert fed.leave("c", "again") == ("a", "b")  # leaving twice is harmless
    submit(fed, cipher, "a", 2)
    submit(fed, cipher, "b", 2)
    assert fed.last_closed_round == 2  # round 2 opened without c: the two remaining members close it
    fed.leave("b", "KeyboardInterrupt")
    assert fed.phase is Phase.FAILED and "fewer than the quorum of 2" in fed.failure  # at once, not at the timeout


def test_only_members_may_leave(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    fed.join("a", declaration("a", server_context))
    refused = refusal(fed.leave, "a", "")  # still forming: not a member yet
    assert refused.status is Status.PERMISSION_DENIED and refused.reason is Reason.NOT_MEMBER
    assert refusal(fed.leave, "z", "").reason is Reason.UNKNOWN_SITE
    assert fed.phase is Phase.FORMING and fed.left == {}


# -- the state key (defect 12) ---------------------------------------------------------------------------------------


def test_the_state_key_names_the_site_and_its_federation_never_the_kit_path(kits, tmp_path, monkeypatch):
    link = tmp_path / "elsewhere"
    link.symlink_to(kits / "site-1")
    monkeypatch.chdir(kits)
    keys = {HEFederation(kit=k).state_key for k in ("site-1", kits / "site-1", link, "./site-1/")}
    assert len(keys) == 1
    key = keys.pop()
    kit = load_site_kit(kits / "site-1")
    assert "site-1" in key and kit.he_fingerprint in key and str(kits) not in key
    assert HEFederation(kit=kits / "site-2").state_key != key


def test_a_checkpoint_with_another_sites_state_is_refused_and_an_old_key_is_adopted_loudly(kits):
    federation = HEFederation(kit=kits / "site-1")
    other = HEFederation(kit=kits / "site-2")
    state = {"completed_round": 2, "epochs_in_round": 1}
    with pytest.raises(FederationSetupError, match="belongs to .*site-2"):
        federation.on_load_checkpoint(None, None, {"callbacks": {other.state_key: state}})
    legacy = "HEFederation{'kit': 'kits/site-1', 'encrypt': 'all'}"  # how earlier versions keyed it
    with pytest.warns(UserWarning, match="old key"):
        federation.on_load_checkpoint(None, None, {"callbacks": {legacy: state}})
    assert federation.state_dict() == state
    with pytest.warns(UserWarning, match="no HEFederation state"):
        HEFederation(kit=kits / "site-1").on_load_checkpoint(None, None, {"callbacks": {}})


@pytest.mark.slow
@pytest.mark.parametrize("resumed_as", ["symlink", "absolute"])
def test_a_site_resumed_with_its_kit_at_another_path_continues_at_the_right_round(kits, tmp_path, resumed_as):
    server = start_server(kits, tmp_path / "state", rounds=3, linger_s=1)
    checkpoint = tmp_path / "site-1.ckpt"
    epochs = ["--local-epochs", "2", "--max-epochs", "6"]
    link = tmp_path / "kit-link"
    link.symlink_to(kits / "site-1")
    # The crashed run named its kit relatively, from the kits' folder; the restart names it another way.
    first = {"kit": "site-1", "cwd": kits}
    again = {"kit": str(link)} if resumed_as == "symlink" else {"kit": str((kits / "site-1").resolve())}
    try:
        other = site_process(kits, "site-2", server.port, tmp_path, "--seed", "1", *epochs)
        # Mid-round (one local epoch into round 2): lost state would make the restart train a round short.
        crash = ["--crash-after-round", "1", "--crash-after-epochs", "1", "--checkpoint", str(checkpoint)]
        crashing = site_process(kits, "site-1", server.port, tmp_path, *epochs, *crash, **first)
        output, _ = crashing.communicate(timeout=120)
        assert crashing.returncode == 3 and checkpoint.exists(), output[-3000:]
        resume = ["--checkpoint", str(checkpoint)]
        restarted = site_process(kits, "site-1", server.port, tmp_path, *epochs, *resume, **again)
        for process in (restarted, other):
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 0, output[-3000:]
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()
    resumed, survivor = (torch.load(tmp_path / f"{name}.pt") for name in ("site-1", "site-2"))
    assert [h["round"] for h in resumed["history"]] == [2, 3]
    assert all(sorted(h["participants"]) == ["site-1", "site-2"] for h in survivor["history"])


# -- rounds checked before anything is sent (defect 14, client half) ------------------------------------------------


def test_too_few_epochs_for_the_rounds_is_refused_before_connecting(kits):
    # No server listens there: a site that connected first would fail with ServerUnavailableError instead.
    federation = HEFederation(kit=kits / "site-1", server=f"localhost:{free_port()}", rounds=3, local_epochs=2)
    with pytest.raises(FederationSetupError, match="max_epochs=5 is too few for 3 rounds"):
        trainer(federation, max_epochs=5).fit(BoringModel())


def test_a_site_with_other_rounds_sends_no_initial_model(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=2, min_clients=1, wait_after_min_s=0)
    try:
        federation = HEFederation(kit=kits / "site-1", server=f"localhost:{server.port}")
        with pytest.raises(FederationSetupError, match="server runs 2 rounds, but this site would run 5"):
            trainer(federation, max_epochs=5).fit(BoringModel())
        assert server.federation.last_closed_round == -1  # no initial model reached the server
    finally:
        server.stop(grace=0)


# -- a site that stops early leaves (defect 13) ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_site_stopped_by_max_steps_leaves_and_the_other_finishes_without_waiting(kits, tmp_path):
    # Hour-long grace and timeout: if site-1 waited for site-2 at all, the test would time out.
    server = start_server(kits, tmp_path / "state", rounds=3, min_clients=1, wait_after_min_s=3600, linger_s=1)
    try:
        finisher = site_process(kits, "site-1", server.port, tmp_path, "--seed", "0", "--max-epochs", "3")
        # site-2 has 10 batches per epoch: round 1 at step 10, round 2 at the cut-short epoch's step 12, then stops.
        stop = ["--seed", "1", "--max-epochs", "3", "--max-steps", "12"]
        stopper = site_process(kits, "site-2", server.port, tmp_path, *stop)
        stopped, _ = stopper.communicate(timeout=120)
        assert stopper.returncode == 0, stopped[-3000:]
        finished, _ = finisher.communicate(timeout=120)
        assert finisher.returncode == 0, finished[-3000:]
        assert server.wait(timeout=30) == 0  # every member that did not leave fetched the last model
        status = server.federation.status("site-1")
    finally:
        server.stop()
    assert "stopped after round 2 of the 3 rounds" in stopped and "max_steps=12 reached" in stopped
    assert "left the federation; 1 site(s) go on: site-1" in stopped
    history = torch.load(tmp_path / "site-1.pt")["history"]
    assert [sorted(h["participants"]) for h in history] == [["site-1", "site-2"]] * 2 + [["site-1"]]
    assert status.left == ("site-2",)


# -- SIGTERM (defect 15) and what a waiting site logs -----------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_ends_a_site_retrying_a_dead_server_promptly(kits, tmp_path):
    dead = free_port()  # nothing listens there
    site = site_process(kits, "site-1", dead, tmp_path, "--retry-budget-s", "600")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(site.stdout), daemon=True)
    reader.start()
    try:
        # Outside a terminal too, the site says what it is doing: retrying, since when, until when.
        wait_for(lambda: any("unavailable since" in line for line in lines), 60, "the site to log its retries")
        assert any("runs out in" in line for line in lines if "unavailable since" in line)
        sent = time.monotonic()
        site.send_signal(signal.SIGTERM)
        code = site.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        site.kill()
    reader.join(5)
    assert code != 0 and took < 10, (code, took, "".join(lines)[-3000:])


def test_wait_lines_come_at_the_configured_cadence_and_not_more_often():
    clock = FakeClock()
    log = _WaitLog(clock, every_s=30.0)
    assert log.due()  # the first line at once
    clock.now += 29.9
    assert not log.due()
    clock.now += 0.1
    assert log.due() and not log.due()
    assert log.elapsed() == pytest.approx(30.0)


def test_a_waiting_site_logs_who_joined_who_submitted_and_who_is_missing(kits, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_fhe.client")
    server = start_server(kits, tmp_path / "state", rounds=1, linger_s=1)
    address = f"localhost:{server.port}"
    clock = FakeClock()
    logged = AggregatorClient(kits / "site-1", address, wait_s=0.2, log_every_s=30.0, clock=clock)
    other = AggregatorClient(kits / "site-2", address, wait_s=0.2)

    def lines(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "lightning_fhe.client" and words in r.getMessage()]

    results: dict = {}
    run = lambda key, call: results.__setitem__(key, call())  # noqa: E731
    try:
        join = lambda: logged.join(WEIGHTS["site-1"], ENCRYPTED, PLAINTEXT)  # noqa: E731
        joining = threading.Thread(target=run, args=("join", join))
        joining.start()
        wait_for(lambda: lines("to form"), 30, "a forming line")
        assert "1 of 2 site(s) joined (site-1)" in lines("to form")[0]
        clock.now += 30.0  # the next line is due only now: the client's clock, not the wall clock, sets the cadence
        wait_for(lambda: len(lines("to form")) >= 2, 30, "a second forming line")
        other_info = other.join(WEIGHTS["site-2"], ENCRYPTED, PLAINTEXT)
        joining.join(30)
        info = results["join"]
        first = logged if info.send_initial_model else other
        first.submit(0, [], initial_values())
        logged.fetch_global(0)
        chunks = UpdateCipher(logged.kit.he_context).iter_encrypt(update_of("site-1", 1)[0], info.share)
        logged.submit(1, chunks, update_of("site-1", 1)[1])
        fetching = threading.Thread(target=run, args=("fetch", lambda: logged.fetch_global(1)))
        fetching.start()
        wait_for(lambda: lines("round 1: waiting"), 30, "a round line")
        line = lines("round 1: waiting")[0]
        assert "for site-2" in line and "submitted: site-1" in line
        chunks = UpdateCipher(other.kit.he_context).iter_encrypt(update_of("site-2", 1)[0], other_info.share)
        other.submit(1, chunks, update_of("site-2", 1)[1])
        fetching.join(30)
        assert sorted(results["fetch"].participants) == ["site-1", "site-2"]
    finally:
        logged.close()
        other.close()
        server.stop(grace=0)


def test_closing_the_client_ends_a_wait_on_another_thread_at_once(kits, tmp_path):
    server = start_server(kits, tmp_path / "state", rounds=1)
    client = AggregatorClient(kits / "site-1", f"localhost:{server.port}", wait_s=30.0)
    errors: list[BaseException] = []

    def join() -> None:
        try:
            client.join(1.0, ENCRYPTED, PLAINTEXT)  # site-2 never comes: formation waits
        except BaseException as err:  # noqa: BLE001 - checked below
            errors.append(err)

    thread = threading.Thread(target=join, daemon=True)
    try:
        thread.start()
        wait_for(lambda: server.federation.formation is not None and server.federation.formation.joined, 30, "join")
        client.close()
        thread.join(5)
        assert not thread.is_alive() and isinstance(errors[0], ClientClosedError)
    finally:
        server.stop(grace=0)
