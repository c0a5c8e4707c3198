"Market figures (slm_research.market): the quoted data file, the CAGR and the trajectory."
import math

import polars as pl
import pytest
from hypothesis import given, strategies as st

from slm_research.core import SchemaError
from slm_research.market import cagr, load_market, trajectory


def test_market_file_has_the_papers_figures_with_sources():
    m = load_market()
    def value(metric, year): return m.filter((pl.col("metric") == metric) & (pl.col("year") == year))["value"].item()
    assert value("agentic_ai_market", 2024) == 5.2
    assert value("agentic_ai_market", 2034) == 200.0
    assert value("agentic_ai_startup_funding", 2024) == 2.0
    assert value("llm_hosting_infrastructure_investment", 2024) == 57.0
    assert m["source"].str.len_chars().min() > 0
    assert set(m["bound"]) <= {"point", "lower", "approx"}


def test_load_market_rejects_unsourced_or_malformed(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("metric,year,value,unit,bound,source\nx,2024,1.0,USD bn,point,\n")
    with pytest.raises(ValueError, match="without a source: \\['x'\\]"):
        load_market(bad)
    bad.write_text("metric,year,value,unit,bound\nx,2024,1.0,USD bn,point\n")
    with pytest.raises(SchemaError, match="missing column 'source'"):
        load_market(bad)


def test_cagr_by_hand():
    assert cagr(100, 121, 2) == pytest.approx(0.10)
    # the paper's figures: USD 5.2bn (2024) -> USD 200bn (2034)
    assert cagr(5.2, 200, 10) == pytest.approx((200 / 5.2) ** 0.1 - 1) == pytest.approx(0.4404, abs=1e-4)
    with pytest.raises(ValueError): cagr(-1, 2, 3)
    with pytest.raises(ValueError): cagr(1, 2, 0)


@given(st.floats(0.01, 1e4), st.floats(-0.5, 2.0), st.integers(1, 30))
def test_cagr_inverts_compounding(v0, rate, years):
    assert cagr(v0, v0 * (1 + rate) ** years, years) == pytest.approx(rate, abs=1e-9)


def test_trajectory_kinds_and_values():
    t = trajectory({2024: 5.2, 2034: 200.0}, 2022, 2036, rate_outside=0.5)
    kinds = dict(zip(t["year"], t["kind"]))
    assert kinds[2022] == kinds[2036] == "scenario" and kinds[2024] == kinds[2034] == "quoted"
    assert kinds[2029] == "interpolated"
    v = dict(zip(t["year"], t["value"]))
    assert v[2029] == pytest.approx(math.sqrt(5.2 * 200.0))   # geometric midpoint
    assert v[2036] == pytest.approx(200 * 1.5 ** 2) and v[2022] == pytest.approx(5.2 / 1.5 ** 2)
    assert t["value"].is_sorted()
    with pytest.raises(ValueError, match="give rate_outside"):
        trajectory({2024: 5.2}, 2024, 2025)
    with pytest.raises(ValueError, match="before start_year"):
        trajectory({2024: 5.2}, 2030, 2025, 0.1)
