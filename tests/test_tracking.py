"""ComplexityTracker: its arguments, and the BDM figures when pybdm is not installed."""

import math
import warnings

import pytest
from conftest import build

from momos_hf.train import tracking
from momos_hf.train.tracking import ComplexityTracker


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(every=0), ValueError, "every must be >= 1 step, got 0"),
        (dict(every=-2), ValueError, "every must be >= 1 step"),
        (dict(every=2.0), TypeError, "every must be a whole number of steps, got 2.0"),
        (dict(every=True), TypeError, "every must be a whole number of steps, got True"),
        (dict(every="10"), TypeError, "every must be a whole number of steps"),
        (dict(max_values=0), ValueError, "max_values must be >= 1"),
        (dict(max_values=1e4), TypeError, "max_values must be a whole number"),
        (dict(max_overhead=math.nan), ValueError, r"max_overhead must be a fraction of the wall time in \[0, 1\]"),
        (dict(max_overhead=-0.1), ValueError, r"max_overhead must be a fraction of the wall time in \[0, 1\]"),
        (dict(max_overhead=10), ValueError, r"in \[0, 1\], got 10"),  # 10 meaning 10% would be no budget
        (dict(max_overhead="0.1"), TypeError, "max_overhead must be a fraction of the wall time or None"),
        (dict(max_overhead=False), TypeError, "max_overhead must be a fraction"),
    ],
)
def test_tracker_refuses_bad_every_max_values_and_max_overhead(kwargs, error, message):
    with pytest.raises(error, match=message):
        ComplexityTracker(**kwargs)


def test_tracker_accepts_the_budget_limits():
    assert ComplexityTracker(max_overhead=0).max_overhead == 0 and ComplexityTracker(max_overhead=1.0).every == 100


def test_without_pybdm_the_bdm_figures_are_none_and_a_warning_says_how_to_install_it_once(monkeypatch):
    monkeypatch.setattr(tracking, "bdm_of_signs", lambda values, ndim=1: None)
    tracking._warn_bdm_missing.cache_clear()
    model = build("llama")
    tracker = ComplexityTracker(every=1, max_values=2048, max_overhead=None)
    with pytest.warns(UserWarning, match=r'pybdm is not installed.*pip install "momos-hf\[bdm\]"'):
        tracker.track(model, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.track(model, 1)
    assert not [w for w in caught if "pybdm" in str(w.message)]  # a second measurement warns no more
    tracking._warn_bdm_missing.cache_clear()
    for row in tracker.history:
        assert row["bdm1d_bits_per_sign"] is None and row["bdm2d_bits_per_sign"] is None
        assert row["histogram_entropy"] > 0 and row["gzip_ratio"] > 0  # the other figures are still measured
