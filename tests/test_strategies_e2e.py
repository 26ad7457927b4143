"""Every strategy end to end: 2 sites of BoringModel, a real server over mutual TLS, 3 rounds.

For each strategy: after every round both sites hold the same weights bit for bit, and those weights are the
strategy's formulas (docs/strategies.md) recomputed here, in torch float64, from the models the sites uploaded;
the same federation without encryption, in which site-1 is killed after round 1 and resumed from its checkpoint,
reaches the same weights bit for bit. Federated evaluation: the ``fhe/global/*`` metrics in each site's CSVLogger
are the weighted means of the sites' own validation metrics.
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_federation_e2e import ROUNDS, federate, federate_with_restart, federated_names, kits  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

WEIGHTS = {"site-1": 64.0, "site-2": 80.0}  # the sites' training samples (boring_site.py)

STRATEGIES = {
    "fedavg": {"fedavg": {"lr": 0.5}},
    "fedavgm": {"fedavgm": {"lr": 1.0, "momentum": 0.9}},
    "fedadam": {"fedadam": {"lr": 0.05, "tau": 0.01}},
    "fedyogi": {"fedyogi": {"lr": 0.05, "tau": 0.01}},
    "fedadagrad": {"fedadagrad": {"lr": 0.05, "tau": 0.01}},
}


def expected_global_models(records: dict[str, dict], config: dict) -> list[dict[str, torch.Tensor]]:
    """The issue's formulas, per tensor in torch float64, from each round's uploads and the round's start."""
    ((kind, options),) = config.items()
    lr = options.get("lr", 1.0)
    b1, b2, tau = options.get("beta1", 0.9), options.get("beta2", 0.99), options.get("tau", 1e-3)
    total = sum(WEIGHTS.values())
    reference = {n: t.double() for n, t in records["site-1"]["start"].items() if t.is_floating_point()}
    m = {n: torch.zeros_like(t) for n, t in reference.items()}
    v = {n: torch.zeros_like(t) for n, t in reference.items()}
    out = []
    for epoch in range(ROUNDS):
        following = {}
        for name, x in reference.items():
            average = sum(WEIGHTS[s] * r[epoch]["before"][name].double() for s, r in records.items()) / total
            d = average - x
            if kind == "fedavg":
                following[name] = x + lr * d
                continue
            if kind == "fedavgm":
                m[name] = options["momentum"] * m[name] + d
                following[name] = x + lr * m[name]
                continue
            m[name] = b1 * m[name] + (1 - b1) * d
            if kind == "fedadam":
                v[name] = b2 * v[name] + (1 - b2) * d * d
            elif kind == "fedyogi":
                v[name] = v[name] - (1 - b2) * d * d * torch.sign(v[name] - d * d)
            else:
                v[name] = v[name] + d * d
            following[name] = x + lr * m[name] / (v[name].sqrt() + tau)
        out.append(following)
        # The next round starts from the global model as the sites loaded it (float32).
        reference = {n: records["site-1"][epoch]["after"][n].double() for n in following}
    return out


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_each_strategy_gives_every_site_the_same_global_model_by_its_formula(kits, tmp_path, kind):
    config = STRATEGIES[kind]
    args = ["--fl-strategy", json.dumps(config)]
    # Two federations at once (their own servers and state): encrypted; and unencrypted, with site-1 killed after
    # round 1 and resumed from its checkpoint (BoringModel's data are not shuffled and its SGD has no state, so the
    # resumed site trains exactly as it would have).
    raw = tmp_path / "raw"
    raw.mkdir()
    with ThreadPoolExecutor(2) as pool:
        sites = {"site-1": ["--seed", "0", *args], "site-2": ["--seed", "1", *args]}
        encrypted_run = pool.submit(federate, kits, tmp_path / "he", sites)
        plain_args = ["--encrypt", "none", "--max-epochs", str(ROUNDS), *args]
        plain_run = pool.submit(federate_with_restart, kits, raw, plain_args, ["--crash-after-round", "1"])
        encrypted, (plain, _) = encrypted_run.result(), plain_run.result()

    expected = expected_global_models({s: r["records"] for s, r in encrypted.items()}, config)
    first, second = (encrypted[s]["records"] for s in ("site-1", "site-2"))
    for epoch in range(ROUNDS):
        for name in federated_names(first[epoch]["after"]):
            assert torch.equal(first[epoch]["after"][name], second[epoch]["after"][name]), (epoch, name)
            torch.testing.assert_close(first[epoch]["after"][name].double(), expected[epoch][name], rtol=0, atol=1e-6)
    last = ROUNDS - 1  # by then each strategy's step differs from the average (FedAvgM's first step is the average)
    average = sum(WEIGHTS[s] * r["records"][last]["before"]["layer.weight"] for s, r in encrypted.items()) / 144
    assert (first[last]["after"]["layer.weight"] - average).abs().max() > 1e-4

    assert [h["round"] for h in plain["site-1"]["history"]] == [2, 3]  # resumed at round 2
    assert all(h["ciphertext_bytes"] == 0 for h in plain["site-2"]["history"])
    for epoch in range(ROUNDS):
        for name in federated_names(first[epoch]["after"]):
            # HE == raw, bit for bit: the fixed-point grid makes both averages equal, and the strategy is the same
            assert torch.equal(plain["site-2"]["records"][epoch]["after"][name], first[epoch]["after"][name])
            if epoch >= 1:  # the resumed site, whose strategy state came back from its checkpoint
                assert torch.equal(plain["site-1"]["records"][epoch]["after"][name], first[epoch]["after"][name])


def test_a_site_restarted_without_its_checkpoint_replays_the_strategy_from_the_servers_aggregates(kits, tmp_path):
    # FedAdam's moments and global model are not on the server; a site that lost its checkpoint rebuilds them from
    # the aggregates of rounds 0 and 1 (the server keeps the last 3) and goes on exactly as the others.
    args = ["--max-epochs", str(ROUNDS), "--fl-strategy", json.dumps(STRATEGIES["fedadam"])]
    results, _ = federate_with_restart(kits, tmp_path, args, ["--crash-after-round", "1"], from_checkpoint=False)
    restarted, survivor = results["site-1"], results["site-2"]
    assert [h["round"] for h in restarted["history"]] == [2, 3]
    # The restarted Trainer counts epochs from 0 again: its epochs 0 and 1 are rounds 2 and 3.
    for epoch, survivor_epoch in ((0, 1), (1, 2)):
        for name in federated_names(survivor["records"][survivor_epoch]["after"]):
            after = restarted["records"][epoch]["after"][name]
            assert torch.equal(after, survivor["records"][survivor_epoch]["after"][name]), (epoch, name)


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_global_metrics_in_each_sites_csv_are_the_weighted_means_of_the_sites_metrics(kits, tmp_path):
    # 2 local epochs a round: the Trainer's default (validate every epoch) becomes every round, after the exchange.
    epochs = ["--local-epochs", "2", "--max-epochs", str(2 * ROUNDS)]
    sites = {
        name: ["--seed", str(seed), "--model", "validating", "--csv", str(tmp_path / f"csv-{name}"), *epochs]
        for seed, name in enumerate(("site-1", "site-2"))
    }
    results = federate(kits, tmp_path, sites)
    rows = {name: read_csv_metrics(tmp_path / f"csv-{name}" / "metrics.csv") for name in sites}
    own = {  # each site's validations of the global models of rounds 1, 2, 3, in order
        name: [{k: float(r[k]) for k in ("valid/loss", "valid/mean_output")} for r in site_rows if r.get("valid/loss")]
        for name, site_rows in rows.items()
    }
    assert all(len(v) == ROUNDS for v in own.values())  # one validation per round, of the global model
    total = sum(WEIGHTS.values())
    for name, site_rows in rows.items():
        global_rows = [r for r in site_rows if r.get("fhe/global/valid/loss")]
        # Round r's validation rides with round r+1's update: rounds 1 and 2 of 3 are averaged.
        assert len(global_rows) == ROUNDS - 1, name
        validation_steps = [int(r["step"]) for r in site_rows if r.get("valid/loss")]
        for k, row in enumerate(global_rows):
            assert int(row["step"]) == validation_steps[k]  # logged at the step of the validation it averages
            for metric in ("valid/loss", "valid/mean_output"):
                mean = sum(WEIGHTS[s] * own[s][k][metric] for s in own) / total
                assert float(row[f"fhe/global/{metric}"]) == pytest.approx(mean, rel=1e-6, abs=1e-7), (name, k, metric)
    # The sites validated on different data, so the mean is not simply one site's value.
    assert own["site-1"][0]["valid/loss"] != pytest.approx(own["site-2"][0]["valid/loss"], rel=1e-3)
    history = results["site-1"]["history"]
    assert history[0]["global_metrics"] == {}
    assert set(history[1]["global_metrics"]) == {"valid/loss", "valid/mean_output"}
