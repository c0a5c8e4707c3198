"S4: filtering and ranking on a small hand-made catalog, and the real catalog's sourcing."
import json

import polars as pl
import pytest
from click.testing import CliRunner

from slm_research.selection import Constraints, Weights, load_catalog, rank_models, requirements, select_cmd, select_models

CATALOG = pl.DataFrame([
    dict(name="small-apache", params_b=0.5, context_length=32768, license="Apache-2.0", open_weights=True, tool_calling=True, ifeval=60.0, bfcl=40.0, arch_config=None, in_paper=False),
    dict(name="mid-mit", params_b=3.0, context_length=32768, license="MIT", open_weights=True, tool_calling=True, ifeval=70.0, bfcl=60.0, arch_config=None, in_paper=False),
    dict(name="nc", params_b=1.0, context_length=32768, license="CC-BY-NC-4.0", open_weights=True, tool_calling=True, ifeval=80.0, bfcl=70.0, arch_config=None, in_paper=False),
    dict(name="big", params_b=9.0, context_length=131072, license="Apache-2.0", open_weights=True, tool_calling=True, ifeval=85.0, bfcl=80.0, arch_config=None, in_paper=False),
    dict(name="short-ctx", params_b=0.2, context_length=2048, license="Apache-2.0", open_weights=True, tool_calling=False, ifeval=None, bfcl=None, arch_config=None, in_paper=False),
])
TOOLS = {"tool_call_share": 0.9, "context_tokens_p95": 1000, "response_chars_median": 200}


def passing(req, **kw):
    return rank_models(CATALOG, req, configs={}, **kw).filter("passed")["model"].to_list()


def test_licence_constraint_removes_non_commercial():
    assert "nc" in passing(requirements(TOOLS, Constraints(commercial_use=False)))
    assert "nc" not in passing(requirements(TOOLS, Constraints(commercial_use=True)))
    assert passing(requirements(TOOLS, Constraints(allowed_licenses=("MIT",)))) == ["mid-mit"]


def test_memory_constraint_depends_on_precision():
    # 9B: 18 GB at 16-bit, 4.5 GB at 4-bit
    assert "big" not in passing(requirements(TOOLS, Constraints(device_memory_gb=8, bits=16)))
    assert "big" in passing(requirements(TOOLS, Constraints(device_memory_gb=8, bits=4)))
    ranked = rank_models(CATALOG, requirements(TOOLS, Constraints(device_memory_gb=8, bits=16)), configs={})
    assert ranked.filter(pl.col("model") == "big")["reasons"][0].to_list() == ["needs 18.0 GB at 16-bit > 8 GB"]


def test_tool_and_context_requirements():
    ranked = rank_models(CATALOG, requirements(TOOLS, Constraints()), configs={})
    reasons = ranked.filter(pl.col("model") == "short-ctx")["reasons"][0].to_list()
    assert any("tool calling" in r for r in reasons)
    long_text = {"context_tokens_p95": 4000, "response_chars_median": 100}
    assert "short-ctx" not in passing(requirements(long_text, Constraints()))
    assert "short-ctx" in passing(requirements({"context_tokens_p95": 1000}, Constraints()))


def test_ranking_order_and_weights():
    req = requirements(TOOLS, Constraints(commercial_use=True))
    # scores: size term 1 - log10(params_b / 0.1) / 2, IFEval/100, tool calling 0.5, BFCL/100
    assert passing(req, weights=Weights(small=2)) == ["small-apache", "mid-mit", "big"]
    # weighting quality only, the best-scored model comes first
    assert passing(req, weights=Weights(small=0)) == ["big", "mid-mit", "small-apache"]


def test_real_catalog_is_sourced():
    cat = load_catalog()
    assert len(cat) >= 15 and cat["params_b"].min() >= 0.1 and cat["params_b"].max() <= 10
    assert cat["source_params"].null_count() == 0
    scored = cat.filter(pl.col("ifeval").is_not_null() | pl.col("bfcl").is_not_null())
    assert scored["source_scores"].null_count() == 0


def test_select_cli(tmp_path):
    doc = {"clusters": [{"cluster": 0, "label": "act", "profile": TOOLS}, {"cluster": -1, "label": "outlier", "profile": {}}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(select_cmd, ["--clusters", str(tmp_path / "c.json"), "--memory-gb", "4", "--bits", "4", "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    sel = json.loads((tmp_path / "s.json").read_text())["selections"]
    assert [s["cluster"] for s in sel] == [0]
    assert sel[0]["choice"] == sel[0]["ranking"][0]["model"]
    direct = select_models(doc, Constraints(device_memory_gb=4, bits=4), top=3)["selections"]
    assert [r["model"] for r in sel[0]["ranking"]] == [r["model"] for r in direct[0]["ranking"]]
    (tmp_path / "bad.json").write_text('{"x": 1}')
    bad = CliRunner().invoke(select_cmd, ["--clusters", str(tmp_path / "bad.json")])
    assert bad.exit_code != 0 and "clusters" in bad.output
