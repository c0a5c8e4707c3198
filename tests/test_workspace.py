"""The workspace's hand-offs: atomic files, the registry, splits by conversation."""
import json
import math

import polars as pl
import pytest

from slm_research.workspace import AdapterRecord, Registry, Workspace, evidence_split, split_by_session


def test_split_never_divides_a_conversation_and_is_seeded():
    frame = pl.DataFrame({"session": [f"s{i % 97}" for i in range(2000)]})
    a, b = split_by_session(frame, seed=3), split_by_session(frame, seed=3)
    assert a["split"].to_list() == b["split"].to_list()
    assert a.group_by("session").agg(pl.col("split").n_unique())["split"].max() == 1
    assert split_by_session(frame, seed=4)["split"].to_list() != a["split"].to_list()


@pytest.mark.parametrize("max_train,seed", [(16, 0), (64, 1), (200, 2), (0, 3)])
def test_evidence_split_never_divides_a_conversation(max_train, seed):
    "Conversations of every size, some calls without a session: whole conversations go to one split only."
    sizes = [1, 2, 3, 5, 8, 13, 21] * 20
    sessions = [f"s{i}" for i, n in enumerate(sizes) for _ in range(n)]
    frame = pl.DataFrame({"id": [f"c{i}" for i in range(len(sessions))], "session": sessions}).with_columns(
        session=pl.when(pl.col("id").str.ends_with("7")).then(None).otherwise(pl.col("session")))
    out = evidence_split(frame, max_train=max_train, seed=seed)
    key = out.with_columns(k=pl.col("session").fill_null(pl.col("id")))
    assert key.group_by("k").agg(pl.col("split").n_unique())["split"].max() == 1
    n_train = out.filter(pl.col("split") == "train").height
    biggest = max(sizes)
    assert n_train < min(max_train, frame.height // 2) + biggest and (max_train == 0) == (n_train == 0)
    assert set(out["split"]) <= {"train", "calibration", "test"} and out.height == frame.height


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evidence_split_by_strata_trains_on_every_stratum_and_keeps_conversations_whole(seed):
    "Head variants of very different sizes (one conversation per application): each large one gets training calls."
    apps = {"big": 60, "mid": 25, "small": 10, "tiny": 2}            # conversations per application
    rows = [(f"{app}-{i}", app) for app, n in apps.items() for i in range(n) for _ in range(1 + i % 6)]
    frame = pl.DataFrame({"id": [f"c{k}" for k in range(len(rows))], "session": [r[0] for r in rows],
                          "app": [r[1] for r in rows]})
    out = evidence_split(frame, max_train=64, seed=seed, strata="app")
    assert out.group_by("session").agg(pl.col("split").n_unique())["split"].max() == 1
    train = dict(out.filter(pl.col("split") == "train").group_by("app").len().iter_rows())
    assert all(train.get(app, 0) >= 8 for app in ("big", "mid", "small"))   # every stratum of 5% or more is trained on
    assert sum(train.values()) < 64 + 6 and out.height == frame.height


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evidence_split_by_strata_shares_training_calls_not_conversations(seed):
    "An application whose conversations run long must not take the training budget from one whose conversations are short."
    rows = [(f"long-{i}", "long") for i in range(40) for _ in range(12)] + [(f"short-{i}", "short") for i in range(300)]
    frame = pl.DataFrame({"id": [f"c{k}" for k in range(len(rows))], "session": [r[0] for r in rows],
                          "app": [r[1] for r in rows]})
    train = dict(evidence_split(frame, max_train=96, seed=seed, strata="app").filter(pl.col("split") == "train")
                 .group_by("app").len().iter_rows())
    assert abs(train["long"] - train["short"]) <= 12, train              # within one long conversation of each other


def test_registry_round_trip_and_promotion(tmp_path):
    reg = Registry(tmp_path/"registry.json")
    reg.add(AdapterRecord(1, 1, "lora", {"adapter_score": 0.9}, "h", "promoted", "ok", base="b", extra={"x": 1}))
    reg.add(AdapterRecord(1, 2, "lora", {"adapter_score": 0.97}, "h2", "promoted", "better"))
    again = Registry(tmp_path/"registry.json")
    assert [(r.version, r.status) for r in again.records] == [(1, "retired"), (2, "promoted")]
    assert json.loads((tmp_path/"registry.json").read_text())["adapters"][0]["x"] == 1


def test_missing_handoff_names_the_step_to_run(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match="slm-research clean"): ws.read_calls()
    with pytest.raises(FileNotFoundError, match="slm-research select"): ws.read_selection()
