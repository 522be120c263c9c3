"""The run's artefacts as types (m3t_gen/run/artefacts.py): what the writers write is the JSON it always was, an
older run's files load with their missing fields defaulted, and a file read and written back is unchanged."""

import json

import pytest

from m3t_gen.run.artefacts import (CirSummary, Manifest, NegativesStats, NegativesSummary, ShardStats, StageRow,
                                   Totals, TripletStats)


def test_a_writer_built_shard_marker_has_the_keys_in_the_order_the_readers_always_saw():
    stats = ShardStats(shard="s", source="/in/s.tar", read=3, kept=2, rejected=1, reasons={"filter:min_turns": 1},
                       tars=["s-0000.tar"], config_hash="h", stage_seconds={"caption": 1.5})
    data = json.loads(stats.dumps())
    assert list(data) == ["shard", "source", "read", "kept", "pool", "rejected", "reasons", "turns_kept",
                          "turns_dropped", "tars", "filtered_tars", "shard_errors", "skipped_entries", "repairs",
                          "config_hash", "rows_per_worker", "stage_seconds", "stage_tokens"]
    assert stats.dumps() == json.dumps(data, indent=1).encode()
    assert ShardStats.loads(stats.dumps()) == stats
    part = TripletStats(part="part-00000", pairs=2, kept=1, rejected=1, pool_fingerprint="f", config_hash="h")
    assert list(json.loads(part.dumps())) == ["part", "pairs", "kept", "rejected", "reasons", "stage_seconds",
                                              "stage_tokens", "rows_per_worker", "pool_fingerprint", "config_hash"]
    marker = NegativesStats(shard="s", fingerprint="f", candidates=2, kept=1, dropped=1)
    assert list(json.loads(marker.dumps()))[:3] == ["shard", "fingerprint", "candidates"]
    assert list(json.loads(NegativesSummary.of([marker, marker]).dumps()))[:2] == ["shards", "candidates"]
    assert NegativesSummary.of([marker, marker]).kept == 2


def test_an_older_runs_files_load_with_the_defaults_and_a_required_field_missing_is_an_error():
    old = ShardStats.from_json({"shard": "s", "read": 2, "kept": 2, "rejected": 0, "reasons": {}, "tars": []})
    assert old.filtered_tars == [] and old.stage_tokens == {} and old.repairs == {} and old.pool == 0
    manifest = Manifest.from_json({"config_hash": "h", "config": {"dialogue": {"mix": {"a": 1}}, "filter": None}})
    assert manifest.totals == Totals() and manifest.stages == [] and manifest.cir is None
    assert manifest.setting("dialogue.mix") == {"a": 1} and manifest.setting("filter.min_turns", 3) == 3
    assert manifest.recipe_parts() == ["m3t"]
    with pytest.raises(ValueError):
        ShardStats.from_json({"read": 1})
    with pytest.raises(ValueError):
        Manifest.from_json(["not", "an", "object"])


def test_a_manifest_read_and_written_back_keeps_its_keys_order_and_unknown_fields():
    text = json.dumps({"name": "n", "config_hash": "h", "quality": {"m3t": None}, "from_the_future": [1],
                       "stages": [{"stage": "read", "in": 4, "kept": 4, "rejected": 0, "busy_seconds": 0.5}],
                       "totals": {"read": 4, "kept": 4, "rejected": 0, "reasons": {}}}, indent=1)
    manifest = Manifest.loads(text)
    assert manifest.stages == [StageRow(stage="read", rows_in=4, kept=4, busy_seconds=0.5)]
    assert manifest.dumps().decode() == text  # absent fields (versions, cir, ...) stay absent
    manifest.refilters = [{"set": ["filter.min_turns=1"], "previous_config_hash": "h"}]
    manifest.cir = CirSummary(pool=2, pairs=1, kept=1, rejected=0)
    data = json.loads(manifest.dumps())
    assert list(data)[:5] == ["name", "config_hash", "quality", "from_the_future", "stages"]
    assert list(data)[-2:] == ["cir", "refilters"] and data["cir"]["pool"] == 2
