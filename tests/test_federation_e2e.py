"""HEFederation end to end: a real server with mutual TLS, real site processes running real Lightning Trainers.

Each site is `tests/sites/boring_site.py` in its own process, as at a hospital. It records its model right before
and right after every round's exchange; the tests compare those records across sites with the exact weighted
average of what the sites uploaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from site_processes import SITE, SiteProcess, start_site

from lightning_fhe.he.codec import num_chunks
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.provision import load_provision_config, load_server_kit, provision
from lightning_fhe.server.app import AggregatorServer
from lightning_fhe.server.config import load_server_config

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(load_provision_config(REPO / "configs" / "provision.yaml", ["clients=[site-1,site-2]"]), out)
    return out


def federate(kits: Path, tmp: Path, sites: dict[str, list[str]], rounds: int = ROUNDS) -> dict[str, dict]:
    """Runs a server and one process per site to the end; returns each site's records."""
    config = load_server_config(
        None, ["port=0", "bind=127.0.0.1", f"state_dir={tmp / 'state'}", f"rounds={rounds}", "linger_s=1"]
    )
    server = AggregatorServer(config, load_server_kit(kits / "server"))
    port = server.start()
    processes = {}
    try:
        for name, args in sites.items():
            argv = ["--kit", str(kits / name), "--server", f"localhost:{port}", "--out", str(tmp / f"{name}.pt")]
            processes[name] = start_site([*argv, "--max-epochs", str(rounds), *args], tmp, name)
        for name, process in processes.items():
            output, _ = process.communicate(timeout=240)
            assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
        assert server.wait(timeout=30) == 0
    finally:
        for process in processes.values():
            process.kill()
        server.stop()
    return {name: torch.load(tmp / f"{name}.pt") for name in sites}


def federated_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in state.items() if tensor.is_floating_point()]


def assert_rounds_average(results: dict[str, dict], weights: dict[str, float], rounds: int = ROUNDS) -> None:
    """After every round all sites hold the same weights: the weighted average of what they uploaded."""
    total = sum(weights.values())
    for epoch in range(rounds):
        records = {name: result["records"][epoch] for name, result in results.items()}
        first = next(iter(records.values()))
        for tensor in federated_names(first["after"]):
            expected = sum(weights[n] * r["before"][tensor].double() for n, r in records.items()) / total
            for name, record in records.items():
                torch.testing.assert_close(record["after"][tensor].double(), expected, rtol=0, atol=1e-6)
        some = federated_names(first["after"])[0]
        for name, record in records.items():  # the sites trained apart, so the average moved each of them
            assert not torch.equal(record["before"][some], record["after"][some]), name


@pytest.fixture(scope="module")
def encrypted_run(kits, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("all")
    workers = ["--he-workers", "2"]  # each site's cipher pool: two processes
    return federate(kits, tmp, {"site-1": ["--seed", "0", *workers], "site-2": ["--seed", "1", *workers]})


def test_two_sites_hold_the_exact_weighted_average_after_every_round(encrypted_run):
    # Default weights are the numbers of training samples: 64 and 80 (see boring_site.py).
    assert_rounds_average(encrypted_run, {"site-1": 64.0, "site-2": 80.0})
    history = encrypted_run["site-1"]["history"]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(sorted(h["participants"]) == ["site-1", "site-2"] for h in history)
    assert all(h["ciphertext_bytes"] > 0 and h["encrypt_s"] > 0 for h in history)
    assert all(h["download_s"] > 0 and h["wait_s"] >= 0 for h in history)  # the wait is measured apart


def test_plain_federated_averaging_gives_the_same_global_weights(encrypted_run, kits, tmp_path):
    plain = federate(kits, tmp_path, {"site-1": ["--seed", "0", "--encrypt", "none"], "site-2": ["--seed", "1", "--encrypt", "none"]})
    assert all(h["ciphertext_bytes"] == 0 for h in plain["site-1"]["history"])
    for epoch in range(ROUNDS):
        encrypted_after = encrypted_run["site-1"]["records"][epoch]["after"]
        plain_after = plain["site-1"]["records"][epoch]["after"]
        for name in federated_names(plain_after):  # bit for bit: the fixed-point grid absorbs the CKKS noise
            torch.testing.assert_close(plain_after[name], encrypted_after[name], rtol=0, atol=0)


def test_one_cipher_worker_gives_the_same_global_weights_as_two_bit_for_bit(encrypted_run, kits, tmp_path):
    workers = ["--he-workers", "1"]  # encryption and decryption in the training process itself
    one = federate(kits, tmp_path, {"site-1": ["--seed", "0", *workers], "site-2": ["--seed", "1", *workers]})
    for epoch in range(ROUNDS):
        two_after = encrypted_run["site-1"]["records"][epoch]["after"]
        one_after = one["site-1"]["records"][epoch]["after"]
        for name in federated_names(one_after):
            torch.testing.assert_close(one_after[name], two_after[name], rtol=0, atol=0)


def test_ddp_site_federates_through_rank_zero(kits, tmp_path):
    results = federate(
        kits,
        tmp_path,
        {
            "site-1": ["--seed", "0", "--weight", "3", "--strategy", "ddp", "--devices", "2"],
            "site-2": ["--seed", "1", "--weight", "1"],
        },
    )
    assert_rounds_average(results, {"site-1": 3.0, "site-2": 1.0})
    other_rank = torch.load(tmp_path / "site-1.pt.rank1")
    final = results["site-1"]["records"][ROUNDS - 1]["after"]
    for name in federated_names(final):
        torch.testing.assert_close(other_rank[name], final[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode, encrypted",
    [
        ("conv", [f"layer.{i}.{p}" for i in (1, 3, 5, 6, 7) for p in ("weight", "bias")]),
        ("key_layers", [f"layer.{i}.{p}" for i in (1, 5, 7) for p in ("weight", "bias")]),  # first, middle, last
    ],
)
def test_partial_encryption_sends_only_the_selection_encrypted(kits, tmp_path, mode, encrypted):
    args = ["--model", "conv", "--encrypt", mode]
    results = federate(kits, tmp_path, {"site-1": ["--seed", "0", *args], "site-2": ["--seed", "1", *args]})
    assert_rounds_average(results, {"site-1": 64.0, "site-2": 80.0})
    state = results["site-1"]["records"][0]["after"]
    encrypted_values = sum(state[name].numel() for name in encrypted)
    for h in results["site-1"]["history"]:
        assert h["encrypted_values"] == encrypted_values
        chunks = num_chunks(encrypted_values, CKKSParams())
        assert 0 < h["ciphertext_bytes"] <= chunks * 70_000  # one seeded ciphertext is ~65.7 KB
        assert h["upload_bytes"] > h["ciphertext_bytes"]  # the linear layer and norms travelled in plaintext
    # Tensors outside the selection arrived averaged too (assert_rounds_average covers every floating tensor),
    # and the selection is what the callback would choose on this model.
    from lightning_fhe.selection import split_tensors

    assert list(split_tensors(state, mode).encrypted) == encrypted


def test_optimizer_state_is_kept_or_reset_between_rounds(kits, tmp_path):
    results = federate(
        kits,
        tmp_path,
        {
            "site-1": ["--seed", "0", "--model", "adam", "--optimizer-state", "keep"],
            "site-2": ["--seed", "1", "--model", "adam", "--optimizer-state", "reset"],
        },
    )
    for epoch in range(ROUNDS):
        kept, reset = results["site-1"]["records"][epoch], results["site-2"]["records"][epoch]
        assert kept["after_optimizer_entries"] == kept["before_optimizer_entries"] > 0
        assert reset["before_optimizer_entries"] > 0 and reset["after_optimizer_entries"] == 0


@pytest.mark.parametrize(
    "privacy, cap, formal",
    [
        ({"gaussian": {"clip_norm": 0.5, "noise_multiplier": 1.0}}, 1.0, True),
        ({"partial": {"fraction": 0.1}}, 0.1, False),
        ({"svt": {"fraction": 0.1, "epsilon": 1.0, "clip_bound": 0.05}}, 0.1, True),
    ],
    ids=["gaussian", "partial", "svt"],
)
def test_encrypted_federation_with_each_privacy_option_completes(kits, tmp_path, privacy, cap, formal):
    import json

    args = ["--privacy", json.dumps(privacy)]
    results = federate(kits, tmp_path, {"site-1": ["--seed", "0", *args], "site-2": ["--seed", "1", *args]})
    for result in results.values():
        history = result["history"]
        assert [h["round"] for h in history] == [1, 2, 3]
        assert all(h["ciphertext_bytes"] > 0 and h["shared_fraction"] <= cap for h in history)
        epsilons = [h["epsilon"] for h in history]
        if formal:  # the privacy loss accumulates round after round
            assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
            assert epsilons[0] < epsilons[-1]
        else:
            assert epsilons == [None, None, None]
    if "partial" in privacy or "svt" in privacy:  # a component neither site shared keeps its global value
        for epoch in (1, 2):
            now, before = (results["site-1"]["records"][e]["after"] for e in (epoch, epoch - 1))
            names = federated_names(now)
            moved = sum(int(((now[n] - before[n]).abs() > 1e-6).sum()) for n in names)
            assert moved <= 2 * cap * sum(now[n].numel() for n in names) + 2
    # Both sites still end each round on the same global model.
    for epoch in range(ROUNDS):
        a, b = (results[s]["records"][epoch]["after"] for s in ("site-1", "site-2"))
        for name in federated_names(a):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def federate_with_restart(
    kits: Path, tmp: Path, args: list[str], crash: list[str], rounds: int = ROUNDS, from_checkpoint: bool = True
) -> tuple[dict[str, dict], Path]:
    """A server and two sites (seeds 0 and 1, both given ``args``); site-1, also given ``crash``, saves a checkpoint,
    dies (exit status 3) and is started again from it (or afresh, ``from_checkpoint=False``) while site-2 waits.
    Returns both sites' records and the checkpoint."""
    config = load_server_config(
        None, ["port=0", "bind=127.0.0.1", f"state_dir={tmp / 'state'}", f"rounds={rounds}", "linger_s=1"]
    )
    server = AggregatorServer(config, load_server_kit(kits / "server"))
    port = server.start()
    checkpoint = tmp / "site-1.ckpt"

    def site(name: str, seed: int, *extra: str) -> SiteProcess:
        argv = ["--kit", str(kits / name), "--server", f"localhost:{port}", "--out", str(tmp / f"{name}.pt")]
        return start_site([*argv, "--seed", str(seed), *args, *extra], tmp, name)

    try:
        other = site("site-2", 1)
        crashing = site("site-1", 0, *crash, "--checkpoint", str(checkpoint))
        output, _ = crashing.communicate(timeout=180)
        assert crashing.returncode == 3 and checkpoint.exists(), output[-3000:]
        resume = ["--checkpoint", str(checkpoint)] if from_checkpoint else []
        restarted = site("site-1", 0, *resume)  # site-2 waits in the next round meanwhile
        for process in (restarted, other):
            output, _ = process.communicate(timeout=180)
            assert process.returncode == 0, output[-3000:]
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()
    return {name: torch.load(tmp / f"{name}.pt") for name in ("site-1", "site-2")}, checkpoint


@pytest.mark.parametrize("mid_round", [False, True], ids=["after-round", "mid-round"])
def test_a_site_that_dies_resumes_from_its_checkpoint_at_the_right_round(kits, tmp_path, mid_round):
    # 3 rounds of 2 local epochs; site-1 dies right after round 1, or one local epoch into round 2.
    crash = ["--crash-after-round", "1", "--crash-after-epochs", "1" if mid_round else "0"]
    epochs = ["--local-epochs", "2", "--max-epochs", str(2 * ROUNDS)]
    results, checkpoint = federate_with_restart(kits, tmp_path, epochs, crash)
    resumed, survivor = results["site-1"], results["site-2"]
    assert [h["round"] for h in resumed["history"]] == [2, 3]  # it picked up at round 2, not from the start
    assert [h["round"] for h in survivor["history"]] == [1, 2, 3]
    assert all(sorted(h["participants"]) == ["site-1", "site-2"] for h in survivor["history"])
    # The restart goes on from the checkpoint's weights: after a round they are that round's global model; mid-round
    # they hold the local epoch already trained, which loading the global model again would have thrown away.
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    for name in federated_names(saved):
        torch.testing.assert_close(resumed["records"]["start"][name], saved[name], rtol=0, atol=0)
    last = 2 * ROUNDS - 1
    final_resumed, final_survivor = resumed["records"][last]["after"], survivor["records"][last]["after"]
    for name in federated_names(final_survivor):
        torch.testing.assert_close(final_resumed[name], final_survivor[name], rtol=0, atol=0)


def test_fedprox_keeps_local_training_close_to_the_global_model(encrypted_run, kits, tmp_path):
    args = ["--fedprox-mu", "5"]
    proximal = federate(kits, tmp_path, {"site-1": ["--seed", "0", *args], "site-2": ["--seed", "1", *args]})

    def drift(run: dict) -> float:  # how far round 1's local epoch moved site-1 from the initial global model
        records = run["site-1"]["records"]
        return sum(float((records[0]["before"][n] - records["start"][n]).norm()) for n in ("layer.weight", "layer.bias"))

    assert_rounds_average(proximal, {"site-1": 64.0, "site-2": 80.0})
    assert drift(proximal) < 0.5 * drift(encrypted_run)


def test_a_bad_kit_under_ddp_fails_on_every_rank_without_hanging(tmp_path):
    command = [sys.executable, str(SITE), "--kit", str(tmp_path / "no-such-kit"), "--out", str(tmp_path / "x.pt")]
    command += ["--strategy", "ddp", "--devices", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no-such-kit" in result.stdout + result.stderr
