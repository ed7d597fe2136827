"""Tests of collapselab.theory against values worked out by hand (PAPER.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collapselab import theory as th
from collapselab.theory import Cause as K
from collapselab.theory import Status as S
from collapselab.verdicts import render_check, render_regime

INF, NAN = math.inf, math.nan


# --------------------------------------------------------------------------- single generation


def test_kl_upper_bound_scalar_and_vector():
    # ½ · 0.3 = 0.15
    assert th.kl_upper_bound(0.3) == pytest.approx(0.15)
    assert isinstance(th.kl_upper_bound(0.3), float)
    np.testing.assert_allclose(th.kl_upper_bound([0.0, 2.0, INF]), [0.0, 1.0, INF])
    assert math.isnan(th.kl_upper_bound(NAN))


def test_chi2_lower_bound_with_and_without_quartic_term():
    # ¼ · 0.4 · 0.5 = 0.05 ; minus C ε⁴ = 0.1 · 0.25 = 0.025 → 0.025
    assert th.chi2_lower_bound(0.4, 0.5) == pytest.approx(0.05)
    assert th.chi2_lower_bound(0.4, 0.5, C=0.1) == pytest.approx(0.025)
    np.testing.assert_allclose(th.chi2_lower_bound([0.0, 1.0], [0.2, 0.2]), [0.0, 0.05])


def test_chi2_lower_bound_clean_and_clean_regime():
    # η ε² / 8 = 0.4 · 0.5 / 8 = 0.025
    assert th.chi2_lower_bound_clean(0.4, 0.5) == pytest.approx(0.025)
    # C = 0: only ε² ≤ 1
    assert th.clean_regime(0.4, 1.0) is True
    assert th.clean_regime(0.4, 1.01) is False
    # C = 0.1, η = 0.4: η/(8C) = 0.4/0.8 = 0.5, so the cap is min(1, 0.5) = 0.5
    assert th.clean_regime(0.4, 0.5, C=0.1) is True
    assert th.clean_regime(0.4, 0.51, C=0.1) is False
    # C = 0.01: η/(8C) = 5 → cap 1
    assert th.clean_regime(0.4, 0.99, C=0.01) is True
    assert th.clean_regime(0.4, NAN) is False
    assert th.clean_regime(NAN, 0.1, C=0.1) is False
    np.testing.assert_array_equal(th.clean_regime(0.4, [0.1, 0.6], C=0.1), [True, False])


def test_clean_regime_is_exactly_where_clean_bound_is_below_full_bound():
    # In the clean regime ¼ηε² − Cε⁴ ≥ ηε²/8 (the paper's reason for the clean bound).
    eta, C = 0.3, 0.2
    for e in np.linspace(0.01, 1.0, 50):
        if th.clean_regime(eta, e, C):
            assert th.chi2_lower_bound(eta, e, C) >= th.chi2_lower_bound_clean(eta, e) - 1e-15


def test_intra_upper_and_two_sided():
    # 4 · 0.5 = 2 ; + c ε⁴ = 2 · 0.25 = 0.5 → 2.5
    assert th.intra_upper_bound(0.5) == pytest.approx(2.0)
    assert th.intra_upper_bound(0.5, c=2.0) == pytest.approx(2.5)
    lo, hi = th.two_sided_intra_bounds(0.4, 0.5, C=0.1, c=2.0)
    assert (lo, hi) == (pytest.approx(0.025), pytest.approx(2.5))
    lo, hi = th.two_sided_intra_bounds([0.4, 0.8], [0.5, 0.5])
    np.testing.assert_allclose(lo, [0.05, 0.1])
    np.testing.assert_allclose(hi, [2.0, 2.0])


def test_perturbative():
    assert th.perturbative(1.0) is True
    assert th.perturbative(1.0000001) is False
    assert th.perturbative(NAN) is False
    assert th.perturbative(INF) is False
    np.testing.assert_array_equal(th.perturbative([0.1, 2.0]), [True, False])


# --------------------------------------------------------------------------- check_bound


def test_check_bound_upper_held_and_violated():
    c = th.check_bound("bound_kl_upper", 0.15, 0.10, 0.01, "upper")
    assert c.held is True and c.status is S.HELD and c.cause is K.NONE
    assert c.gap == pytest.approx(-0.05)
    # measured 0.16 − 2 · 0.01 = 0.14 ≤ 0.15: consistent within noise
    c = th.check_bound("b", 0.15, 0.16, 0.01, "upper")
    assert c.held is True and c.gap == pytest.approx(0.01) and c.sigma == pytest.approx(0.01)
    assert "within 2 standard errors" in render_check(c)
    # measured 0.20: gap 0.05 = 5 standard errors > 2
    c = th.check_bound("b", 0.15, 0.20, 0.01, "upper")
    assert c.held is False and c.status is S.FAILED and c.cause is K.VIOLATED
    assert "violated by 0.05 (5.0 standard errors)" in render_check(c)
    assert (c.name, c.bound, c.measured, c.stderr, c.direction) == ("b", 0.15, 0.2, 0.01, "upper")
    c = th.check_bound("b", 0.15, 0.20, 0.01, "upper", fail_cause=K.LEADING_ORDER_c)
    assert c.cause is K.LEADING_ORDER_c and "c ε⋆⁴" in render_check(c)


def test_check_bound_lower_and_bound_stderr():
    assert th.check_bound("b", 0.05, 0.06, 0.0, "lower").held is True
    assert th.check_bound("b", 0.05, 0.04, 0.0, "lower").held is False
    # tolerance 2 · sqrt(0.003² + 0.004²) = 2 · 0.005 = 0.01: gap 0.009 → held, 0.011 → not
    assert th.check_bound("b", 0.05, 0.041, 0.003, "lower", bound_stderr=0.004).held is True
    assert th.check_bound("b", 0.05, 0.039, 0.003, "lower", bound_stderr=0.004).held is False
    c = th.check_bound("b", 0.05, 0.04, NAN, "lower")
    assert c.held is False and not c.stderr_known and "no standard error" in render_check(c)


def test_check_bound_premises_and_unusable_numbers():
    c = th.check_bound("b", 0.1, 0.05, eps_sq=1.5)
    assert c.held is None and c.cause is K.NOT_PERTURBATIVE and c.status is S.NO_CLAIM
    assert "perturbative" in render_check(c) and "1.5" in render_check(c)
    c = th.check_bound("b", 0.1, 0.05, generation=2, i0=3)
    assert c.held is None and c.cause is K.TRANSIENT and "transient" in render_check(c)
    assert th.check_bound("b", 0.1, 0.05, generation=3, i0=3).held is True
    c = th.check_bound("b", 0.1, 0.05, premises=[(False, K.NOT_CLEAN)])
    assert c.held is None and c.cause is K.NOT_CLEAN and "clean regime" in render_check(c)
    c = th.check_bound("b", 0.1, NAN)
    assert c.held is None and c.cause is K.MEASURED_NAN and "NaN" in render_check(c)
    assert th.check_bound("b", NAN, 0.1).cause is K.BOUND_NAN
    assert th.check_bound("b", 0.1, 0.1, eps_sq=NAN).cause is K.EPS_UNKNOWN
    assert th.check_bound("b", INF, 0.1, direction="upper").cause is K.BOUND_INFINITE
    c = th.check_bound("b", 0.1, INF, direction="upper")
    assert c.held is None and c.cause is K.MEASURED_INFINITE and "infinite" in render_check(c)
    c = th.check_bound("b", 0.1, INF, direction="lower")
    assert c.held is True and c.cause is K.MEASURED_INFINITE_OK
    with pytest.raises(ValueError):
        th.check_bound("b", 0.1, 0.1, direction="sideways")
    with pytest.raises(ValueError):
        th.check_bound("b", 0.1, 0.1, stderr=-1.0)


def test_every_code_has_words():
    # The renderers cover every code the theory layer can return (no English matching).
    from collapselab.verdicts import CAUSE_TAG, STATUS_TEXT

    assert set(CAUSE_TAG) == set(K) and set(STATUS_TEXT) == set(S)


def test_check_single_generation_names_values_and_premises():
    checks = th.check_single_generation(
        eps_star_sq=0.2, eta=0.4, eps_hat_sq=0.3, intra_kl=0.1, intra_chi2=0.05,
        generation=4, i0=2, C=0.1,
    )
    by = {c.name: c for c in checks}
    assert list(by) == ["bound_kl_upper", "bound_chi2_lower", "bound_chi2_lower_clean",
                        "bound_intra_upper"]
    # ½ · 0.3 = 0.15 ; ¼·0.4·0.2 − 0.1·0.04 = 0.02 − 0.004 = 0.016 ; 0.4·0.2/8 = 0.01 ; 4·0.2 = 0.8
    assert by["bound_kl_upper"].bound == pytest.approx(0.15)
    assert by["bound_chi2_lower"].bound == pytest.approx(0.016)
    assert by["bound_chi2_lower_clean"].bound == pytest.approx(0.01)
    assert by["bound_intra_upper"].bound == pytest.approx(0.8)
    assert all(c.held is True for c in checks)
    # clean regime with C = 0.1, η = 0.4: cap 0.5; ε² = 0.6 is outside it
    checks = th.check_single_generation(eps_star_sq=0.6, eta=0.4, intra_chi2=1.0, C=0.1)
    by = {c.name: c for c in checks}
    assert by["bound_chi2_lower_clean"].held is None
    assert by["bound_chi2_lower"].held is True
    # before the transient nothing is claimed
    checks = th.check_single_generation(eps_star_sq=0.2, intra_chi2=5.0, generation=0, i0=1)
    assert [c.held for c in checks] == [None]


def test_kl_upper_has_no_perturbative_or_transient_premise():
    # Prop 3.1 needs only the score/regularity assumptions: a claim at ε⋆² > 1 and i < i0
    # (the paper-gmm-cpu generation-0 case: KL_t0 1.485 ≤ ½ ε̂² = 1.52).
    checks = th.check_single_generation(eps_star_sq=3.0, eps_hat_sq=3.04, intra_kl=1.485,
                                        intra_chi2=2.0, generation=0, i0=1)
    by = {c.name: c for c in checks}
    assert by["bound_kl_upper"].held is True and by["bound_kl_upper"].status is S.HELD
    assert by["bound_intra_upper"].held is None
    assert by["bound_intra_upper"].cause is K.TRANSIENT
    (c,) = th.check_single_generation(eps_star_sq=3.0, eps_hat_sq=1.0, intra_kl=2.0)
    assert c.held is False and c.cause is K.EPS_HAT_ESTIMATE
    # a gap within the start term KL(p̂_T ‖ q_T) names the start as the likely cause
    (c,) = th.check_single_generation(eps_star_sq=3.0, eps_hat_sq=1.0, intra_kl=0.7, kl_T=0.3)
    assert c.held is False and c.cause is K.START_TERM
    (c,) = th.check_single_generation(eps_star_sq=3.0, eps_hat_sq=1.0, intra_kl=2.0,
                                      against_t0=False)
    assert c.cause is K.NOT_T0 and "t0" in render_check(c)


def test_kl_upper_is_an_identity_for_exact_own_law_and_calibrates_eps_hat():
    # KL_t0 = KL_T + ½ ε̂²: 0.02 + 0.5 · 0.4 = 0.22
    kw = dict(eps_star_sq=0.3, eps_hat_sq=0.4, eps_hat_sq_stderr=0.02, intra_kl_stderr=0.005,
              kl_T=0.02, kl_T_stderr=0.001, exact_own_law=True)
    ident, cal = th.check_single_generation(intra_kl=0.225, **kw)
    assert ident.name == "bound_kl_upper" and ident.held is None
    assert ident.status is S.IDENTITY and ident.cause is K.EXACT_OWN_LAW
    assert "identity" in render_check(ident)
    assert cal.name == "calibration_eps_hat" and cal.held is None
    assert cal.bound == pytest.approx(0.22) and cal.measured == pytest.approx(0.225)
    # se = sqrt(0.005² + 0.001² + 0.01²) = 0.01122; |0.005| ≤ 2 se → consistent
    assert cal.sigma == pytest.approx(math.sqrt(0.005**2 + 0.001**2 + 0.01**2))
    assert cal.status is S.CONSISTENT
    _, cal = th.check_single_generation(intra_kl=0.30, **kw)  # ½ ε̂² reads low
    assert cal.status is S.INCONSISTENT and cal.cause is K.EPS_HAT_LOW
    _, cal = th.check_single_generation(intra_kl=0.15, **kw)
    assert cal.status is S.INCONSISTENT and cal.cause is K.EPS_HAT_HIGH
    assert "high" in render_check(cal)
    _, cal = th.check_single_generation(intra_kl=NAN, **kw)
    assert cal.status is S.NO_CLAIM and cal.cause is K.MEASURED_NAN
    # without KL_T there is no calibration row
    kw.pop("kl_T")
    assert [c.name for c in th.check_single_generation(intra_kl=0.2, **kw)] == ["bound_kl_upper"]


def test_check_single_generation_propagates_bound_stderr():
    # upper bound 4ε²: d/dε² = 4, so se = 4 · 0.01 = 0.04
    (c,) = th.check_single_generation(eps_star_sq=0.2, intra_chi2=0.85, eps_star_sq_stderr=0.01)
    assert c.bound_stderr == pytest.approx(0.04)
    assert c.held is True  # 0.85 − 0.8 = 0.05 ≤ 2 · 0.04


# --------------------------------------------------------------------------- contraction


def test_contraction_factor_and_mixture_chi2():
    # (1 − 0.25)² = 0.5625
    assert th.contraction_factor(0.25) == pytest.approx(0.5625)
    np.testing.assert_allclose(th.contraction_factor([0.0, 0.5, 1.0]), [1.0, 0.25, 0.0])
    # 0.5625 · 2 = 1.125
    assert th.mixture_chi2(0.25, 2.0) == pytest.approx(1.125)
    assert th.mixture_chi2(0.25, INF) == INF
    assert th.mixture_chi2(1.0, INF) == 0.0
    assert th.mixture_chi2(0.0, 3.0) == 3.0
    assert math.isnan(th.mixture_chi2(1.0, NAN))
    with pytest.raises(ValueError):
        th.contraction_factor(1.5)
    with pytest.raises(ValueError):
        th.mixture_chi2(-0.1, 1.0)


def test_mixture_chi2_matches_direct_discrete_computation():
    # Two-point distributions: p = (½, ½), r = (0.8, 0.2).
    # χ²(r‖p) = 0.8²/0.5 + 0.2²/0.5 − 1 = 1.28 + 0.08 − 1 = 0.36
    # α = 0.5: mix = (0.65, 0.35); χ² = 0.65²/0.5 + 0.35²/0.5 − 1 = 0.845 + 0.245 − 1 = 0.09
    # and (1 − 0.5)² · 0.36 = 0.09
    assert th.mixture_chi2(0.5, 0.36) == pytest.approx(0.09)


# --------------------------------------------------------------------------- recursion


def test_recursion_lower_bound():
    # (0.2 / 2) · 0.3 = 0.03
    assert th.recursion_lower_bound(0.2, 0.3) == pytest.approx(0.03)
    assert th.recursion_lower_bound(0.0, INF) == 0.0
    assert th.recursion_lower_bound(0.5, INF) == INF
    np.testing.assert_allclose(th.recursion_lower_bound(1.0, [0.2, 0.4]), [0.1, 0.2])


def test_check_recursion_slack():
    # α = 0.5, r = 0.25. D = [0, 0.1, 0.2], I = [0.4, 0.2]
    # slack_0 = 0.1 + 0.25·0 − 0.25·0.4 = 0.0
    # slack_1 = 0.2 + 0.25·0.1 − 0.25·0.2 = 0.2 + 0.025 − 0.05 = 0.175
    s = th.check_recursion(0.5, [0.0, 0.1, 0.2], [0.4, 0.2])
    np.testing.assert_allclose(s, [0.0, 0.175], atol=1e-15)
    # A trailing I_N (needs D_{N+1}) is accepted and ignored.
    np.testing.assert_allclose(th.check_recursion(0.5, [0.0, 0.1, 0.2], [0.4, 0.2, 9.0]),
                               [0.0, 0.175], atol=1e-15)
    # violated: slack_0 = 0.01 − 0.25·0.4 = −0.09
    assert th.check_recursion(0.5, [0.0, 0.01], [0.4])[0] == pytest.approx(-0.09)
    s = th.check_recursion(0.5, [0.0, INF, 0.1], [0.1, INF])
    assert s[0] == INF and math.isnan(s[1])  # ∞ − ∞: undecidable
    with pytest.raises(ValueError):
        th.check_recursion(0.5, [0.0, 0.1, 0.2], [0.4])


def test_persistence_floor():
    # α = 0.5, η_f = 0.4, ε_f = 0.2: 0.5·0.4·0.2 / (16 · (1 + 0.25)) = 0.04 / 20 = 0.002
    assert th.persistence_floor(0.5, 0.4, 0.2) == pytest.approx(0.002)
    assert th.persistence_floor(0.0, 0.4, 0.2) == 0.0
    # α = 1: 1·0.4·0.2 / (16 · 1) = 0.005
    assert th.persistence_floor(1.0, 0.4, 0.2) == pytest.approx(0.005)
    np.testing.assert_allclose(th.persistence_floor([0.5, 1.0], 0.4, 0.2), [0.002, 0.005])


# --------------------------------------------------------------------------- discounting


def test_discount_matrix_orientation_and_values():
    W = th.discount_matrix(0.5, 3)  # r = 0.25
    expected = np.array([
        [1.0, 0.0, 0.0],        # D_1 = ε_0²
        [0.25, 1.0, 0.0],       # D_2 = r ε_0² + ε_1²
        [0.0625, 0.25, 1.0],    # D_3 = r² ε_0² + r ε_1² + ε_2²
    ])
    np.testing.assert_allclose(W, expected)
    np.testing.assert_array_equal(th.discount_matrix(1.0, 3), np.eye(3))
    np.testing.assert_array_equal(th.discount_matrix(0.0, 3), np.tril(np.ones((3, 3))))
    assert th.discount_matrix(0.3, 0).shape == (0, 0)
    with pytest.raises(ValueError):
        th.discount_matrix(0.5, 2.5)


def test_discount_matrix_times_errors_is_predicted_divergence():
    eps = np.array([0.3, 0.1, 0.2, 0.05])
    for a in (0.0, 0.1, 0.5, 1.0):
        np.testing.assert_allclose(th.discount_matrix(a, 4) @ eps,
                                   th.predicted_divergence(a, eps))


def test_memory_length():
    # weight (1−α)^{2m} = 1/e ⇒ m = −1 / (2 ln(1−α)); α = 0.5: 1 / (2 ln 2) = 0.72135
    assert th.memory_length(0.5) == pytest.approx(1 / (2 * math.log(2)))
    assert (1 - 0.5) ** (2 * th.memory_length(0.5)) == pytest.approx(math.exp(-1))
    assert th.memory_length(0.0) == INF
    assert th.memory_length(1.0) == 0.0
    # small α: ≈ 1/(2α)
    assert th.memory_length(0.01) == pytest.approx(50.0, rel=0.01)
    # threshold 1/e²: m = 1/|ln(1−α)| ≈ 1/α
    assert th.memory_length(0.01, threshold=math.exp(-2)) == pytest.approx(100.0, rel=0.01)
    np.testing.assert_allclose(th.memory_length([0.0, 1.0]), [INF, 0.0])
    assert np.all(np.diff(th.memory_length(np.linspace(0.01, 0.99, 20))) < 0)


def test_predicted_divergence_by_hand():
    # α = 0.5, r = 0.25, ε² = [0.1, 0.2, 0.3], i0 = 0, D_0 = 0
    # D_1 = 0.1 ; D_2 = 0.25·0.1 + 0.2 = 0.225 ; D_3 = 0.25·0.225 + 0.3 = 0.35625
    np.testing.assert_allclose(th.predicted_divergence(0.5, [0.1, 0.2, 0.3]),
                               [0.1, 0.225, 0.35625])
    # i0 = 1, D_1 = 0.4, C_bias = 0.01: entry 0 is NaN;
    # D_2 = 0.2 + 0.25·0.4 = 0.3 ; D_3 = 0.3 + 0.25·0.2 + 0.0625·0.4 = 0.3 + 0.05 + 0.025 = 0.375
    out = th.predicted_divergence(0.5, [0.1, 0.2, 0.3], D_i0=0.4, i0=1, C_bias=0.01)
    assert math.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.31, 0.385])


def test_predicted_divergence_edges():
    np.testing.assert_allclose(th.predicted_divergence(0.0, [0.1, 0.2, 0.3]), [0.1, 0.3, 0.6])
    # α = 1 forgets everything, even an infinite past error
    np.testing.assert_allclose(th.predicted_divergence(1.0, [INF, 0.2, 0.3], D_i0=5.0),
                               [INF, 0.2, 0.3])
    np.testing.assert_allclose(th.predicted_divergence(0.5, [INF, 0.2]), [INF, INF])
    assert th.predicted_divergence(0.5, []).shape == (0,)
    with pytest.raises(ValueError):
        th.predicted_divergence(0.5, [[0.1]])


def test_steady_state_and_convergence_of_constant_chain():
    # ε² / (α(2−α)) = 0.03 / (0.5 · 1.5) = 0.04
    assert th.steady_state(0.5, 0.03) == pytest.approx(0.04)
    assert th.steady_state(1.0, 0.03) == pytest.approx(0.03)
    assert th.steady_state(0.0, 0.03) == INF
    assert th.steady_state(0.0, 0.0) == 0.0
    np.testing.assert_allclose(th.steady_state([0.5, 1.0], 0.03), [0.04, 0.03])
    for a in (0.1, 0.5, 0.9):
        pred = th.predicted_divergence(a, np.full(400, 0.03))
        assert pred[-1] == pytest.approx(th.steady_state(a, 0.03), rel=1e-10)
        assert np.all(np.diff(pred) >= 0)  # approaches from below when started at 0


# --------------------------------------------------------------------------- regimes


def _chain(alpha, eps):
    return np.concatenate([[0.0], th.predicted_divergence(alpha, eps)])


GENS = np.arange(20, dtype=np.float64)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("with_eps", [True, False])
def test_regime_constant_error_saturates(alpha, with_eps):
    eps = np.full(20, 0.01)
    reg = th.classify_regime(alpha, _chain(alpha, eps), eps if with_eps else None)
    assert reg.label == "saturating", render_regime(reg)
    # plateau 0.01 / (α(2−α)); e.g. α = 0.5: 0.01 / 0.75 = 0.013333
    assert reg.plateau == pytest.approx(0.01 / (alpha * (2 - alpha)))
    assert "plateau" in render_regime(reg)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("with_eps", [True, False])
def test_regime_inverse_square_errors_stable(alpha, with_eps):
    eps = 0.05 / (GENS + 1.0) ** 2
    reg = th.classify_regime(alpha, _chain(alpha, eps), eps if with_eps else None)
    assert reg.label == "stable", render_regime(reg)
    if with_eps:
        assert reg.decay_exponent == pytest.approx(-2.0)


@pytest.mark.parametrize("with_eps", [True, False])
def test_regime_alpha_zero_with_floor_collapses(with_eps):
    eps = np.full(20, 0.01)
    reg = th.classify_regime(0.0, _chain(0.0, eps), eps if with_eps else None)
    assert reg.label == "collapsing", render_regime(reg)
    assert "α = 0" in render_regime(reg)
    assert reg.slope == pytest.approx(0.01)  # D_i = 0.01 i


def test_regime_alpha_zero_summable_saturates_and_harmonic_collapses():
    eps2 = 0.05 / (GENS + 1.0) ** 2
    assert th.classify_regime(0.0, _chain(0.0, eps2), eps2).label == "saturating"
    eps1 = 0.05 / (GENS + 1.0)  # Σ 1/i = ∞
    assert th.classify_regime(0.0, _chain(0.0, eps1), eps1).label == "collapsing"


def test_regime_slow_decay_with_discount_is_stable_but_mentions_persistence():
    eps1 = 0.05 / (GENS + 1.0)
    reg = th.classify_regime(0.5, _chain(0.5, eps1), eps1)
    assert reg.label == "stable" and "persistence" in render_regime(reg)


def test_regime_growing_errors_and_linear_rise_collapse():
    eps = 0.01 * (GENS + 1.0)
    assert th.classify_regime(0.5, _chain(0.5, eps), eps).label == "collapsing"
    # D_i = 0.01 i with α = 0.5: innovations D_(i+1) − ¼ D_i = 0.01 + 0.0075 i grow → collapse
    reg = th.classify_regime(0.5, 0.01 * np.arange(21.0), np.full(20, 0.01))
    assert reg.label == "collapsing" and "grows" in render_regime(reg)


def _recursion_by_hand(alpha, c, eps, n):
    """D_(i+1) = (1−α)² D_i + c·ε², D_0 = 0, written out without predicted_divergence."""
    D = [0.0]
    for _ in range(n):
        D.append((1.0 - alpha) * (1.0 - alpha) * D[-1] + c * eps)
    return np.array(D)


@pytest.mark.parametrize("c", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_regime_saturates_whatever_the_constant(alpha, c):
    # The measured bug: α = 0.5, c = 2 converges to 2·0.01/0.75 = 0.02667 and was called
    # collapsing by comparison with the unit-constant plateau 0.01/0.75 = 0.01333.
    D = _recursion_by_hand(alpha, c, 0.01, 20)
    reg = th.classify_regime(alpha, D, np.full(20, 0.01))
    assert reg.label == "saturating", render_regime(reg)
    limit = c * 0.01 / (1.0 - (1.0 - alpha) ** 2)
    assert reg.plateau == pytest.approx(limit, rel=1e-9)
    assert reg.innovation_constant == pytest.approx(c, rel=1e-9)
    if alpha == 0.5 and c == 2.0:
        assert reg.plateau == pytest.approx(0.026667, abs=1e-6)
    # without ε⋆² the same label and plateau; no constant can be fitted
    reg = th.classify_regime(alpha, D)
    assert reg.label == "saturating" and math.isnan(reg.innovation_constant)


@pytest.mark.parametrize("c", [0.5, 2.0, 4.0])
def test_regime_noisy_chains_with_constant(c):
    rng = np.random.default_rng(1)
    for _ in range(5):
        D = _recursion_by_hand(0.5, c, 0.01, 20) * (1 + 0.05 * rng.standard_normal(21))
        eps = 0.01 * (1 + 0.05 * rng.standard_normal(20))
        reg = th.classify_regime(0.5, D, eps)
        assert reg.label == "saturating", render_regime(reg)
        # c within 5 standard errors of the truth (noise 5% per value)
        assert abs(reg.innovation_constant - c) < 5 * reg.innovation_constant_stderr + 1e-12
        # α = 0 with the same innovation floor: D = c·ε²·i grows without bound
        D0 = np.concatenate([[0.0], np.cumsum(np.full(20, c * 0.01))])
        D0 = D0 * (1 + 0.05 * rng.standard_normal(21))
        assert th.classify_regime(0.0, D0, eps).label == "collapsing"


def test_regime_infinite_d_collapses():
    D = _chain(0.5, np.full(20, 0.01))
    D[-2] = INF
    reg = th.classify_regime(0.5, D)
    assert reg.label == "collapsing" and "infinite at generation 19" in render_regime(reg)


def test_regime_noisy_chains():
    rng = np.random.default_rng(0)
    eps = np.full(20, 0.01)
    for _ in range(5):
        D = _chain(0.5, eps) * (1 + 0.05 * rng.standard_normal(21))
        noisy_eps = eps * (1 + 0.05 * rng.standard_normal(20))
        assert th.classify_regime(0.5, D, noisy_eps).label == "saturating"
        D0 = _chain(0.0, eps) * (1 + 0.05 * rng.standard_normal(21))
        assert th.classify_regime(0.0, D0).label == "collapsing"


def test_regime_undetermined():
    reg = th.classify_regime(0.5, [0.0, 0.01, 0.02])
    assert reg.label == "undetermined" and "only 3 generations" in render_regime(reg)
    D = _chain(0.5, np.full(10, 0.01))
    D[6:] = NAN
    assert th.classify_regime(0.5, D).label == "undetermined"
    # α = 0 and increments that decay at a rate the linear fit cannot judge (some are ≤ 0)
    inc = np.linspace(0.01, -0.001, 20)
    reg = th.classify_regime(0.0, np.concatenate([[0.0], np.cumsum(inc)]))
    assert reg.label == "undetermined" and "rate" in render_regime(reg)
    with pytest.raises(ValueError):
        th.classify_regime(1.5, np.zeros(10))


# --------------------------------------------------------------------------- planner


def test_plan_alpha_infinite_horizon_closed_form():
    # ε² = 0.1, tol = 0.2: α = 1 − sqrt(1 − 0.5) = 1 − 0.7071068 = 0.2928932
    res = th.plan_alpha(0.1, 0.2, None)
    assert res.feasible and res.horizon is None
    assert res.alpha == pytest.approx(1 - math.sqrt(0.5))
    assert th.steady_state(res.alpha, 0.1) == pytest.approx(0.2)
    assert res.worst_D <= 0.2


def test_plan_alpha_finite_horizon_by_hand():
    # H = 2, D0 = 0: worst = P_2 = ε²(1 + r) ≤ 0.15 with ε² = 0.1 ⇒ r ≤ 0.5 ⇒ α = 1 − √0.5
    res = th.plan_alpha(0.1, 0.15, 2)
    assert res.alpha == pytest.approx(1 - math.sqrt(0.5), abs=1e-10)
    assert res.worst_D <= 0.15 and res.worst_D == pytest.approx(0.15)
    # H = 1, D0 = 0: P_1 = ε² = 0.1 ≤ 0.15 whatever α ⇒ α = 0
    assert th.plan_alpha(0.1, 0.15, 1).alpha == 0.0
    # H = 1, D0 = 0.2: P_1 = 0.2 r + 0.1 ≤ 0.15 ⇒ r ≤ 0.25 ⇒ α = 0.5
    assert th.plan_alpha(0.1, 0.15, 1, D0=0.2).alpha == pytest.approx(0.5, abs=1e-10)
    # α = 0, H = 3, ε² = 0.01: worst = 3 · 0.01 = 0.03 ≤ 0.05 ⇒ α = 0
    res = th.plan_alpha(0.01, 0.05, 3)
    assert res.alpha == 0.0 and res.worst_D == pytest.approx(0.03)


def test_plan_alpha_infinite_horizon_with_start():
    # D0 = 0.4, ε² = 0.1, tol = 0.2: P_1 = 0.4 r + 0.1 ≤ 0.2 ⇒ r ≤ 0.25 ⇒ α ≥ 0.5;
    # steady state needs α ≥ 0.2929; so α = 0.5
    assert th.plan_alpha(0.1, 0.2, None, D0=0.4).alpha == pytest.approx(0.5)


def test_plan_alpha_infeasible_and_boundary():
    res = th.plan_alpha(0.3, 0.2, 5)
    assert not res.feasible and res.alpha == 1.0 and res.worst_D == 0.3
    assert "infeasible" in res.reason and "exceeds the tolerance" in res.reason
    res = th.plan_alpha(0.2, 0.2, None)  # ε² = tol: only α = 1 keeps D ≤ tol
    assert res.feasible and res.alpha == pytest.approx(1.0)
    res = th.plan_alpha(0.0, 0.2, 10)
    assert res.alpha == 0.0 and res.worst_D == 0.0
    for bad in [dict(eps_sq=-0.1, tolerance=0.2, horizon=3),
                dict(eps_sq=0.1, tolerance=0.0, horizon=3),
                dict(eps_sq=0.1, tolerance=0.2, horizon=0),
                dict(eps_sq=NAN, tolerance=0.2, horizon=3)]:
        with pytest.raises(ValueError):
            th.plan_alpha(**bad)


def test_plan_alpha_monotone_and_consistent_with_prediction():
    # A longer horizon or a tighter tolerance never needs less fresh data.
    alphas_h = [th.plan_alpha(0.05, 0.2, h).alpha for h in (1, 2, 3, 5, 10, 50, 1000)]
    assert np.all(np.diff(alphas_h) >= -1e-12)
    assert alphas_h[-1] == pytest.approx(th.plan_alpha(0.05, 0.2, None).alpha, abs=1e-9)
    alphas_t = [th.plan_alpha(0.05, t, 10).alpha for t in (0.06, 0.1, 0.2, 0.4)]
    assert np.all(np.diff(alphas_t) <= 1e-12)
    # The planned α meets the tolerance in the explicit prediction; a slightly smaller one fails.
    res = th.plan_alpha(0.05, 0.2, 10)
    pred = th.predicted_divergence(res.alpha, np.full(10, 0.05))
    assert pred.max() <= 0.2 + 1e-12 and pred.max() == pytest.approx(res.worst_D)
    assert th.predicted_divergence(res.alpha - 1e-6, np.full(10, 0.05)).max() > 0.2


def test_theory_is_pure():
    # DESIGN.md: theory.py imports nothing from the rest of collapselab.
    import ast
    from pathlib import Path

    tree = ast.parse(Path(th.__file__).read_text(encoding="utf-8"))
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods <= {"__future__", "functools", "math", "collections.abc", "dataclasses", "enum",
                    "typing",
                    "numpy"}


# --------------------------------------------------------------------------- t0 smoothing drift


def _smoothing_chain_by_quadrature(alpha, t0, mu, s2, N):
    """χ²(p̂_n ‖ p), n = 1 … N, in d = 1 by quadrature: the components of p̂_n are carried
    through p̂_{n+1} = S(α p + (1−α) p̂_n) one by one (independent of the Gram-matrix sums)."""
    from scipy import integrate
    from scipy.special import logsumexp
    from scipy.stats import norm

    a = math.exp(-t0 / 2)
    comps, out = [(1.0, mu, s2)], []
    for _ in range(N):
        mixed = [(alpha, mu, s2)] + [((1 - alpha) * w, m, v) for w, m, v in comps]
        comps = [(w, a * m, a * a * v + 1 - a * a) for w, m, v in mixed if w > 0]

        def f(x, comps=comps):
            lg = logsumexp([math.log(w) + norm.logpdf(x, m, math.sqrt(v)) for w, m, v in comps])
            return math.exp(2 * lg - norm.logpdf(x, mu, math.sqrt(s2)))

        out.append(integrate.quad(f, -40, 40, limit=400, points=[0.0, mu])[0] - 1.0)
    return np.array(out)


@pytest.mark.parametrize("alpha, t0, mu, s2", [(0.3, 0.3, 2.0, 0.5), (0.0, 0.2, 1.0, 0.8),
                                               (0.7, 0.1, 3.0, 1.5), (1.0, 0.05, 4.0, 0.25)])
def test_smoothing_drift_matches_quadrature(alpha, t0, mu, s2):
    g = th.GaussianSmoothing(t0=t0, dim=1, mean_sq=mu * mu, var=s2)
    np.testing.assert_allclose(th.smoothing_drift(alpha, g, 6),
                               _smoothing_chain_by_quadrature(alpha, t0, mu, s2, 6),
                               rtol=1e-7, atol=1e-10)


def test_smoothing_drift_dimension_kl_and_limits():
    # d coordinates of an isotropic Gaussian with mean on one axis: log(1 + χ²) adds up over
    # coordinates for a single Gaussian (α = 1: p̂ = S p each generation).
    g1 = th.GaussianSmoothing(0.1, 1, 4.0, 0.5)
    g0 = th.GaussianSmoothing(0.1, 1, 0.0, 0.5)
    g3 = th.GaussianSmoothing(0.1, 3, 4.0, 0.5)
    one, zero = th.smoothing_drift(1.0, g1, 1)[0], th.smoothing_drift(1.0, g0, 1)[0]
    assert th.smoothing_drift(1.0, g3, 1)[0] == pytest.approx((1 + one) * (1 + zero) ** 2 - 1)
    # the standard normal is stationary: no drift at all
    assert np.all(th.smoothing_drift(0.3, th.GaussianSmoothing(0.02, 4), 50) == 0.0)
    # KL(S p ‖ p) in closed form against quadrature
    from scipy import integrate
    from scipy.stats import norm

    a = math.exp(-0.05)
    v = a * a * 0.5 + 1 - a * a
    kl = integrate.quad(lambda x: norm.pdf(x, 2 * a, math.sqrt(v))
                        * (norm.logpdf(x, 2 * a, math.sqrt(v)) - norm.logpdf(x, 2, math.sqrt(0.5))),
                        -30, 30)[0]
    assert th.smoothing_kl_step(g1) == pytest.approx(kl, rel=1e-9)
    # narrow target (s² = 0.25): S^k p gets wider than twice p once a^{2k} ≤ 2/3, i.e.
    # k ≥ ln(1.5)/t0 = 20.3 at t0 = 0.02 — then χ² is infinite for every α < 1
    D = th.smoothing_drift(0.5, th.GaussianSmoothing(0.02, 2, 16.0, 0.25), 25)
    assert np.all(np.isfinite(D[:20])) and np.all(np.isinf(D[20:]))
    assert np.all(np.isfinite(th.smoothing_drift(1.0, th.GaussianSmoothing(0.02, 2, 16.0, 0.25),
                                                 25)))
    # mixture: weighted mean of the components' chains (a bound by joint convexity)
    parts = [th.GaussianSmoothing(0.1, 1, 4.0, 0.5, 3.0), th.GaussianSmoothing(0.1, 1, 0.0, 0.5)]
    np.testing.assert_allclose(th.smoothing_drift_mixture(0.4, parts, 5),
                               0.75 * th.smoothing_drift(0.4, parts[0], 5)
                               + 0.25 * th.smoothing_drift(0.4, parts[1], 5))
    with pytest.raises(ValueError):
        th.GaussianSmoothing(0.0, 1)
    with pytest.raises(ValueError):
        th.GaussianSmoothing(0.1, 0)


def test_plan_alpha_constant_and_smoothing():
    # c scales the innovation: plan(ε², c) = plan(c ε², 1); c = 4 needs more fresh data
    assert th.plan_alpha(0.01, 0.1, None, c=4.0).alpha == pytest.approx(
        th.plan_alpha(0.04, 0.1, None).alpha)
    assert th.plan_alpha(0.01, 0.1, 8, c=4.0).c == 4.0
    with pytest.raises(ValueError):
        th.plan_alpha(0.01, 0.1, None, c=0.0)
    # ε² = 0: only the t0 smoothing drifts. Horizon 5 by hand: the worst predicted D over
    # n ≤ 5 at the planned α equals the tolerance, and it is the smoothing drift itself.
    sm = [th.GaussianSmoothing(0.1, 2, 9.0, 0.5)]
    res = th.plan_alpha(0.0, 0.3, 5, smoothing=sm)
    assert res.feasible and 0 < res.alpha < 1
    worst = float(np.max(th.smoothing_drift(res.alpha, sm[0], 5)))
    assert res.worst_D == pytest.approx(worst) and res.smoothing_D == pytest.approx(worst)
    assert worst == pytest.approx(0.3, rel=1e-5)
    # slightly less fresh data breaks the tolerance
    assert float(np.max(th.smoothing_drift(res.alpha - 1e-3, sm[0], 5))) > 0.3
    # adding a per-generation error can only raise the required α
    assert th.plan_alpha(0.02, 0.3, 5, smoothing=sm).alpha > res.alpha
    # a tolerance below one step of smoothing is infeasible even at α = 1
    step = float(th.smoothing_drift(1.0, sm[0], 1)[0])
    bad = th.plan_alpha(0.0, 0.5 * step, 5, smoothing=sm)
    assert not bad.feasible and bad.alpha == 1.0 and "infeasible" in bad.reason


# ---- codes of the across-generation checks, and their wording -------------------------------


def test_every_status_and_cause_code_has_wording():
    from collapselab.verdicts import CAUSE_TAG, STATUS_OF_TEXT, STATUS_TEXT

    assert set(STATUS_TEXT) == set(S) and set(CAUSE_TAG) == set(K)
    assert all(STATUS_OF_TEXT[STATUS_TEXT[s]] is s for s in S)  # wording is one-to-one


def test_recursion_step_codes_and_numbers():
    from collapselab.verdicts import render_recursion

    a, r = 0.3, 0.49
    chk = th.check_recursion_step(a, 0.2, 0.1, 0.4, D_next_stderr=0.01, D_prev_stderr=0.02,
                                  intra_stderr=0.04, generation=3)
    assert (chk.status, chk.cause, chk.held) == (S.HELD, K.NONE, True)
    assert chk.measured == pytest.approx(0.2 + r * 0.1, rel=1e-15)
    assert chk.bound == pytest.approx(a / 2 * 0.4, rel=1e-15)
    assert chk.detail["slack"] == pytest.approx(0.2 + r * 0.1 - a / 2 * 0.4, rel=1e-14)
    assert chk.sigma == pytest.approx(math.sqrt(0.01**2 + r * r * 0.02**2 + (a / 2 * 0.04) ** 2))
    assert render_recursion(chk).endswith(": it holds")
    # slack −0.05 with σ ≈ 0.01: beyond 2σ → FAILED / VIOLATED; within 10σ → held (noise)
    bad = dict(D_next_stderr=0.01)
    assert th.check_recursion_step(1.0, 0.0, 0.0, 0.1, **bad).cause is K.VIOLATED
    ok = th.check_recursion_step(1.0, 0.0, 0.0, 0.1, n_sigma=10.0, **bad)
    assert ok.status is S.HELD and "on the wrong side, within 10" in render_recursion(ok)
    fail = th.check_recursion_step(1.0, 0.0, 0.0, 0.1, **bad)
    assert fail.status is S.FAILED and "violated beyond 2 standard errors" in \
        render_recursion(fail)
    nan = th.check_recursion_step(a, math.nan, 0.1, math.nan)
    assert (nan.status, nan.cause, nan.held) == (S.NO_CLAIM, K.MEASURED_NAN, None)
    assert nan.detail["missing"] == ("D_{i+1}", "I_i")
    assert render_recursion(nan).startswith("cannot be checked: D_{i+1}, I_i could not")
    both = th.check_recursion_step(a, math.inf, 0.1, math.inf)
    assert (both.status, both.cause) == (S.NO_CLAIM, K.BOTH_INFINITE)
    assert "undecidable" in render_recursion(both)
    lhs_inf = th.check_recursion_step(a, math.inf, 0.1, 0.5)
    assert (lhs_inf.status, lhs_inf.cause) == (S.HELD, K.MEASURED_INFINITE_OK)
    assert "satisfies the recursion" in render_recursion(lhs_inf)
    i_inf = th.check_recursion_step(a, 0.2, 0.1, math.inf)
    assert (i_inf.status, i_inf.cause, i_inf.held) == (S.FAILED, K.INTRA_INFINITE, False)
    assert "I_i is infinite" in render_recursion(i_inf)
    # the same slack as the vectorised check
    D, I = [0.0, 0.2, 0.1, 0.3], [0.5, 0.1, 0.7]
    vec = th.check_recursion(a, D, I)
    for g in range(3):
        assert th.check_recursion_step(a, D[g + 1], D[g], I[g]).detail["slack"] == vec[g]


def test_prediction_comparison_codes():
    from collapselab.verdicts import render_prediction, status_text

    cmp = th.compare_prediction(0.5, 0.2, generation=4)
    assert (cmp.status, cmp.cause) == (S.COMPARED, K.NONE) and cmp.ratio == pytest.approx(0.4)
    assert status_text(cmp.status) == "compared"
    assert "measured D_4 = 0.2 against the discounted sum" in render_prediction(cmp)
    assert "(ratio 0.4)" in render_prediction(cmp)
    for p, m in ((0.5, math.inf), (0.0, 0.2), (math.nan, 0.2), (0.5, math.nan)):
        c = th.compare_prediction(p, m, generation=2)
        assert c.cause is K.NO_FINITE_RATIO and math.isnan(c.ratio)
        assert render_prediction(c).endswith("no finite ratio")
    assert "D_2 = ∞" in render_prediction(th.compare_prediction(0.5, math.inf, generation=2))


def test_every_regime_reason_is_reached_and_rendered():
    from collapselab.verdicts import render_regime

    g = np.arange(20.0)
    cases = {
        th.RegimeReason.TOO_SHORT: (0.5, [0.1, 0.2]),
        th.RegimeReason.D_INFINITE: (0.5, np.r_[np.full(15, 0.1), np.inf, np.full(4, 0.1)]),
        th.RegimeReason.FEW_FINITE_D: (0.5, np.r_[np.full(10, 0.1), np.full(10, np.nan)]),
        th.RegimeReason.FEW_INNOVATIONS: (0.5, np.r_[np.full(12, 0.1), np.nan, 0.1, np.nan,
                                                     0.1, np.nan, 0.1, np.nan, 0.1]),
        th.RegimeReason.INNOVATION_GROWS: (0.5, 0.01 * np.arange(21.0)),
        th.RegimeReason.DISCOUNTED_DECAY: (0.5, _chain(0.5, 0.1 * (g + 1) ** -2.0)),
        th.RegimeReason.DISCOUNTED_SLOW_DECAY: (0.5, _chain(0.5, 0.1 * (g + 1) ** -0.5)),
        th.RegimeReason.INNOVATION_FLOOR: (0.5, _chain(0.5, np.full(20, 0.01))),
        th.RegimeReason.NO_FRESH_SUMMABLE: (0.0, _chain(0.0, 0.1 * (g + 1) ** -2.0)),
        th.RegimeReason.NO_FRESH_NOT_SUMMABLE: (0.0, _chain(0.0, np.full(20, 0.01))),
        # increments decaying linearly through 0 (some ≤ 0): the rate cannot be judged
        th.RegimeReason.NO_FRESH_RATE_UNKNOWN: (0.0, np.r_[0.0, np.cumsum(
            np.linspace(0.02, -0.001, 20))]),
        # zig-zag increments of mean 0.005, not significant one by one, while D rises
        th.RegimeReason.NO_FRESH_RISING: (0.0, np.r_[0.0, np.cumsum(np.tile([0.03, -0.02], 10))]),
    }
    assert set(cases) == set(th.RegimeReason)
    labels = {}
    for reason, (a, D) in cases.items():
        reg = th.classify_regime(a, D)
        assert reg.reason is reason, (reason, reg.reason)
        text = render_regime(reg)
        assert isinstance(reg.label, th.RegimeLabel) and text and "{" not in text
        labels[reason] = reg.label
    assert labels[th.RegimeReason.D_INFINITE] == "collapsing"
    assert labels[th.RegimeReason.INNOVATION_FLOOR] == "saturating"
    assert "last D" in render_regime(th.classify_regime(*cases[th.RegimeReason.INNOVATION_FLOOR]))
