"""The judge stages around their engine (a scripted backend stands in for the MLLM here; the real vLLM engine with
images judges in the small-shard run, tests/test_smoke_pipeline.py), the filter's decisions on verdicts, the
refilter round trip of verdicts, answerability agreement, and validate's checks of the judge's files."""

import io
import json

import pytest
from PIL import Image

from m3t_gen.config import ConfigError, FilterSpec, TripletFilterSpec, load_config
from m3t_gen.rows import compact, new_row, to_table
from m3t_gen.scoring.measures import answer_agreement
from m3t_gen.stages.filter import apply_filter
from m3t_gen.stages.triplet_filter import apply_triplet_filter
from m3t_gen.testing.scripted import ScriptedBackend

TURNS = [{"type": "classification", "query": "what is shown?", "target": "a boat"},
         {"type": "vqa_localized", "query": "how many boats are moored on the left?", "target": "3"},
         {"type": "vqa_creative", "query": "what could the sailors be planning?", "target": "a long trip along the coast"}]


def _image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (40, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(key="s_000000", turns=TURNS):
    return new_row(key=key, shard="s", source_key=key, image=_image(), width=32, height=24, caption="boats",
                   turns=[dict(t) for t in turns], scores={"caption": 0.3, "turns": [0.3] * len(turns)})


def _verdicts(*items):
    return json.dumps({"verdicts": [{"verdict": v, "score": s, "reason": r} for v, s, r in items]})


@pytest.fixture
def judge_stage(smoke_yaml, monkeypatch):
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.stages import generating, judge

    def make(answers, answerability=True):
        backend = ScriptedBackend(answers, output_tokens=5)
        monkeypatch.setattr(generating, "get_backend", lambda name: lambda spec: backend)
        cfg = load_config(smoke_yaml, [f"judge.answerability={str(answerability).lower()}", "judge.max_attempts=2"])
        return judge.JudgeStage(make_context(cfg)), backend

    return make


def test_judge_records_one_verdict_per_turn_and_answers_only_vqa_queries(judge_stage):
    stage, backend = judge_stage([
        _verdicts(("supported", 5, "a boat is visible"), ("contradicted", 1, "two boats"), ("not_answerable", 3, "unclear")),
        json.dumps({"answers": ["two", "a trip along the coast"]}),
    ])
    row = _row()
    stage.process([row])
    assert row["status"] == "ok", (row["reject_reason"], row["reject_detail"])
    assert row["judge_attempts"] == 1
    v = row["verdicts"]
    assert [x["verdict"] for x in v] == ["supported", "contradicted", "not_answerable"]
    assert [x["score"] for x in v] == [5, 1, 3]
    assert v[0]["answer"] is None and v[0]["agreement"] is None  # classification: not an answer check
    assert v[1]["answer"] == "two" and v[1]["agreement"] == 0.0  # "3" vs "two": short target, exact match
    assert v[2]["agreement"] == pytest.approx(answer_agreement("a trip along the coast", TURNS[2]["target"]))
    # One call with the image and every turn; then one with the image and the VQA queries, no targets.
    verdict_req, answer_req = backend.requests
    for req, n_images in ((verdict_req, 1), (answer_req, 1)):
        assert sum(p["type"] == "image" for p in req.messages[0]["content"]) == n_images
    prompt = verdict_req.messages[0]["content"][-1]["text"]
    assert all(t["query"] in prompt and t["target"] in prompt for t in TURNS)
    answer_prompt = answer_req.messages[0]["content"][-1]["text"]
    assert TURNS[1]["query"] in answer_prompt and TURNS[0]["query"] not in answer_prompt
    assert "a long trip along the coast" not in answer_prompt  # the judge does not see the written target
    schema = verdict_req.json_schema["properties"]["verdicts"]
    assert schema["minItems"] == schema["maxItems"] == 3
    to_table([row])  # the verdicts fit the row schema


def test_judge_retries_then_rejects_with_the_reason(judge_stage):
    stage, _ = judge_stage(["{not json", _verdicts(("supported", 4, "ok"))], answerability=False)
    row = _row()
    stage.process([row])  # one verdict for three turns: the schema refuses it, then attempts are spent
    assert row["status"] == "rejected" and row["reject_stage"] == "judge"
    assert row["reject_reason"] == "schema_mismatch"
    assert json.loads(row["reject_detail"])["attempts"] == 2


def _judged_row(verdicts, agreement=(None, None, None)):
    row = _row()
    row["verdicts"] = [{"verdict": v, "score": s, "reason": f"r{i}", "answer": None if a is None else "x",
                        "agreement": a} for i, ((v, s), a) in enumerate(zip(verdicts, agreement))]
    return row


def test_filter_drops_turns_on_verdicts_and_a_refilter_revives_them_without_rejudging():
    row = _judged_row([("supported", 5), ("contradicted", 1), ("supported", 2)], agreement=(None, 0.0, 0.9))
    apply_filter(row, FilterSpec(min_turns=1))
    assert [t["kept"] for t in row["turns"]] == [True, False, True]
    assert row["turns"][1]["reason"] == "judge: contradicted (r1)"
    assert row["turns"][1]["verdict"] == "contradicted" and row["turns"][1]["judge_score"] == 1

    apply_filter(row, FilterSpec(min_turns=1, min_judge_score=3, drop_contradicted=False))
    assert [t["kept"] for t in row["turns"]] == [True, False, False]
    assert row["turns"][2]["reason"] == "judge_score 2 < min_judge_score 3"

    apply_filter(row, FilterSpec(min_turns=1, drop_contradicted=False, min_answer_agreement=0.5))
    assert [t["kept"] for t in row["turns"]] == [True, False, True]
    assert row["turns"][1]["reason"].startswith("answer_agreement 0.00 < min_answer_agreement 0.5")

    apply_filter(row, FilterSpec(min_turns=3))
    assert row["status"] == "rejected" and row["reject_reason"] == "too_few_turns"
    apply_filter(row, FilterSpec(min_turns=3, drop_contradicted=False))  # same verdicts, new decision
    assert row["status"] == "ok" and all(t["kept"] for t in row["turns"])


def test_unanswerable_is_kept_unless_asked_and_unjudged_rows_are_untouched():
    row = _judged_row([("not_answerable", 3), ("supported", 4), ("supported", 4)])
    apply_filter(row, FilterSpec())
    assert all(t["kept"] for t in row["turns"])
    apply_filter(row, FilterSpec(drop_unanswerable=True))
    assert row["turns"][0]["reason"].startswith("judge: not answerable from the image")
    plain = _row()
    apply_filter(plain, FilterSpec(min_judge_score=5))  # no judge ran: its thresholds have nothing to act on
    assert all(t["kept"] for t in plain["turns"]) and all(t["verdict"] is None for t in plain["turns"])


def test_verdicts_survive_the_sample_json_round_trip_that_refilter_reads(smoke_yaml):
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.run.writer import row_from_sample, sample_json

    ctx = make_context(load_config(smoke_yaml))
    row = _judged_row([("supported", 5), ("contradicted", 1), ("supported", 2)], agreement=(None, 0.0, 0.9))
    row.update(image_sha256="0" * 64, reencoded=False, judge_attempts=2)
    apply_filter(row, FilterSpec(min_turns=1))
    row = to_table([row]).to_pylist()[0]  # as the writer receives it
    sample = sample_json(row, ctx)
    assert sample["dropped_turns"][0]["verdict"] == "contradicted" and sample["lineage"]["attempts"]["judge"] == 2
    assert sample["turns"][1]["agreement"] == 0.9 and "answer" in sample["turns"][1]
    back = row_from_sample(json.loads(json.dumps(sample)), "s", row["image"])
    assert [compact(v) for v in back["verdicts"]] == [compact(v) for v in row["verdicts"]]
    apply_filter(back, FilterSpec(min_turns=1))
    assert back["turns"] == [dict(t) for t in row["turns"]]


def test_triplet_filter_acts_on_the_triplet_judge():
    row = {"key": "a__b", "modifications": [{"category": "color", "text": "make it red"},
                                            {"category": "count", "text": "add a boat"}],
           "scores": {"target_caption": 0.3, "image_similarity": 0.8, "directional": 0.3, "modifications": [0.3, 0.3]},
           "verdicts": [{"verdict": "supported", "score": 4, "reason": "red", "answer": None, "agreement": None},
                        {"verdict": "contradicted", "score": 1, "reason": "fewer boats", "answer": None,
                         "agreement": None}],
           "status": "ok"}
    spec = TripletFilterSpec(min_target_caption_score=None, min_modification_score=None, min_directional=None)
    apply_triplet_filter(row, spec)
    assert [m["kept"] for m in row["modifications"]] == [True, False]
    assert row["modifications"][1]["reason"] == "judge: contradicted (fewer boats)"
    apply_triplet_filter(row, spec.model_copy(update={"min_judge_score": 5, "drop_contradicted": False}))
    assert [m["kept"] for m in row["modifications"]] == [False, False] and row["status"] == "rejected"


@pytest.mark.parametrize("answer,target,expected", [
    ("Two.", "two", 1.0), ("the red one", "red one", 1.0), ("3", "three", 0.0), ("blue", "red", 0.0),
    ("a trip along the coast", "a long trip along the coast", 2 * 1.0 * 0.75 / 1.75),  # articles dropped
])
def test_answer_agreement(answer, target, expected):
    assert answer_agreement(answer, target) == pytest.approx(expected, abs=1e-6)


def test_validate_checks_the_judge_schema_and_templates(tmp_path, smoke_yaml):
    from m3t_gen.validate import validate_config

    notes = validate_config(load_config(smoke_yaml))
    assert any(n.startswith("judge.template") for n in notes) and any(n.startswith("cir.judge.template") for n in notes)
    bad = json.loads((smoke_yaml.parent.parent / "schemas" / "judge_verdicts.schema.json").read_text())
    bad["properties"]["verdicts"]["items"]["properties"]["score"] = {"enum": [0, 1]}
    (tmp_path / "bad.schema.json").write_text(json.dumps(bad))
    yaml_copy = tmp_path / "smoke.yaml"
    yaml_copy.write_text(smoke_yaml.read_text().replace("../data/smoke", str(smoke_yaml.parent.parent / "data/smoke")))
    cfg = load_config(yaml_copy, ["judge.schema=bad.schema.json"])
    with pytest.raises(ConfigError, match="judge.schema: well-formed verdicts fail the schema file"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="judge.template"):
        validate_config(load_config(yaml_copy, ["judge.template=caption_dense_missing.j2"]))


def test_validate_refuses_a_vllm_judge_that_would_refuse_two_images(smoke_yaml):
    from m3t_gen.validate import validate_config

    cfg = load_config(smoke_yaml, ["cir.judge.model.options.limit_images_per_prompt=1"])
    with pytest.raises(ConfigError, match="cir.judge.model.options.limit_images_per_prompt: the triplet_judge stage "
                                          "sends 2 images per request"):
        validate_config(cfg)
