"""How validation curves move together (mlstm.studies.comovement), on synthetic curves with a known answer."""

import itertools
import math

import numpy as np
import pytest

from mlstm.studies import convergence as cv
from mlstm.studies.comovement import co_movement, expected_agreement, moves


def curve(values, every=100):
    """Validation bpc at steps every, 2*every, ...; the other axes are not read here."""
    steps = np.arange(1, len(values) + 1, dtype=float) * every
    return cv.Curve({"steps": steps, "chars": steps * 3200, "seconds": steps}, np.asarray(values, dtype=float))


def brute_force(rates):
    """E[max(U, n - U) / n] by enumerating every pattern of rises."""
    n, total = len(rates), 0.0
    for pattern in itertools.product((0, 1), repeat=n):
        p = math.prod(r if up else 1 - r for r, up in zip(rates, pattern))
        total += p * max(sum(pattern), n - sum(pattern)) / n
    return total


def test_expected_agreement_is_the_poisson_binomial_expectation():
    assert expected_agreement([0.5, 0.5, 0.5]) == pytest.approx(0.75)  # 2/8 all agree, 6/8 two of three
    assert expected_agreement([0.0, 1.0]) == pytest.approx(0.5)  # one always rises, the other never
    assert expected_agreement([1.0] * 4) == pytest.approx(1.0)
    rates = [0.1, 0.35, 0.5, 0.8, 0.95]
    assert expected_agreement(rates) == pytest.approx(brute_force(rates))


def test_a_shared_ripple_agrees_fully_and_beats_independent_runs():
    """Three seeds fall for three evaluations, then rise and fall together: every counted evaluation has all three
    moving the same way (100%); independent runs rising at the same rate (half the time) would agree 75%."""
    descent = [4.0, 3.0, 2.5]
    ripple = [2.6, 2.4, 2.45, 2.3, 2.35, 2.2]  # up, down, up, down, up, down
    m = co_movement([curve(descent + [v + d for v in ripple]) for d in (0.0, 0.01, -0.02)])
    assert (m.runs, m.evaluations, m.first_step, m.last_step) == (3, 6, 400, 900)  # the descent is not counted
    assert m.agreement == pytest.approx(1.0)
    assert m.expected == pytest.approx(0.75)
    assert (m.peak_step, m.peak_rose, m.peak_counted) == (400, 3, 3)


def test_runs_moving_against_each_other_agree_no_more_than_chance():
    """Two runs whose ripples are in opposite phase: after the first fall, every evaluation splits them one and one
    (each run rises at half of them: independent runs would agree 75% of the time)."""
    a = curve([3.0, 2.5, 2.6, 2.4, 2.5, 2.3])
    b = curve([3.0, 2.6, 2.5, 2.55, 2.4, 2.45])
    m = co_movement([a, b], min_runs=2)
    assert (m.evaluations, m.first_step, m.last_step) == (4, 300, 600)  # from a's first rise
    assert m.agreement == pytest.approx(0.5)
    assert m.expected == pytest.approx(0.75)
    assert m.peak_rose == 1 and m.peak_counted == 2


def test_an_evaluation_counts_only_while_half_the_runs_are_going():
    """Four runs; two stop early. Evaluations with fewer than half the runs (or fewer than 3) going are left out,
    and the agreement at each counted one is over the runs still going."""
    long = [4.0, 3.0, 3.2, 2.9, 3.0, 2.8, 2.9, 2.7]  # rises at 300, 500, 700
    short = [4.0, 3.0, 3.1, 2.9, 2.8]  # rises at 300 only; stops after 500
    m = co_movement([curve(long), curve(long), curve(short), curve(short)])
    # counted: 300 to 700 (at 600 and 700 only the two long runs go: fewer than 3, left out)
    assert (m.first_step, m.last_step, m.evaluations) == (300, 500, 3)
    # 300: 4 of 4 rose; 400: 4 of 4 fell; 500: two rose, two fell
    assert m.agreement == pytest.approx((1 + 1 + 0.5) / 3)
    assert (m.peak_step, m.peak_rose, m.peak_counted) == (300, 4, 4)


def test_nothing_to_measure_without_a_rise_or_enough_runs():
    falling = [curve([4.0, 3.0, 2.5, 2.4]) for _ in range(3)]
    assert co_movement(falling) is None  # no run ever rose: only the descent, where agreement is trivial
    assert co_movement([curve([3.0, 3.1, 3.0])] * 2) is None  # fewer than 3 runs
    assert moves(curve([3.0])) == {}
