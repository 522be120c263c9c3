"""Filter decisions and the writer's per-shard bookkeeping, on hand-made rows (no models)."""

import json

import pyarrow.parquet as pq
import webdataset as wds

from m3t_gen.config import FilterSpec
from m3t_gen.rows import MARKER, REJECTED, new_row
from m3t_gen.stages.filter import apply_filter


def _row(scores, key="s_000000"):
    turns = [{"type": "vqa_holistic", "query": f"q{i}", "target": f"t{i}"} for i in range(len(scores))]
    return new_row(key=key, shard="s", source_key=key, turns=turns,
                   scores={"caption": 0.3, "turns": scores}, image=b"x")


def test_turn_level_then_sample_level():
    spec = FilterSpec(min_turn_score=0.2, min_turns=2)
    keep = _row([0.3, 0.1, 0.25])
    apply_filter(keep, spec)
    assert keep["status"] == "ok"
    turns = keep["turns"]
    assert [t["kept"] for t in turns] == [True, False, True]
    assert "0.1000 < min_turn_score 0.2" in turns[1]["reason"]

    drop = _row([0.3, 0.1, 0.15])
    apply_filter(drop, spec)
    assert drop["status"] == REJECTED and drop["reject_reason"] == "too_few_turns"
    detail = json.loads(drop["reject_detail"])
    assert detail["kept_turns"] == 1 and detail["min_turns"] == 2
    assert detail["turn_failures"] == ["turn_score 0.1000 < min_turn_score 0.2", "turn_score 0.1500 < min_turn_score 0.2"]
    assert drop["image"] == b"x"  # kept for a later refilter


def test_rank_and_prob_thresholds_and_loosening_revives():
    row = _row([0.3, 0.3, 0.3])
    row["scores"].update(turn_ranks=[1, 3, 1], turn_probs=[0.9, 0.5, 0.05], k=15)
    apply_filter(row, FilterSpec(max_turn_rank=2, min_turn_prob=0.1, min_turns=2))
    turns = row["turns"]
    assert [t["kept"] for t in turns] == [True, False, False]
    assert turns[1]["reason"] == "turn_rank 3 > max_turn_rank 2"
    assert turns[2]["reason"] == "turn_prob 0.0500 < min_turn_prob 0.1"
    assert row["status"] == REJECTED
    apply_filter(row, FilterSpec(min_turns=2))  # new thresholds on the same scores: no re-scoring
    assert row["status"] == "ok" and all(t["kept"] for t in row["turns"])


def test_mean_threshold_records_value_and_threshold():
    row = _row([0.21, 0.22])
    apply_filter(row, FilterSpec(min_turn_score=0.2, min_turns=1, min_mean_score=0.3))
    assert row["reject_reason"] == "mean_score_below"
    detail = json.loads(row["reject_detail"])
    assert detail["threshold"] == 0.3 and abs(detail["value"] - 0.215) < 1e-9


def test_writer_finishes_a_shard_only_when_every_row_arrived(tmp_path, smoke_yaml):
    from m3t_gen.config import load_config
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.run.writer import OutputWriter

    ctx = make_context(load_config(smoke_yaml))
    writer = OutputWriter(tmp_path, ctx, {"s": "/in/s.tar"})
    rows = []
    for i in range(3):
        r = _row([0.3, 0.4], key=f"s_{i:06d}")
        r.update(caption="c", width=8, height=8, image_sha256="0" * 64, reencoded=False,
                 caption_attempts=1, dialogue_attempts=1)
        apply_filter(r, FilterSpec())
        rows.append(r)
    bad = new_row(key="s_000003", shard="s", source_key="x")
    bad.update(status=REJECTED, reject_stage="read", reject_reason="decode_error")
    marker = new_row(key="s__end", shard="s", status=MARKER, shard_rows=4)
    writer.consume([rows[0], marker, bad])  # marker may arrive before the last rows
    assert writer.incomplete() == ["s"]
    assert not (tmp_path / "stats" / "s.json").exists()
    writer.consume(rows[1:])
    assert writer.incomplete() == []
    stats = json.loads((tmp_path / "stats" / "s.json").read_text())
    assert stats["read"] == 4 and stats["kept"] == 3 and stats["rejected"] == 1
    assert stats["reasons"] == {"read:decode_error": 1}
    assert not list(tmp_path.rglob("*.tmp"))
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "shards" / "s-0000.tar"), shardshuffle=False)]
    assert sorted(keys) == ["s_000000", "s_000001", "s_000002"]
    assert pq.read_table(tmp_path / "rejects" / "s.parquet").column("reason").to_pylist() == ["decode_error"]


def test_a_field_outside_the_row_schema_fails_loudly():
    import pytest

    from m3t_gen.rows import PAIR_SCHEMA, RowContractError, to_table

    row = new_row(key="k", shard="s")
    assert to_table([row]).num_rows == 1
    row["colour"] = "red"  # a stage writing a field nobody declared: Arrow would drop it silently
    with pytest.raises(RowContractError, match=r"row 'k' has field\(s\) \['colour'\]"):
        to_table([row])
    with pytest.raises(RowContractError, match="ref_emb"):
        to_table([{"key": "p", "ref_emb": b"x"}], PAIR_SCHEMA)

    turn = {"type": "vqa_holistic", "query": "q", "target": "t", "confidence": 0.9}  # inside a struct, too
    with pytest.raises(RowContractError, match=r"turns has field\(s\) \['confidence'\]"):
        to_table([new_row(key="k", shard="s", turns=[turn])])


def test_turns_and_scores_travel_as_arrow_types():
    """A decided row survives the Arrow round trip between stages: turns a list of structs, scores a struct,
    read as values (no JSON parsing in the next stage), and a second decision from them is the same."""
    import pyarrow as pa

    from m3t_gen.rows import SCORES, TURN, compact, to_table

    row = _row([0.3, 0.1, 0.25])
    row["scores"].update(turn_ranks=[1, 2, 1], turn_probs=[0.9, 0.5, 0.8], k=15)
    row["flags"] = ["text_truncated"]
    apply_filter(row, FilterSpec(min_turn_score=0.2, min_turns=2))
    table = to_table([row])
    assert table.schema.field("turns").type == pa.list_(TURN)
    assert table.schema.field("scores").type == SCORES
    back = table.to_pylist()[0]
    assert back["flags"] == ["text_truncated"]
    assert [t["kept"] for t in back["turns"]] == [True, False, True]
    assert back["turns"][1]["reason"].startswith("turn_score 0.1000") and back["turns"][0]["reason"] is None
    assert back["turns"][2]["rank"] == 1 and back["turns"][2]["prob"] == 0.8
    assert compact(back["scores"]) == row["scores"]
    apply_filter(back, FilterSpec(min_turn_score=0.2, min_turns=2))
    assert back["turns"] == table.to_pylist()[0]["turns"] and back["status"] == "ok"
