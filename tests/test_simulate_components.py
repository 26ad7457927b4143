"""The simulator's model and data blocks (class_path/init_args, the site protocol), the label splits, and a
federation of a user's own LightningModule and LightningDataModule run by `python -m lightning_fhe.simulate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_fhe.simulate.components import ComponentError, build_data, check_component
from lightning_fhe.tasks import PartitionError, SyntheticClassificationData, dirichlet_partition, iid_partition

REPO = Path(__file__).resolve().parents[1]
USER_TASK = Path(__file__).resolve().parent / "user_task"


# ------------------------------------------------------------------------------------------------ partitions


def test_iid_parts_are_disjoint_and_even():
    parts = iid_partition(103, 4, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 4, seed=1)))  # seeded


def test_dirichlet_parts_are_disjoint_and_skewed_by_a_small_alpha():
    labels = np.repeat(np.arange(10), 200)

    def skew(alpha: float) -> float:  # mean over sites of the largest class's share of the site's samples
        parts = dirichlet_partition(labels, 8, alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(labels.size))
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert skew(0.3) > 0.35 > 0.15 > skew(100.0)  # IID would give 0.1
    assert all(len(p) >= 50 for p in dirichlet_partition(labels, 8, 0.3, seed=0, min_samples=50))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iid_partition(3, 4), "3 samples cannot be split among 4 sites"),
        (lambda: dirichlet_partition(np.zeros(10), 2, 0.0), "alpha must be a positive number, got 0.0"),
        (lambda: dirichlet_partition(np.zeros((2, 5)), 2, 1.0), "one label per sample (1-D)"),
        (lambda: dirichlet_partition(np.zeros(10), 2, 1.0, min_samples=6), "cannot give each of 2 sites 6"),
    ],
)
def test_partition_errors(call, message):
    with pytest.raises(PartitionError) as error:
        call()
    assert message in str(error.value)


def test_synthetic_classification_sites_share_the_validation_set_and_split_the_rest():
    sites = [
        SyntheticClassificationData(site_index=i, num_sites=3, num_samples=600, split="dirichlet") for i in range(3)
    ]
    for data in sites:
        data.setup()
    assert sum(len(d.train_labels) for d in sites) == 480  # 20% held out
    x0, y0 = sites[0].val_dataloader().dataset.tensors
    x2, y2 = sites[2].val_dataloader().dataset.tensors
    assert (x0 == x2).all() and (y0 == y2).all()


# ------------------------------------------------------------------------------------------------ the blocks


def test_the_site_is_told_by_init_args_or_by_partition(tmp_path, monkeypatch):
    data = build_data({"class_path": "lightning_fhe.tasks.SyntheticClassificationData"}, 2, 4)
    assert (data.hparams.site_index, data.hparams.num_sites) == (2, 4)
    monkeypatch.syspath_prepend(str(USER_TASK))
    monkeypatch.chdir(tmp_path)  # the user's data module writes what it got there
    tiny = build_data({"class_path": "tiny_task.TinyLabels", "init_args": {"samples": 40}}, 1, 2)
    assert tiny.indices is not None and len(tiny.indices) == 20
    assert json.loads((tmp_path / "partition-site1.json").read_text())["split"] == "iid"


def test_a_data_module_that_cannot_be_told_its_site_is_refused():
    with pytest.raises(ComponentError) as error:
        check_component({"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"}, "data", sites=2)
    assert str(error.value).startswith("data.class_path: BoringDataModule cannot be told which site it serves")


def test_block_errors_name_the_key():
    unknown = r"^model.init_args.hiden: MLPClassifier takes no argument 'hiden'.*'hidden'"
    with pytest.raises(ComponentError, match=unknown):
        check_component({"class_path": "lightning_fhe.tasks.MLPClassifier", "init_args": {"hiden": 3}}, "model")
    with pytest.raises(ComponentError, match=r"^data.per_site.alpha: expected a non-empty list"):
        check_component(
            {"class_path": "lightning_fhe.tasks.SyntheticClassificationData", "per_site": {"alpha": 0.3}},
            "data",
            sites=2,
        )
    with pytest.raises(ComponentError, match=r"^model.class_path: expected a dotted path"):
        check_component({"class_path": "MLPClassifier"}, "model")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_simulate_runs_a_users_own_module_with_iid_and_dirichlet_splits(tmp_path):
    config = {
        "base": str(REPO / "configs" / "base.yaml"),
        "experiment": {"name": "user_task", "output_dir": "out", "timeout_s": 300, "metric": "val/acc"},
        "federation": {"sites": 2, "rounds": 3, "local_epochs": 1, "strategy": {"fedadam": {"lr": 0.05}}},
        "model": {"class_path": "tiny_task.TinyClassifier", "init_args": {"lr": 0.1}},
        "data": {"class_path": "tiny_task.TinyLabels", "init_args": {"samples": 400}},
        "trainer": {"accelerator": "cpu"},
        "compare": {
            "iid": {"data": {"init_args": {"split": "iid"}}},
            "dirichlet": {"data": {"init_args": {"split": "dirichlet", "alpha": 0.3}}},
        },
    }
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(USER_TASK), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_fhe.simulate", "user.yaml", "--compare", "iid", "dirichlet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| round | iid | dirichlet |" in result.stdout
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    for setting in ("iid", "dirichlet"):
        rounds = document["rounds"][setting]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(0.0 <= r["metric"] <= 1.0 for r in rounds)
        # Each site validated on its own data: the federated mean is not site-1's own value in general, but it is
        # there for every round a later update carried.
        assert rounds[0]["sites_mean"] is not None and rounds[1]["sites_mean"] is not None
        assert rounds[2]["sites_mean"] is None
    # The sites really trained on the splits asked for (the data module wrote what it got; the last setting's).
    counts = [json.loads((tmp_path / f"partition-site{i}.json").read_text()) for i in range(2)]
    assert all(c["split"] == "dirichlet" for c in counts)
    shares = [max(c["counts"]) / sum(c["counts"]) for c in counts]
    assert max(shares) > 0.4  # IID would give about 0.25
