"""Privacy mechanisms on a site's update: clipping bounds, noise calibration, accounting against Opacus, caps,
config parsing, determinism and checkpoints. Pure numpy; Opacus only as the reference for epsilon."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from omegaconf import OmegaConf
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import stats
from scipy.optimize import brentq

from lightning_fhe.privacy import (
    GaussianMechanism,
    PartialSharing,
    PrivacyChain,
    PrivacyConfigError,
    PrivatizedUpdate,
    SparseVectorTechnique,
    UpdateMechanism,
    clip_by_l2_norm,
    mechanism_from_config,
    share_count,
)

# Updates of realistic magnitude and of magnitudes that would overflow a naive sum of squares.
finite_floats = st.floats(min_value=-1e200, max_value=1e200, allow_nan=False, allow_infinity=False)
vectors = hnp.arrays(np.float64, st.integers(0, 300), elements=finite_floats)
small_vectors = hnp.arrays(
    np.float64, st.integers(1, 300), elements=st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
)
positive_bounds = st.floats(min_value=1e-6, max_value=1e6)
fractions = st.floats(min_value=1e-4, max_value=1.0)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def opacus_epsilon(accountant, sigma: float, rounds: int, delta: float) -> float:
    """The reference: Opacus's accountant stepped once per round, as DP-SGD with full batches would be."""
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    return accountant.get_epsilon(delta=delta)


def exact_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Exact epsilon of `rounds` Gaussian mechanisms of multiplier sigma (Balle & Wang 2018): they compose to one
    of multiplier sigma / sqrt(rounds), i.e. mu-GDP with mu = sqrt(rounds) / sigma."""
    mu = math.sqrt(rounds) / sigma

    def excess(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 500.0)


# -- clipping ----------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(vector=vectors, bound=positive_bounds)
def test_clipping_never_exceeds_the_bound_and_keeps_direction(vector, bound):
    clipped, norm = clip_by_l2_norm(vector, bound)
    assert norm <= bound
    assert np.linalg.norm(clipped) <= bound
    scale = np.max(np.abs(vector)) if vector.size else 0.0
    if scale == 0.0:
        assert not clipped.any()
        return
    # Compare directions on rescaled copies: the raw norm of a 1e200 vector overflows.
    direction = vector / scale
    if scale * np.linalg.norm(direction) <= bound:
        np.testing.assert_array_equal(clipped, vector)
    else:
        assert norm == pytest.approx(bound, rel=1e-9)
        np.testing.assert_allclose(clipped / bound, direction / np.linalg.norm(direction), rtol=1e-9, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(vector=vectors, bound=positive_bounds, sigma=st.floats(0.1, 5.0), seed=st.integers(0, 2**32 - 1))
def test_gaussian_reports_a_clipped_norm_within_the_bound(vector, bound, sigma, seed):
    update = GaussianMechanism(clip_norm=bound, noise_multiplier=sigma).privatize(vector, rng(seed))
    assert update.clipped_norm is not None and update.clipped_norm <= bound
    assert update.delta.shape == vector.shape
    assert np.isfinite(update.delta).all()


def test_clipping_a_zero_update_divides_by_nothing():
    with np.errstate(all="raise"):  # a 0/0 in the clipping would raise here
        clipped, norm = clip_by_l2_norm(np.zeros(10), 1.0)
        update = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0).privatize(np.zeros(10), rng())
    assert norm == 0.0 and not clipped.any()
    assert update.clipped_norm == 0.0


# -- Gaussian noise and accounting ---------------------------------------------------------------------------------


def test_gaussian_noise_has_the_configured_standard_deviation():
    clip_norm, sigma, n = 2.0, 0.8, 200_000
    update = GaussianMechanism(clip_norm=clip_norm, noise_multiplier=sigma).privatize(np.zeros(n), rng(7))
    expected_std = sigma * clip_norm
    # The sample std of n normals has relative standard error 1/sqrt(2n) = 0.16%; 1% is over six of them.
    assert np.std(update.delta) == pytest.approx(expected_std, rel=0.01)
    assert abs(np.mean(update.delta)) < 5 * expected_std / math.sqrt(n)
    standardized = update.delta / expected_std
    # Shape (KS against N(0, 1)) and scale (sum of squares against chi-square with n degrees of freedom).
    assert stats.kstest(standardized, "norm").pvalue > 1e-3
    chi2_cdf = stats.chi2.cdf(np.sum(standardized**2), df=n)
    assert 1e-3 < chi2_cdf < 1 - 1e-3
    assert update.shared_fraction == 1.0


def test_gaussian_noise_is_added_to_the_clipped_update():
    delta = np.full(50_000, 1.0)  # norm about 224, clipped to 1
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=0.5)
    update = mechanism.privatize(delta, rng(3))
    clipped = delta / np.linalg.norm(delta)
    noise = update.delta - clipped
    assert update.clipped_norm == pytest.approx(1.0)
    assert np.std(noise) == pytest.approx(mechanism.noise_std, rel=0.02)
    assert abs(np.mean(noise)) < 5 * mechanism.noise_std / math.sqrt(delta.size)


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"),
    [(1.0, 10, 1e-5), (0.8, 20, 1e-5), (2.0, 50, 1e-6), (5.0, 1, 1e-5), (1.3, 100, 1e-5)],
)
def test_epsilon_equals_opacus_rdp_accountant(sigma, rounds, delta):
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=sigma)
    reference = opacus_epsilon(RDPAccountant(), sigma, rounds, delta)
    assert mechanism.epsilon(rounds, delta) == pytest.approx(reference, rel=1e-12)
    # Independent of Opacus: RDP is an upper bound on the exact loss of full-participation Gaussian rounds.
    assert mechanism.epsilon(rounds, delta) >= exact_gaussian_epsilon(sigma, rounds, delta)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # Opacus's PRV at sample_rate 1, harmless
@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 10), (2.0, 50)])
def test_epsilon_with_the_prv_accountant_equals_opacus_and_is_near_exact(sigma, rounds):
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=sigma, accountant="prv")
    reference = opacus_epsilon(PRVAccountant(), sigma, rounds, 1e-5)
    got = mechanism.epsilon(rounds, 1e-5)
    assert got == pytest.approx(reference, rel=1e-9)
    assert got == pytest.approx(exact_gaussian_epsilon(sigma, rounds, 1e-5), abs=0.05)
    assert got < GaussianMechanism(clip_norm=1.0, noise_multiplier=sigma).epsilon(rounds, 1e-5)


def test_epsilon_grows_with_rounds_and_is_zero_before_any():
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    values = [mechanism.epsilon(r, 1e-5) for r in (0, 1, 5, 25)]
    assert values[0] == 0.0
    assert values == sorted(values) and len(set(values)) == 4


@pytest.mark.parametrize(("target", "rounds", "delta"), [(8.0, 10, 1e-5), (2.0, 5, 1e-5), (30.0, 100, 1e-6)])
def test_target_epsilon_gives_a_sigma_within_and_close_to_the_budget(target, rounds, delta):
    mechanism = GaussianMechanism(clip_norm=1.0, target_epsilon=target, target_delta=delta, rounds=rounds)
    reached = mechanism.epsilon(rounds, delta)
    assert reached <= target
    assert reached >= target - 0.02  # Opacus's search stops within 0.01 below the target
    expected_sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp"
    )
    assert mechanism.noise_multiplier == expected_sigma
    assert opacus_epsilon(RDPAccountant(), mechanism.noise_multiplier, rounds, delta) == pytest.approx(reached)


def test_spent_follows_releases_and_survives_a_change_of_sigma():
    first = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    assert first.spent(1e-5) == 0.0
    for seed in range(5):
        first.privatize(np.ones(8), rng(seed))
    assert first.rounds_released == 5
    assert first.spent(1e-5) == pytest.approx(first.epsilon(5, 1e-5))

    resumed = GaussianMechanism(clip_norm=1.0, noise_multiplier=2.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for seed in range(3):
        resumed.privatize(np.ones(8), rng(seed))
    reference = RDPAccountant()
    for sigma, steps in ((1.0, 5), (2.0, 3)):
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=1.0)
    assert resumed.rounds_released == 8
    assert resumed.spent(1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)


# -- partial sharing and SVT caps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "size", "count"),
    [(0.29, 100, 29), (0.1, 30, 3), (0.1, 5, 1), (0.001, 10, 1), (1.0, 7, 7), (0.5, 0, 0), (0.5, 1, 1), (0.7, 10, 7)],
)
def test_share_count_rule(fraction, size, count):
    assert share_count(fraction, size) == count


def documented_cap(fraction: float, size: int) -> int:
    """docs/privacy.md: max(1, floor(fraction * n)) of n components, the fraction at its decimal value; 0 if n = 0."""
    if size == 0:
        return 0
    return min(size, max(1, math.floor(Decimal(repr(fraction)) * size)))


@settings(max_examples=300, deadline=None)
@given(vector=vectors, fraction=fractions)
def test_partial_sharing_keeps_at_most_the_cap_and_the_largest(vector, fraction):
    update = PartialSharing(fraction).privatize(vector, rng())
    kept = np.flatnonzero(update.delta)
    assert kept.size <= documented_cap(fraction, vector.size)
    np.testing.assert_array_equal(update.delta[kept], vector[kept])
    dropped = np.setdiff1d(np.flatnonzero(vector), kept)
    if kept.size and dropped.size:
        assert np.min(np.abs(vector[kept])) >= np.max(np.abs(vector[dropped]))
    if np.count_nonzero(vector) >= documented_cap(fraction, vector.size):
        assert kept.size == documented_cap(fraction, vector.size)  # the cap is used, not just respected
    assert update.shared_fraction == (kept.size / vector.size if vector.size else 0.0)


def test_partial_sharing_breaks_ties_by_position():
    update = PartialSharing(0.5).privatize(np.array([1.0, -1.0, 1.0, 1.0]), rng())
    np.testing.assert_array_equal(update.delta, [1.0, -1.0, 0.0, 0.0])
    assert PartialSharing(0.5).epsilon(10, 1e-5) is None


@settings(max_examples=150, deadline=None)
@given(
    vector=vectors,
    fraction=fractions,
    epsilon=st.floats(0.01, 100.0),
    bound=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_svt_shares_at_most_the_cap_within_the_bound(vector, fraction, epsilon, bound, seed):
    svt = SparseVectorTechnique(fraction=fraction, epsilon=epsilon, clip_bound=bound)
    update = svt.privatize(vector, rng(seed))
    assert np.count_nonzero(update.delta) <= documented_cap(fraction, vector.size)
    # With clip_after_noise (the default) released values are within the bound after their noise too.
    assert np.all(np.abs(update.delta) <= bound)
    assert update.clipped_norm is not None
    assert update.clipped_norm <= bound * math.sqrt(documented_cap(fraction, vector.size)) * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(vector=small_vectors, fraction=fractions, bound=st.floats(1e-3, 5.0), seed=st.integers(0, 2**32 - 1))
def test_svt_values_before_noise_are_the_clipped_update(vector, fraction, bound, seed):
    # An epsilon so large that the noise vanishes shows what the noise is added to: the component clipped to
    # [-bound, bound], and only components at or above the threshold get selected.
    svt = SparseVectorTechnique(fraction=fraction, epsilon=1e15, clip_bound=bound, threshold=bound / 2,
                                clip_after_noise=False)
    plan = svt.budget(vector.size)
    update = svt.privatize(vector, rng(seed))
    selected = np.flatnonzero(update.delta)
    clipped = np.clip(vector, -bound, bound)
    slack = 50 * (plan.answer_scale + plan.query_scale + plan.threshold_scale)
    assert np.all(np.abs(update.delta[selected] - clipped[selected]) <= slack)
    assert np.all(np.abs(update.delta) <= bound + slack)
    assert np.all(np.abs(clipped[selected]) >= bound / 2 - slack)
    eligible = np.count_nonzero(np.abs(clipped) >= bound / 2 + slack)
    assert selected.size >= min(eligible, plan.count)


def test_svt_splits_epsilon_as_documented():
    svt = SparseVectorTechnique(fraction=0.01, epsilon=2.0, clip_bound=0.1, selection_share=0.4)
    plan = svt.budget(100_000)
    assert plan.count == 1000
    assert plan.epsilon_threshold + plan.epsilon_queries + plan.epsilon_answers == pytest.approx(2.0)
    assert plan.epsilon_threshold + plan.epsilon_queries == pytest.approx(0.8)
    assert plan.epsilon_queries / plan.epsilon_threshold == pytest.approx(2000 ** (2 / 3))
    assert plan.threshold_scale == pytest.approx(0.1 / plan.epsilon_threshold)
    assert plan.query_scale == pytest.approx(2 * 1000 * 0.1 / plan.epsilon_queries)
    assert plan.answer_scale == pytest.approx(2 * 1000 * 0.1 / plan.epsilon_answers)
    assert svt.epsilon(rounds=10, delta=1e-5) == pytest.approx(20.0)
    assert svt.epsilon(rounds=10, delta=0.0) == pytest.approx(20.0)  # pure DP: delta plays no part


def test_svt_answer_noise_is_laplace_of_the_documented_scale():
    svt = SparseVectorTechnique(fraction=0.5, epsilon=1.0, clip_bound=0.01, clip_after_noise=False)
    update = svt.privatize(np.zeros(40_000), rng(11))
    values = update.delta[update.delta != 0]
    scale = svt.budget(40_000).answer_scale
    assert values.size == 20_000  # the quota fills: with this much noise, half the queries pass each pass
    assert stats.kstest(values / scale, "laplace").pvalue > 1e-3
    assert np.std(values) == pytest.approx(math.sqrt(2) * scale, rel=0.03)


def test_svt_prefers_large_components_when_the_budget_allows():
    delta = np.concatenate([np.full(100, 1.0), np.full(900, 1e-4)])
    svt = SparseVectorTechnique(fraction=0.1, epsilon=1e6, clip_bound=1.0, threshold=0.5)
    update = svt.privatize(delta, rng(5))
    assert set(np.flatnonzero(update.delta)) == set(range(100))
    assert svt.epsilon(1, 1e-5) == 1e6


def test_svt_shares_fewer_when_passes_run_out():
    # A threshold far above every query, one pass and little noise: nothing passes, nothing is forced through.
    svt = SparseVectorTechnique(fraction=0.5, epsilon=1e6, clip_bound=1.0, threshold=100.0, max_passes=1)
    update = svt.privatize(np.ones(100), rng())
    assert update.shared_fraction == 0.0


# -- chains --------------------------------------------------------------------------------------------------------


def test_gaussian_then_partial_is_sparse_and_keeps_the_gaussian_epsilon():
    gaussian = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    chain = PrivacyChain([gaussian, PartialSharing(0.05)])
    update = chain.privatize(rng(1).normal(size=1000), rng(2))
    assert np.count_nonzero(update.delta) == 50
    assert update.shared_fraction == 0.05
    assert update.clipped_norm == pytest.approx(1.0)  # the Gaussian's, before noise
    assert chain.epsilon(10, 1e-5) == gaussian.epsilon(10, 1e-5)
    assert chain.rounds_released == gaussian.rounds_released == 1


def test_chain_epsilon_sums_the_formal_stages_splitting_delta():
    g1 = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    g2 = GaussianMechanism(clip_norm=0.5, noise_multiplier=2.0)
    svt = SparseVectorTechnique(fraction=0.1, epsilon=0.5, clip_bound=0.1)
    chain = PrivacyChain([g1, PartialSharing(0.5), g2, svt])
    expected = g1.epsilon(10, 0.5e-5) + g2.epsilon(10, 0.5e-5) + 5.0
    assert chain.epsilon(10, 1e-5) == pytest.approx(expected)
    assert PrivacyChain([g1, svt]).epsilon(10, 1e-5) == pytest.approx(g1.epsilon(10, 1e-5) + 5.0)
    assert PrivacyChain([PartialSharing(0.1)]).epsilon(10, 1e-5) is None
    for _ in range(3):
        chain.privatize(np.ones(20), rng())
    assert chain.spent(1e-5) == pytest.approx(chain.epsilon(3, 1e-5))


# -- edge cases ----------------------------------------------------------------------------------------------------


def all_mechanisms() -> list[UpdateMechanism]:
    return [
        GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0),
        PartialSharing(0.1),
        SparseVectorTechnique(fraction=0.1, epsilon=1.0, clip_bound=0.1),
        PrivacyChain([GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0), PartialSharing(0.1)]),
    ]


@pytest.mark.parametrize("mechanism", all_mechanisms(), ids=lambda m: m.name)
def test_empty_and_zero_updates(mechanism):
    empty = mechanism.privatize(np.empty(0), rng())
    assert empty.delta.shape == (0,) and empty.shared_fraction == 0.0
    with np.errstate(all="raise"):
        zero = mechanism.privatize(np.zeros(50), rng())
    assert zero.delta.shape == (50,) and np.isfinite(zero.delta).all()
    assert zero.clipped_norm == 0.0


@pytest.mark.parametrize("mechanism", all_mechanisms(), ids=lambda m: m.name)
@pytest.mark.parametrize(("bad", "index"), [(np.nan, 3), (np.inf, 0), (-np.inf, 9)])
def test_non_finite_updates_are_refused_naming_the_index(mechanism, bad, index):
    delta = np.ones(10)
    delta[index] = bad
    with pytest.raises(ValueError, match=rf"delta\[{index}\] is {bad}"):
        mechanism.privatize(delta, rng())
    assert mechanism.rounds_released == 0  # a refused update is not a release


@pytest.mark.parametrize("mechanism", all_mechanisms(), ids=lambda m: m.name)
def test_deterministic_with_a_seeded_rng_and_leaves_the_input_alone(mechanism):
    delta = rng(99).normal(size=500)
    original = delta.copy()
    first = mechanism.privatize(delta, rng(42)).delta
    second = mechanism.privatize(delta, rng(42)).delta
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(delta, original)
    if mechanism.name != "partial":  # the only one without randomness
        assert not np.array_equal(first, mechanism.privatize(delta, rng(43)).delta)
    assert not first.flags.writeable  # kept for a retry, it cannot be changed by accident


def test_input_shapes_and_rng_are_checked():
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="flat"):
        mechanism.privatize(np.ones((2, 3)), rng())
    with pytest.raises(TypeError, match="Generator"):
        mechanism.privatize(np.ones(3), np.random.RandomState(0))  # type: ignore[arg-type]
    update = mechanism.privatize(np.ones(3, dtype=np.float32), rng())
    assert update.delta.dtype == np.float64
    assert isinstance(update, PrivatizedUpdate)


# -- constructors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaussianMechanism(clip_norm=0.0, noise_multiplier=1.0), "clip_norm: must be > 0, got 0.0"),
        (lambda: GaussianMechanism(clip_norm=1.0), "noise_multiplier: give exactly one"),
        (lambda: GaussianMechanism(1.0, 1.0, target_epsilon=1.0, rounds=3), "noise_multiplier: give exactly one"),
        (lambda: GaussianMechanism(1.0, -1.0), "noise_multiplier: must be > 0"),
        (lambda: GaussianMechanism(1.0, 1.0, rounds=3), "rounds: only used with target_epsilon"),
        (lambda: GaussianMechanism(1.0, target_epsilon=1.0), "rounds: required with target_epsilon"),
        (lambda: GaussianMechanism(1.0, target_epsilon=1.0, rounds=0), "rounds: must be >= 1"),
        (lambda: GaussianMechanism(1.0, target_epsilon=1e-9, rounds=10), "target_epsilon: 1e-09 cannot be met"),
        (lambda: GaussianMechanism(1.0, 1.0, target_delta=1.0), "target_delta: must be < 1"),
        (lambda: GaussianMechanism(1.0, 1.0, accountant="gdp"), "accountant: 'gdp' is refused"),
        (lambda: GaussianMechanism(1.0, 1.0, accountant="moments"), "accountant: must be one of rdp, prv"),
        (lambda: GaussianMechanism(float("nan"), 1.0), "clip_norm: must be finite"),
        (lambda: GaussianMechanism(True, 1.0), "clip_norm: must be a number"),
        (lambda: PartialSharing(0.0), "fraction: must be > 0"),
        (lambda: PartialSharing(1.5), "fraction: must be <= 1"),
        (lambda: SparseVectorTechnique(0.1, 0.0, 1.0), "epsilon: must be > 0"),
        (lambda: SparseVectorTechnique(0.1, 1.0, -1.0), "clip_bound: must be > 0"),
        (lambda: SparseVectorTechnique(0.1, 1.0, 1.0, threshold=-0.1), "threshold: must be >= 0"),
        (lambda: SparseVectorTechnique(0.1, 1.0, 1.0, selection_share=1.0), "selection_share: must be < 1"),
        (lambda: SparseVectorTechnique(0.1, 1.0, 1.0, max_passes=0), "max_passes: must be >= 1"),
        (lambda: SparseVectorTechnique(0.1, 1.0, 1.0, clip_after_noise="yes"), "clip_after_noise: must be true"),
        (lambda: PrivacyChain([]), "mechanisms: must hold at least one"),
        (lambda: PrivacyChain([PartialSharing(0.1), "gaussian"]), r"mechanisms\[1\]: must be an UpdateMechanism"),
    ],
)
def test_constructors_validate_with_messages_naming_the_argument(build, message):
    with pytest.raises(PrivacyConfigError, match=message):
        build()


def test_epsilon_arguments_are_checked():
    mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="rounds: must be >= 0"):
        mechanism.epsilon(-1, 1e-5)
    with pytest.raises(ValueError, match="delta: must be > 0"):
        mechanism.epsilon(10, 0.0)
    with pytest.raises(ValueError, match="delta: must be < 1"):
        mechanism.epsilon(10, 1.0)


# -- config --------------------------------------------------------------------------------------------------------


def test_config_shapes():
    assert mechanism_from_config(None) is None
    assert mechanism_from_config({}) is None
    assert mechanism_from_config([]) is None

    gaussian = mechanism_from_config({"gaussian": {"clip_norm": 1.0, "noise_multiplier": 0.8}})
    assert isinstance(gaussian, GaussianMechanism)
    assert (gaussian.clip_norm, gaussian.noise_multiplier, gaussian.accountant) == (1.0, 0.8, "rdp")

    partial = mechanism_from_config({"partial": {"fraction": 0.1}})
    assert isinstance(partial, PartialSharing) and partial.fraction == 0.1

    svt = mechanism_from_config(
        {"svt": {"fraction": 0.1, "epsilon": 1.0, "clip_bound": 0.01, "threshold": 0.002, "selection_share": 0.3}}
    )
    assert isinstance(svt, SparseVectorTechnique)
    assert (svt.threshold, svt.selection_share, svt.round_epsilon) == (0.002, 0.3, 1.0)

    budget = mechanism_from_config({"gaussian": {"clip_norm": 1.0, "target_epsilon": 8.0}}, rounds=10)
    assert isinstance(budget, GaussianMechanism) and budget.rounds == 10
    assert budget.epsilon(10, budget.target_delta) <= 8.0
    own_rounds = mechanism_from_config({"gaussian": {"clip_norm": 1.0, "target_epsilon": 8.0, "rounds": 5}}, rounds=10)
    assert own_rounds.rounds == 5

    single = mechanism_from_config([{"partial": {"fraction": 0.2}}])
    assert isinstance(single, PartialSharing)

    chain = mechanism_from_config(
        [{"gaussian": {"clip_norm": 1.0, "noise_multiplier": 0.8}}, {"partial": {"fraction": 0.1}}]
    )
    assert isinstance(chain, PrivacyChain)
    assert [stage.name for stage in chain.stages] == ["gaussian", "partial"]


def test_config_from_omegaconf_yaml():
    config = OmegaConf.create(
        """
        privacy:
          - gaussian: {clip_norm: 1.0, noise_multiplier: 0.8}
          - svt: {fraction: 0.1, epsilon: 1.0, clip_bound: 1.0e-2}
        """
    )
    chain = mechanism_from_config(config.privacy)
    assert isinstance(chain, PrivacyChain)
    assert [stage.name for stage in chain.stages] == ["gaussian", "svt"]
    assert chain.stages[1].clip_bound == 0.01
    assert mechanism_from_config(OmegaConf.create({"privacy": {}}).privacy) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gaussian": {"clip_norm": -1, "noise_multiplier": 0.8}}, "privacy.gaussian.clip_norm: must be > 0, got -1"),
        ({"gausian": {"clip_norm": 1}}, "privacy.gausian: unknown mechanism.*did you mean 'gaussian'"),
        ({"gaussian": {"clip_norm": 1, "sigma": 1}}, "privacy.gaussian.sigma: unknown option"),
        ({"gaussian": {"noise_multiplier": 1}}, "privacy.gaussian.clip_norm: required"),
        ({"gaussian": {"clip_norm": 1, "target_epsilon": 4}}, "privacy.gaussian.rounds: required with target_epsilon"),
        ({"partial": None}, "privacy.partial.fraction: required"),
        ({"partial": 0.1}, "privacy.partial: expected a mapping of options"),
        ({"partial": {"fraction": "0.1"}}, "privacy.partial.fraction: must be a number"),
        ({"partial": {"fraction": 0.1}, "svt": {}}, "privacy: one mechanism per mapping"),
        ([{"partial": {"fraction": 0.1}}, {"svt": {"fraction": 2, "epsilon": 1, "clip_bound": 1}}],
         r"privacy\[1\].svt.fraction: must be <= 1, got 2"),
        ([{"partial": {"fraction": 0.1}}, "svt"], r"privacy\[1\]: expected one mechanism"),
        ("gaussian", "privacy: expected a mechanism"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(PrivacyConfigError, match=message):
        mechanism_from_config(config)


def test_bad_config_error_is_a_value_error_with_the_key():
    with pytest.raises(ValueError) as caught:
        mechanism_from_config({"svt": {"fraction": 0.1, "epsilon": 1.0, "clip_bound": 0}})
    assert caught.value.key == "privacy.svt.clip_bound"


# -- checkpoints -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(4), ids=["gaussian", "partial", "svt", "chain"])
def test_state_dict_round_trip(index):
    mechanism = all_mechanisms()[index]
    for seed in range(4):
        mechanism.privatize(rng(seed).normal(size=64), rng(seed))
    state = json.loads(json.dumps(mechanism.state_dict()))  # plain data, fit for any checkpoint format
    restored = all_mechanisms()[index]
    restored.load_state_dict(state)
    assert restored.rounds_released == mechanism.rounds_released == 4
    assert restored.spent(1e-5) == mechanism.spent(1e-5)
    assert restored.state_dict() == state
    restored.privatize(np.ones(64), rng())
    assert restored.rounds_released == 5


def test_state_of_another_mechanism_is_refused_and_changes_nothing():
    gaussian = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
    gaussian.privatize(np.ones(4), rng())
    with pytest.raises(ValueError, match="not 'svt'"):
        SparseVectorTechnique(0.1, 1.0, 1.0).load_state_dict(gaussian.state_dict())
    chain = PrivacyChain([GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0), PartialSharing(0.1)])
    chain.privatize(np.ones(4), rng())
    before = chain.state_dict()
    other = PrivacyChain([PartialSharing(0.1), GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)])
    other.privatize(np.ones(4), rng())
    other.privatize(np.ones(4), rng())
    with pytest.raises(ValueError):
        chain.load_state_dict(other.state_dict())
    assert chain.state_dict() == before
    with pytest.raises(ValueError, match="stages"):
        chain.load_state_dict({"mechanism": "chain", "ledger": [], "stages": [before["stages"][0]]})
    with pytest.raises(ValueError, match=r"ledger\[0\]\[1\]"):
        gaussian.load_state_dict({"mechanism": "gaussian", "ledger": [[1.0, -2]]})
