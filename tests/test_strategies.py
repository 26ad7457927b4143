"""The strategies' maths, directly: each formula recomputed value by value in plain Python, state that resumes
bit for bit, buffers averaged and never stepped, and config errors that name the key."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

from lightning_fhe.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Strategy,
    StrategyConfigError,
    StrategyReplica,
    strategy_from_config,
)


def reference_steps(kind: str, options: dict, rounds: list[tuple[list[float], list[float]]]) -> list[list[float]]:
    """The issue's formulas, one value at a time in Python floats: ``rounds`` is [(x_g(r-1), x_avg(r)), ...]."""
    lr = options.get("lr", 1.0)
    b1, b2, tau = options.get("beta1", 0.9), options.get("beta2", 0.99), options.get("tau", 1e-3)
    mom = options.get("momentum", 0.9)
    size = len(rounds[0][0])
    m, v = [0.0] * size, [0.0] * size
    out = []
    for reference, average in rounds:
        following = []
        for i in range(size):
            d = average[i] - reference[i]
            if kind == "fedavg":
                x = reference[i] + lr * d
            elif kind == "fedavgm":
                m[i] = mom * m[i] + d
                x = reference[i] + lr * m[i]
            else:
                m[i] = b1 * m[i] + (1 - b1) * d
                if kind == "fedadam":
                    v[i] = b2 * v[i] + (1 - b2) * d * d
                elif kind == "fedyogi":
                    v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) * (v[i] != d * d)
                else:
                    v[i] = v[i] + d * d
                x = reference[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
            following.append(x)
        out.append(following)
    return out


CASES = [
    ("fedavg", {"lr": 0.7}),
    ("fedavgm", {"lr": 0.5, "momentum": 0.8}),
    ("fedadam", {"lr": 0.05}),
    ("fedyogi", {"lr": 0.05, "beta2": 0.9, "tau": 1e-2}),
    ("fedadagrad", {"lr": 0.1}),
]


def trajectory(rng: np.random.Generator, rounds: int = 5, size: int = 7) -> list[np.ndarray]:
    """Averages of successive rounds: a random walk, with a value that stays put (delta 0)."""
    steps = rng.normal(scale=0.05, size=(rounds, size))
    steps[:, 0] = 0.0
    return list(steps)


@pytest.mark.parametrize("kind, options", CASES, ids=[c[0] for c in CASES])
def test_each_strategy_follows_its_formula(kind, options):
    rng = np.random.default_rng(0)
    strategy = strategy_from_config({kind: options})
    reference = rng.normal(size=7)
    pairs, results = [], []
    for step in trajectory(rng):
        average = reference + step
        following = strategy.step(reference, average)
        pairs.append((reference.tolist(), average.tolist()))
        results.append(following)
        reference = following
    expected = reference_steps(kind, options, pairs)
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert strategy.rounds_applied == len(results)


@pytest.mark.parametrize("kind, options", CASES, ids=[c[0] for c in CASES])
def test_a_strategy_restored_from_its_state_continues_bit_for_bit(kind, options):
    rng = np.random.default_rng(1)
    steps = trajectory(rng, rounds=6)
    uninterrupted = strategy_from_config({kind: options})
    first = strategy_from_config({kind: options})
    x = y = np.zeros(7)
    for step in steps[:3]:
        x = uninterrupted.step(x, x + step)
        y = first.step(y, y + step)
    saved = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint would carry it
    resumed = strategy_from_config({kind: options})
    resumed.load_state_dict(saved)
    for step in steps[3:]:
        x = uninterrupted.step(x, x + step)
        y = resumed.step(y, y + step)
        assert np.array_equal(x, y)


def test_plain_fedavg_is_the_average_itself_and_memoryless():
    average = np.array([0.1, 0.2, 0.3]) * 3
    assert np.array_equal(FedAvg().step(np.array([0.7, -1.3, 2.9]), average), average)  # not x_g + (avg - x_g)
    assert FedAvg().memoryless and not FedAvg(lr=0.5).memoryless and not FedAdam(lr=0.1).memoryless


def test_yogi_grows_v_additively_where_adam_decays_it():
    adam, yogi = FedAdam(lr=0.1, beta2=0.9), FedYogi(lr=0.1, beta2=0.9)
    for strategy in (adam, yogi):
        strategy.step(np.zeros(1), np.array([1.0]))  # v = 0.1 for both: (1 - beta2) * 1
        strategy.step(np.zeros(1), np.zeros(1))  # delta 0: Adam decays v, Yogi leaves it
    assert adam.state_dict()["v"][0] == pytest.approx(0.09)
    assert yogi.state_dict()["v"][0] == pytest.approx(0.1)


def test_state_size_cannot_change_between_rounds():
    strategy = FedAdam(lr=0.1)
    strategy.step(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="first moment m holds 3 values but this round's update has 2"):
        strategy.step(np.zeros(2), np.ones(2))


def test_replica_steps_parameters_and_averages_buffers():
    optimized = np.array([True, True, False])
    replica = StrategyReplica(FedAdam(lr=0.1), optimized, to_model=lambda v: v.astype(np.float32).astype(np.float64))
    replica.start(0, np.array([0.5, -0.5, 3.0]))
    average = np.array([0.6, -0.7, 4.0])
    following = replica.advance(1, average)
    expected = FedAdam(lr=0.1).step(np.array([0.5, -0.5]), average[:2]).astype(np.float32)
    assert np.array_equal(following[:2], expected.astype(np.float64))  # rounded as the model holds it
    assert following[2] == 4.0  # the buffer: the average, no step
    assert np.array_equal(replica.reference, following) and replica.round == 1
    with pytest.raises(ValueError, match="holds the global model of round 1; it cannot step to 3"):
        replica.advance(3, average)


def test_replica_state_resumes_and_refuses_another_strategy():
    replica = StrategyReplica(FedYogi(lr=0.1), np.ones(2, bool))
    replica.start(0, np.zeros(2))
    replica.advance(1, np.array([0.1, 0.2]))
    state = copy.deepcopy(replica.state_dict())
    twin = StrategyReplica(FedYogi(lr=0.1), np.ones(2, bool))
    twin.load_state_dict(state)
    assert np.array_equal(replica.advance(2, np.array([0.3, 0.1])), twin.advance(2, np.array([0.3, 0.1])))
    other = StrategyReplica(FedAdam(lr=0.1), np.ones(2, bool))
    with pytest.raises(ValueError, match="made with strategy 'fedyogi', this site runs 'fedadam'"):
        other.load_state_dict(state)


def test_a_user_strategy_subclasses_the_interface():
    class Halfway(Strategy):
        name = "halfway"

        def update(self, delta):
            return 0.5 * delta

    assert np.array_equal(Halfway().step(np.zeros(2), np.array([2.0, -4.0])), np.array([1.0, -2.0]))
    assert strategy_from_config(Halfway()).name == "halfway"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"fedadam": {}}, "strategy.fedadam.lr: required"),
        ("fedyogi", "strategy.fedyogi.lr: required"),
        (
            {"fedadm": {"lr": 0.1}},
            "strategy.fedadm: unknown strategy; expected one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad "
            "(did you mean 'fedadam'?)",
        ),
        ({"fedadam": {"lr": -1}}, "strategy.fedadam.lr: must be a positive number, got -1"),
        ({"fedavgm": {"momentum": 1.0}}, "strategy.fedavgm.momentum: must be a number in [0, 1), got 1.0"),
        ({"fedadagrad": {"lr": 0.1, "beta2": 0.9}}, "strategy.fedadagrad.beta2: unknown option"),
        ({"fedavg": {}, "fedadam": {}}, "strategy: expected a strategy name"),
        ({"fedavg": 3}, "strategy.fedavg: expected a mapping of options, got 3"),
    ],
)
def test_config_errors_name_the_key(config, message):
    with pytest.raises(StrategyConfigError) as error:
        strategy_from_config(config)
    assert str(error.value).startswith(message)


def test_config_shapes():
    assert isinstance(strategy_from_config(None), FedAvg) and strategy_from_config(None).lr == 1.0
    assert isinstance(strategy_from_config("fedavgm"), FedAvgM)
    assert isinstance(strategy_from_config({"fedavgm": None}), FedAvgM)
    adagrad = strategy_from_config({"fedadagrad": {"lr": 0.2, "tau": 0.01}})
    assert isinstance(adagrad, FedAdagrad) and (adagrad.lr, adagrad.tau) == (0.2, 0.01)
