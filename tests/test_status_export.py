"""``python -m lightning_fhe.status`` and ``python -m lightning_fhe.export`` against a real server and real sites.

Mutual TLS on loopback with kits from the provisioning tool, TenSEAL ciphertexts. The commands run as their own
processes where what a user sees matters (output, exit status, the file), and through ``main`` for the refusals.
"""

from __future__ import annotations

import json
import logging
import socket
import stat
import subprocess
import threading

import pytest
import torch

from lightning_fhe import export, status
from lightning_fhe.provision import load_site_kit
from test_server_support import (
    ENCRYPTED,
    PLAINTEXT,
    PYTHON,
    REPO,
    Site,
    provision_kits,
    start_server,
    status_of,
    wait_for,
)

MEMBERS = ("site-1", "site-2", "site-3")
LATE = "site-4"  # expected, but never joins: formation closes without it


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("kits"), (*MEMBERS, LATE))


def _command(module: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", f"lightning_fhe.{module}", *map(str, args)], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_tensors(site: Site, round_number: int) -> dict[str, torch.Tensor]:
    """What the site itself loaded for that round: its own decryption, cut by the layouts."""
    if round_number == 0:
        values = site.models[0].plaintext
        return {**ENCRYPTED.unflatten(values[: ENCRYPTED.numel]), **PLAINTEXT.unflatten(values[ENCRYPTED.numel :])}
    model = site.models[round_number]
    return {**ENCRYPTED.unflatten(site.decrypted[round_number]), **PLAINTEXT.unflatten(model.plaintext)}


def _assert_bit_for_bit(path, expected: dict[str, torch.Tensor]) -> None:
    state = torch.load(path, weights_only=True)
    assert type(state) is dict and list(state) == list(expected)
    for name, tensor in expected.items():
        got = state[name]
        assert got.dtype == tensor.dtype == torch.float32 and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name


@pytest.mark.slow
def test_status_shows_the_open_round_and_export_writes_the_exact_global_model(kits, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="lightning_fhe.server")
    clients = f"[{','.join((*MEMBERS, LATE))}]"
    server = start_server(
        kits, tmp_path / "state", rounds=2, clients=clients, min_clients=3, wait_after_min_s=0, keep_rounds=1
    )
    address = f"127.0.0.1:{server.port}"
    gate = threading.Event()  # site-2 and site-3 hold their round-1 update until the test opens it

    def hold(site: Site, round_number: int) -> None:
        if site.name != "site-1" and round_number == 1:
            assert gate.wait(120), "the test never opened the gate"

    sites = [Site(load_site_kit(kits / name), address) for name in MEMBERS]
    threads = [threading.Thread(target=s.run, kwargs={"before_submit": hold}, daemon=True) for s in sites]
    try:
        for t in threads:
            t.start()
        site_1 = load_site_kit(kits / "site-1")
        wait_for(lambda: list(status_of(site_1, address).submitted) == ["site-1"], 60, "site-1's round-1 update")

        # The status, as a user runs it: round 1 open, site-1 in, site-2 and site-3 missing.
        shown = _command("status", "--kit", kits / "site-2", "--server", address)
        assert shown.returncode == 0, shown.stderr
        screen = shown.stdout
        assert "federation 'spleen-fl' at 127.0.0.1:" in screen and "(asked as site-2)" in screen
        assert "phase:      open, round 1 of 2 (last closed: 0)" in screen
        assert "members:    3: " in screen and all(m in screen.split("members:")[1].splitlines()[0] for m in MEMBERS)
        assert "submitted:  1 of 3: site-1; missing: " in screen
        missing = screen.split("missing: ")[1].splitlines()[0]
        assert sorted(missing.split(", ")) == ["site-2", "site-3"]
        assert "time left:  " in screen and "left:       none" in screen and "failure:    none" in screen

        capsys.readouterr()
        assert status.main(["--kit", str(kits / "site-3"), "--server", address, "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
        assert as_json["phase"] == "open" and as_json["current_round"] == 1 and as_json["submitted"] == ["site-1"]
        assert as_json["project"] == "spleen-fl" and sorted(as_json["members"]) == sorted(MEMBERS)

        # Export refuses a round that has not closed, and a site that is not a member; nothing is written.
        out = tmp_path / "open.pt"
        code = export.main(["--kit", str(kits / "site-1"), "--out", str(out), "--round", "1", "--server", address])
        assert code == 1 and not out.exists()
        assert "error: round 1 has not closed yet: the last closed round is 0" in capsys.readouterr().err
        code = export.main(["--kit", str(kits / LATE), "--out", str(out), "--server", address])
        assert code == 1 and not out.exists()
        assert f"error: site {LATE} is not a member of this federation" in capsys.readouterr().err
        # Round 0, the initial model, is closed: it is what every site started from.
        assert export.main(["--kit", str(kits / "site-3"), "--out", str(out), "--round", "0", "--server", address]) == 0
        _assert_bit_for_bit(out, _expected_tensors(sites[2], 0))

        gate.set()
        for t in threads:
            t.join(120)
            assert not t.is_alive()
        for s in sites:
            assert s.error is None, repr(s.error)

        # The last closed round, decrypted, bit for bit what site-2 loaded; a plain dict, mode 0600.
        model = tmp_path / "models" / "global.pt"
        written = _command("export", "--kit", kits / "site-2", "--out", model, "--server", address)
        assert written.returncode == 0, written.stderr
        assert "round 2's global model (3 tensors, 20,010 values" in written.stdout
        _assert_bit_for_bit(model, _expected_tensors(sites[1], 2))
        assert stat.S_IMODE(model.stat().st_mode) == 0o600
        assert [p.name for p in model.parent.iterdir()] == ["global.pt"]  # no temporary file left
        # --round 2 gives the same; round 1 is no longer kept (keep_rounds=1).
        again = tmp_path / "again.pt"
        code = export.main(["--kit", str(kits / "site-1"), "--out", str(again), "--round", "2", "--server", address])
        assert code == 0
        _assert_bit_for_bit(again, _expected_tensors(sites[0], 2))
        capsys.readouterr()
        assert export.main(["--kit", str(kits / "site-1"), "--out", str(out), "--round", "1", "--server", address]) == 1
        assert "round 1's global model is no longer kept on the server" in capsys.readouterr().err

        finished = _command("status", "--kit", kits / "site-1", "--server", address)
        assert finished.returncode == 0 and "phase:      finished, all 2 rounds closed" in finished.stdout
    finally:
        gate.set()
        server.stop()
    # Export and status only read: no site joined again, nothing was submitted after the sites'.
    assert "joined again" not in caplog.text


def test_status_with_the_server_kit_asks_as_the_operator(kits, tmp_path, capsys):
    server = start_server(kits, tmp_path / "state", rounds=1, clients="[site-1,site-2]")
    try:
        code = status.main(["--kit", str(kits / "server"), "--server", f"127.0.0.1:{server.port}", "--timeout", "5"])
        out = capsys.readouterr()
    finally:
        server.stop()
    assert code == 0, out.err
    assert "(asked as operator)" in out.out and "phase:      forming; 0 site(s) joined: none" in out.out


def test_commands_say_what_to_check_when_the_server_cannot_be_reached(kits, tmp_path, capsys):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    assert status.main(["--kit", str(kits / "site-1"), "--server", address, "--timeout", "1"]) == 3
    err = capsys.readouterr().err
    assert f"error: cannot reach the aggregator at {address}" in err and "--server HOST:PORT" in err
    out = tmp_path / "model.pt"
    assert export.main(["--kit", str(kits / "site-1"), "--out", str(out), "--server", address, "--timeout", "1"]) == 3
    assert f"error: cannot reach the aggregator at {address}" in capsys.readouterr().err and not out.exists()


def test_commands_refuse_bad_command_lines_and_kits(kits, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        status.main([])
    assert exited.value.code == 2
    assert status.main(["--kit", str(tmp_path / "nowhere")]) == 2
    assert "error: " in capsys.readouterr().err
    # The server kit holds no key: it cannot decrypt a global model.
    assert export.main(["--kit", str(kits / "server"), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "export needs a site kit" in err and not (tmp_path / "m.pt").exists()
    assert export.main(["--kit", str(kits / "site-1"), "--out", str(tmp_path / "m.pt"), "--round", "-1"]) == 2
    assert "--round" in capsys.readouterr().err


def test_status_screen_of_a_failed_federation_and_exit_code(kits, tmp_path, capsys):
    server = start_server(kits, tmp_path / "state", rounds=1, clients="[site-1,site-2]", round_timeout_s=0.5)
    try:
        wait_for(lambda: server.federation.phase.value == "failed", 30, "formation to fail")
        assert status.main(["--kit", str(kits / "site-1"), "--server", f"127.0.0.1:{server.port}"]) == 1
    finally:
        server.stop()
    screen = capsys.readouterr().out
    assert "phase:      failed" in screen and "failure:    the federation could not form" in screen


def test_cli_runs_status_and_export(kits):
    done = subprocess.run(
        [PYTHON, "-m", "lightning_fhe.cli", "status", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "python -m lightning_fhe.status" in done.stdout


def test_export_leaves_out_the_validation_metrics_that_ride_with_the_update(kits):
    """A federation of HEFederation sites appends its metrics pseudo-tensor to the encrypted layout: not a weight."""
    import numpy as np

    from lightning_fhe.client import GlobalModel
    from lightning_fhe.federated_metrics import METRICS_SPEC, METRICS_TENSOR

    layout = {"tensors": [["w", [2], "float32"], [METRICS_SPEC.name, list(METRICS_SPEC.shape), METRICS_SPEC.dtype]]}
    values = np.arange(2 + METRICS_SPEC.numel, dtype=np.float64)
    model = GlobalModel(0, [], values, 1.0, ("site-1",), 0, 0.0, 0.0, json.dumps(layout), '{"tensors": []}')
    tensors = export.decode_global_model(model, load_site_kit(kits / "site-1"))
    assert list(tensors) == ["w"] and METRICS_TENSOR not in tensors and tensors["w"].tolist() == [0.0, 1.0]
