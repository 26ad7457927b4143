"""Server options: defaults, the shipped configs/server.yaml, overrides, and errors that name the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fhe.server.config import (
    OPTION_HELP,
    ServerConfig,
    ServerConfigError,
    default_quorum,
    load_server_config,
)
from lightning_fhe.server.rounds import Outcome, QuorumRule

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "server.yaml"


def test_the_shipped_config_is_the_defaults():
    assert load_server_config(SHIPPED) == ServerConfig()


def test_every_option_is_documented_everywhere():
    fields = set(ServerConfig.__dataclass_fields__)
    assert set(OPTION_HELP) == fields
    shipped = SHIPPED.read_text()
    docs = (REPO / "docs" / "server.md").read_text()
    for name in fields:
        assert f"\n{name}:" in "\n" + shipped, f"{name} missing from configs/server.yaml"
        assert f"`{name}`" in docs, f"{name} missing from docs/server.md"


def test_overrides_and_kit_defaults():
    config = load_server_config(SHIPPED, ["rounds=5", "clients=[a,b]", "min_clients=1", "port=0"])
    assert (config.rounds, config.clients, config.min_clients, config.port) == (5, ("a", "b"), 1, 0)
    resolved = load_server_config(None, []).with_kit(("a", "b", "c"), 8443)
    assert resolved.port == 8443 and resolved.expected == ("a", "b", "c") and resolved.quorum == 2  # a majority


def test_the_default_quorum_is_a_majority_of_at_least_two():
    # Never one site of several: a global model summed from one update is that site's update, readable by all.
    assert [default_quorum(n) for n in (1, 2, 3, 4, 5, 10, 30)] == [1, 2, 2, 3, 3, 6, 16]
    assert load_server_config(None, ["clients=[a,b]"]).with_kit(("a", "b"), 8443).quorum == 2
    assert load_server_config(None, ["min_clients=4"]).with_kit(tuple("abcd"), 8443).quorum == 4  # as set


def test_with_the_defaults_one_dead_site_costs_a_round_wait_after_min_s_not_the_timeout():
    config = ServerConfig().with_kit(("a", "b", "c", "d", "e"), 8443)
    rule = QuorumRule(config.quorum, config.wait_after_min_s, config.round_timeout_s)
    arrivals = [60.0, 100.0, 200.0, 260.0]  # four of five sites submitted within 260 s; the fifth is dead
    assert rule.decide(5, arrivals, 0.0, now=200.0 + config.wait_after_min_s - 0.1).outcome is Outcome.WAIT
    closed = rule.decide(5, arrivals, 0.0, now=200.0 + config.wait_after_min_s)  # quorum 3 at 200 s
    assert closed.outcome is Outcome.CLOSE and config.wait_after_min_s + 200.0 < config.round_timeout_s
    assert (config.wait_after_min_s, config.round_timeout_s) == (300.0, 1800.0)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["rounds=0"], "rounds: expected an integer >= 1, got 0"),
        (["port=70000"], "port: expected an integer from 0 to 65535"),
        (["min_clients=3", "clients=[a,b]"], "min_clients: 3 is more than the 2 expected sites"),
        (["wait_after_min_s=-1"], "wait_after_min_s: expected a number of seconds >= 0"),
        (["round_timeout_s=0"], "round_timeout_s: expected a number of seconds > 0"),
        (["max_concurrent_uploads=0"], "max_concurrent_uploads: expected an integer >= 1"),
        (["clients=[a,a]"], "clients: ['a'] listed more than once"),
        (["seeds_up_to=-1"], "seeds_up_to: expected an integer from 0 to 1024, got -1"),
        (["seeds_up_to=5000"], "seeds_up_to: expected an integer from 0 to 1024, got 5000"),
        (["roundz=3"], "unknown option(s) ['roundz']"),
        (["rounds"], "override 'rounds': expected key=value"),
        (["rounds=["], "overrides: not valid YAML"),  # the override's fault, not the file's
    ],
)
def test_bad_options_are_refused_by_name(overrides, words):
    with pytest.raises(ServerConfigError) as info:
        load_server_config(SHIPPED, overrides)
    assert words in str(info.value) and str(SHIPPED) in str(info.value)


def test_clients_without_a_certificate_are_refused():
    with pytest.raises(ServerConfigError, match=r"\['z'\] have no certificate"):
        load_server_config(None, ["clients=[a,z]"]).with_kit(("a", "b"), 1)


def test_bad_yaml_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ServerConfigError, match="not valid YAML"):
        load_server_config(bad)
    with pytest.raises(ServerConfigError, match="no such config file"):
        load_server_config(tmp_path / "missing.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_fhe.server", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in OPTION_HELP:
        assert f"\n  {name} " in result.stdout, name
    assert "--insecure" in result.stdout and "--kit" in result.stdout


def test_cli_errors_are_one_line_with_an_exit_status(tmp_path):
    result = run_cli("--kit", str(tmp_path), "rounds=0")
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: {SHIPPED.relative_to(REPO)}: rounds: expected an integer >= 1, got 0"
    )
    result = run_cli("--kit", str(tmp_path / "nope"))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "is not a server kit" in result.stderr


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    from test_server_support import provision_kits

    return provision_kits(tmp_path_factory.mktemp("kits"), ("site-1", "site-2"))


@pytest.mark.slow
def test_insecure_warns_loudly_and_a_failed_formation_exits_1(kits, tmp_path):
    result = run_cli(
        "--kit", str(kits / "server"), "--insecure", "port=0", "bind=127.0.0.1", f"state_dir={tmp_path / 'state'}",
        "round_timeout_s=1", "linger_s=0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "WITHOUT TLS" in result.stderr and "never across a network" in result.stderr
    assert "listening on 127.0.0.1:" in result.stdout
    assert "the federation could not form: timeout_s=1 passed with 0 of 2 site(s)" in result.stderr


@pytest.mark.slow
def test_sigterm_stops_the_server(kits, tmp_path):
    import signal

    from test_server_support import ServerProcess

    server = ServerProcess(kits, tmp_path / "state", tmp_path / "server.log")
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 128 + signal.SIGTERM
    assert "SIGTERM: stopping" in server.output()
