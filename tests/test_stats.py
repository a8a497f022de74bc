"""The reproduction's statistics on numbers with known answers."""

from __future__ import annotations

import math

import pytest

from tec_pipeline.repro.stats import paired_difference, summarize, t_cdf, t_quantile


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                              (1000, 1.9623)])
def test_t_quantile_matches_the_published_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_is_a_distribution() -> None:
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-50.0, 3) < 1e-4 < 1 - 1e-4 < t_cdf(50.0, 3)


def test_summary_uses_the_sample_standard_deviation() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.std == pytest.approx(math.sqrt(5 / 3)) and s.n == 4
    assert str(s) == "2.50 ± 1.29"
    assert summarize([7.0]).std == 0.0 and str(summarize([7.0])) == "7.00"


def test_paired_interval_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d.mean == pytest.approx(2.0) and d.n == 3
    assert d.low == pytest.approx(2.0 - 2.48417, abs=1e-4) and d.high == pytest.approx(2.0 + 2.48417, abs=1e-4)
    assert not d.excludes_zero
    tight = paired_difference([1.1, 1.2, 1.3, 1.2], [0.1, 0.2, 0.3, 0.2])  # constant difference 1
    assert tight.low == pytest.approx(1.0) and tight.high == pytest.approx(1.0) and tight.excludes_zero
    assert paired_difference([1.0], [0.5]).low is None
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_claim_verdicts_follow_the_intervals() -> None:
    from tec_pipeline.repro.results import _verdict_better, _verdict_equal

    def d(low: float, high: float) -> dict:
        return {"low": low, "high": high, "text": f"[{low}, {high}]"}

    assert _verdict_better(d(0.1, 2.0)).startswith("supported")
    assert _verdict_better(d(-3.0, -1.0)).startswith("contradicted")
    assert _verdict_better(d(-1.0, 1.0)).startswith("not shown")
    assert _verdict_equal(d(-0.2, 0.25)).startswith("supported")
    assert _verdict_equal(d(0.5, 1.0)).startswith("contradicted")
    assert "a difference is established" in _verdict_equal(d(-1.54, -0.13))  # excludes 0, reaches inside ±0.3
    assert "neither equality nor a difference" in _verdict_equal(d(-1.4, 1.2))
    assert "fewer than 2 seeds" in _verdict_equal({"low": None, "high": None, "text": ""})
