"""SMART's temperature schedule and escape rule."""

from __future__ import annotations

import math

from pruning_core.methods.smart import SmartConfig, Temperature


def test_exponential_anneal_from_start_to_end() -> None:
    t = Temperature(SmartConfig(tau_start=1.0, tau_end=1e-3, anneal_fraction=1.0), soft_steps=101)
    assert math.isclose(t.tau(0), 1.0)
    assert math.isclose(t.tau(50), 10 ** -1.5, rel_tol=1e-9)  # halfway in log space
    assert math.isclose(t.tau(100), 1e-3, rel_tol=1e-9)
    assert all(t.tau(i + 1) < t.tau(i) for i in range(100))


def test_anneal_fraction_reaches_tau_end_early_then_holds() -> None:
    t = Temperature(SmartConfig(tau_start=1.0, tau_end=1e-3, anneal_fraction=0.5), soft_steps=100)
    assert math.isclose(t.tau(49), 1e-3, rel_tol=1e-9)
    assert t.tau(48) > 1e-3 and t.tau(99) == t.tau(49)


def test_escape_rule_only_in_second_half_and_above_the_limit() -> None:
    cfg = SmartConfig(escape_after=0.5, fractional_limit=0.01, escape_factor=0.9)
    t = Temperature(cfg, soft_steps=100)
    assert not t.observe(10, fractional=0.5)  # first half: never
    assert t.tau(60) == t.base(60)
    assert not t.observe(60, fractional=0.005)  # below the limit
    assert t.observe(60, fractional=0.02) and t.observe(61, fractional=0.02)
    assert math.isclose(t.tau(62), t.base(62) * 0.81)  # persistent correction 0.9 * 0.9
    assert t.escapes == 2


def test_tau_never_below_floor() -> None:
    t = Temperature(SmartConfig(tau_min=1e-6), soft_steps=10)
    for i in range(5, 400):
        t.observe(i, fractional=1.0)
    assert t.tau(9) == 1e-6
