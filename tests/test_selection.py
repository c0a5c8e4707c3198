"S4: filtering and ranking on a small hand-made catalog, and the real catalog's sourcing."
import json
import re

import polars as pl
import pytest
from click.testing import CliRunner

from slm_research.models import load_arch_configs
from slm_research.selection import (BENCHMARKS, Constraints, Weights, catalog_path, load_catalog, rank_models, requirements,
                                    select_cmd, select_models)

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


def test_code_and_reasoning_scores_count_only_when_needed():
    cat = pl.DataFrame([dict(name=n, params_b=1.0, context_length=32768, license="MIT", open_weights=True, tool_calling=False,
                             ifeval=60.0, code=c, code_benchmark="HumanEval", reasoning=r, reasoning_benchmark="GSM8K", arch_config=None)
                        for n, c, r in (("coder", 80.0, 20.0), ("thinker", 20.0, 80.0))])
    rank = lambda profile, **kw: rank_models(cat, requirements(profile, Constraints(**kw)), configs={})
    assert rank({"code_share": 0.9})["model"].to_list() == ["coder", "thinker"]
    assert rank({}, reasoning_heavy=True)["model"].to_list() == ["thinker", "coder"]
    assert rank({"reasoning_share": 0.5})["model"].to_list() == ["thinker", "coder"]
    assert rank({})["score"].n_unique() == 1  # a plain text cluster counts neither
    reasons = rank({"code_share": 0.9}).filter(pl.col("model") == "coder")["reasons"][0].to_list()
    assert "code 80.0 (HumanEval) (+0.80)" in reasons


def test_real_catalog_is_sourced():
    cat = load_catalog()
    assert len(cat) >= 15 and cat["params_b"].min() >= 0.1 and cat["params_b"].max() <= 10
    assert cat["source_params"].null_count() == 0
    # every non-empty benchmark cell names its variant and a source (a URL, an arXiv paper or a repository file)
    for col, (variant, source) in BENCHMARKS.items():
        scored = cat.filter(pl.col(col).is_not_null())
        assert scored[variant].null_count() == 0 and scored[source].null_count() == 0, col
        assert all(re.search(r"https?://|arXiv \d{4}\.\d{4,5}|github\.com/", s) for s in scored[source]), col
        assert scored[col].is_between(0, 100).all(), col
    assert cat.filter(pl.col("ifeval").is_not_null()).height >= 10  # the cells are filled where the benchmark is published
    # an empty benchmark cell is explained
    unscored = cat.filter(pl.all_horizontal(pl.col(c).is_null() for c in BENCHMARKS))
    assert unscored["note"].null_count() == 0


def test_catalog_memory_and_configs_cover_every_row():
    cat, configs = load_catalog(), load_arch_configs()
    for b in (16, 8, 4):
        assert cat[f"memory_gb_{b}bit"].null_count() == 0
    assert (cat["memory_gb_16bit"] == (cat["params_b"] * 2).round(2)).all()
    assert set(cat["arch_config"].drop_nulls()) <= set(configs)
    assert cat.filter(pl.col("arch_config").is_null())["note"].null_count() == 0  # why there is no config


def test_catalog_rejects_unsourced_scores_and_duplicates(tmp_path):
    raw = pl.read_csv(catalog_path())
    raw.with_columns(source_bfcl=pl.when(pl.col("name") == "xLAM-2-8b-fc-r").then(None).otherwise(pl.col("source_bfcl"))).write_csv(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="xLAM-2-8b-fc-r: bfcl has no source_bfcl"):
        load_catalog(tmp_path / "a.csv")
    pl.concat([raw, raw.head(1)]).write_csv(tmp_path / "b.csv")
    with pytest.raises(ValueError, match="duplicate names"):
        load_catalog(tmp_path / "b.csv")
    raw.drop("license").write_csv(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="missing columns"):
        load_catalog(tmp_path / "c.csv")


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
    heavy = CliRunner().invoke(select_cmd, ["--clusters", str(tmp_path / "c.json"), "--reasoning-heavy", "--out", str(tmp_path / "h.json")])
    assert heavy.exit_code == 0 and "needs tool_calling, reasoning" in heavy.output
    assert json.loads((tmp_path / "h.json").read_text())["selections"][0]["requirements"]["reasoning"] is True
