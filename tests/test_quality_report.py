"""The quality report's figures on a hand-made output whose answers are known (the small-shard run's report is
checked against its own samples in tests/test_smoke_pipeline.py)."""

import json

import pytest
import webdataset as wds

from m3t_gen.run.quality import distinct_n, leaked, length_summary, near_duplicates, quality_report
from m3t_gen.storage.store import Store


def _turn(i, type_, query, target, score=0.3, **extra):
    return dict({"type": type_, "query": query, "target": target, "score": score, "i": i}, **extra)


def _write(out, folder, samples):
    (out / folder).mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / folder / "s-0000.tar"), encoder=False) as w:
        for s in samples:
            w.write({"__key__": s["key"], "jpg": b"\0", "json": json.dumps(s).encode()})


@pytest.fixture
def output(tmp_path):
    kept = [
        {"key": "a", "caption": "a red boat", "turns": [
            _turn(0, "classification", "what is shown?", "a boat", verdict="supported", judge_score=5),
            _turn(1, "vqa_holistic", "is the red boat moored?", "red boat", verdict="supported", judge_score=4,
                  answer="yes", agreement=0.0)],
         "dropped_turns": [_turn(2, "vqa_holistic", "how many boats?", "3", reason="judge: contradicted (2)")]},
        {"key": "b", "caption": "a cat", "turns": [
            _turn(0, "classification", "What is shown?", "a cat", verdict="supported", judge_score=3),
            _turn(1, "vqa_holistic", "what colour is the cat?", "grey", verdict="not_answerable", judge_score=2,
                  answer="grey", agreement=1.0),
            _turn(2, "vqa_holistic", "what colour is the sofa?", "red")]},
    ]
    filtered = [{"key": "c", "caption": "x", "turns": [], "dropped_turns": [
        _turn(0, "classification", "q", "t", reason="r"), _turn(1, "vqa_holistic", "q2", "t2", reason="r"),
        _turn(2, "vqa_holistic", "q3", "t3", reason="r")]}]
    _write(tmp_path, "shards", kept)
    _write(tmp_path, "filtered", filtered)
    (tmp_path / "triplets").mkdir()
    triplets = [{"id": f"p{i}", "image": "a", "target_image": "b", "scores": {"directional": 0.1},
                 "modifications": [{"category": "color", "text": "make it blue", "score": 0.2, "verdict": "supported",
                                    "judge_score": 4}], "dropped_modifications": [{"text": "x"}]} for i in range(2)]
    (tmp_path / "triplets" / "part-00000.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triplets))
    return tmp_path


def test_report_counts_mix_lengths_leaks_duplicates_and_verdicts(output):
    config = {"dialogue": {"mix": {"classification": 1, "vqa_holistic": 2}},
              "filter": {"min_turn_score": 0.1, "drop_contradicted": True}}
    report = quality_report(Store(output), config)
    m3t = report["m3t"]
    assert (m3t["samples"], m3t["turns_generated"], m3t["turns_kept"]) == (2, 9, 5)
    cls, vqa = m3t["types"]["classification"], m3t["types"]["vqa_holistic"]
    assert (cls["generated"], cls["kept"], vqa["generated"], vqa["kept"]) == (3, 2, 6, 3)
    assert cls["requested_share"] == pytest.approx(1 / 3, abs=1e-4) and cls["kept_share"] == pytest.approx(2 / 5, abs=1e-4)
    assert vqa["leaked_targets"]["share"] == pytest.approx(1 / 3, abs=1e-4)  # "red boat" is in its own query
    assert vqa["leaked_targets"]["examples"] == [["is the red boat moored?", "red boat"]]
    assert cls["verdicts"] == {"supported": 2} and vqa["verdicts"] == {"not_answerable": 1, "supported": 1}
    assert cls["judge_score"] == {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}
    assert vqa["answer_agreement"]["n"] == 2 and vqa["answer_agreement"]["mean"] == 0.5
    assert vqa["target_words"]["max"] == 2 and cls["query_words"]["p50"] == 3
    # "what is shown?" in two samples: a duplicate across the dataset; the two colour questions are near each
    # other but within one sample (not counted), and below the Jaccard threshold anyway.
    dup = m3t["near_duplicate_queries"]
    assert dup["texts"] == 5 and dup["share"] == pytest.approx(2 / 5, abs=1e-4)
    assert m3t["thresholds"] == {"min_turn_score": 0.1, "drop_contradicted": True}
    cir = report["cir"]
    assert (cir["triplets"], cir["modifications_kept"], cir["modifications_dropped"]) == (2, 2, 2)
    assert cir["duplicate_texts"]["share"] == 1.0 and cir["verdicts"] == {"supported": 2}


def test_figures():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6, abs=1e-4)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4, abs=1e-4)
    assert distinct_n([], 2) is None
    assert leaked("Is the RED boat moored?", "red boat") and not leaked("is the redboat here?", "red boat")
    assert not leaked("what is it?", "")
    assert length_summary([3, 1, 2]) == {"n": 3, "mean": 2.0, "min": 1, "p10": 1, "p50": 2, "p90": 3, "max": 3}
    near = near_duplicates([("a", "what colour is the large red car parked on the left side of the street?"),
                            ("b", "What colour is the large red car parked on the left side of this street"),
                            ("c", "how many people are on the beach?")])
    assert near["share"] == pytest.approx(2 / 3, abs=1e-4) and len(near["examples"]) == 2
