"""Degenerate-output checks, the privacy filter, and the retry path (a backend that answers badly)."""

import json

import pytest

from m3t_gen.backends.base import GenerationResult
from m3t_gen.config import FilterSpec, PrivacySpec, Sampling
from m3t_gen.generation import generate_validated
from m3t_gen.text.checks import degenerate_reason, privacy_hit
from m3t_gen.rows import new_row
from m3t_gen.stages.filter import apply_filter
from m3t_gen.testing.scripted import ScriptedBackend


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("I'm sorry, but I can't help with that image.", "refusal"),
    ("As an AI language model I cannot see images.", "refusal"),
    ("the cat " * 40, "repetition"),
    ("a a a a a a a a a a a a dog", "repetition"),
    ("A grey cat sleeps on a red sofa beside a window; a lamp stands to the left of the sofa.", None),
    ("Sorry state of the old barn: a weathered wooden barn with a collapsed roof stands in a field.", None),
])
def test_degenerate_reason(text, reason):
    assert degenerate_reason(text) == reason


def test_privacy_hits_whole_words_only():
    words = PrivacySpec().word_lists()
    assert privacy_hit("make the woman wear a hat", words) == ("gender", "woman")
    assert privacy_hit("change her hair to red", words)[0] in ("gender", "hair")
    assert privacy_hit("an OLD car", words) == ("age", "OLD")
    assert privacy_hit("replace the chair with a bench", words) is None  # "hair" inside "chair" is no hit
    assert privacy_hit("the theme is blue", words) is None  # "he" inside "the"/"theme"
    assert privacy_hit("anything", {"custom": ["zebra"]}) is None
    assert privacy_hit("a zebra", {"custom": ["zebra"]}) == ("custom", "zebra")


def test_privacy_filter_drops_turns_with_reason():
    turns = [{"type": "vqa_holistic", "query": "what is the woman holding?", "target": "an umbrella"},
             {"type": "vqa_holistic", "query": "what colour is the umbrella?", "target": "red"}]
    row = new_row(key="k", shard="s", turns=turns, scores={"caption": 0.3, "turns": [0.3, 0.3]},
                  image=b"x")
    apply_filter(row, FilterSpec(privacy=PrivacySpec(enabled=True)))
    out = row["turns"]
    assert [t["kept"] for t in out] == [False, True]
    assert out[0]["reason"] == "privacy: mentions gender ('woman')"


def _parse_json(row, result):
    try:
        value = json.loads(result.text)
    except json.JSONDecodeError as e:
        return None, f"invalid_json: {e.msg}"
    bad = degenerate_reason(value.get("caption", ""))
    return (None, f"{bad}_caption: x") if bad else (value, None)


def _run(backend, max_attempts=3):
    rows = [new_row(key="s_000000", shard="s")]
    done = generate_validated(backend, rows, stage="dialogue", run_seed=0, sampling=Sampling(), max_attempts=max_attempts,
                              build_messages=lambda r: [{"role": "user", "content": "x"}], parse=_parse_json)
    return rows[0], done


def test_retry_then_success_uses_a_new_seed_each_time():
    backend = ScriptedBackend(["{not json", '{"caption": "I am sorry, I cannot"}', '{"caption": "a dog on grass"}'])
    row, done = _run(backend)
    assert row["status"] == "ok" and done[0][1] == {"caption": "a dog on grass"} and done[0][2] == 3
    assert len(set(backend.seeds)) == 3


def test_retries_exhausted_is_a_recorded_rejection_not_a_crash():
    backend = ScriptedBackend(["{not json"] * 3)
    row, done = _run(backend)
    assert done == []
    assert row["status"] == "rejected" and row["reject_stage"] == "dialogue"
    assert row["reject_reason"] == "invalid_json"
    assert json.loads(row["reject_detail"])["attempts"] == 3


def test_non_retriable_backend_error_is_rejected_at_once_with_the_message():
    backend = ScriptedBackend([GenerationResult.failed("VLLMValidationError: prompt too long (5000 > 2048)", retriable=False)])
    row, done = _run(backend)
    assert done == [] and len(backend.seeds) == 1  # no blind retries of a request that cannot change
    assert (row["status"], row["reject_reason"]) == ("rejected", "backend_error")
    detail = json.loads(row["reject_detail"])
    assert detail["attempts"] == 1 and "prompt too long" in detail["detail"]


def test_retriable_backend_error_retries_then_names_the_backend():
    backend = ScriptedBackend([GenerationResult.failed("HTTP 503: overloaded", retriable=True)] * 2
                            + [GenerationResult(text='{"caption": "a dog on grass"}', finish_reason="stop")])
    row, done = _run(backend)
    assert row["status"] == "ok" and done[0][2] == 3
    backend = ScriptedBackend([GenerationResult.failed("HTTP 503: overloaded", retriable=True)] * 3)
    row, _ = _run(backend)
    assert row["reject_reason"] == "backend_error" and "503" in json.loads(row["reject_detail"])["detail"]


def test_reasoning_kept_apart_and_counted():
    answers = [GenerationResult(text="", finish_reason="length", reasoning="hmm " * 50, reasoning_tokens=50,
                                output_tokens=50, prompt_tokens=9),
               GenerationResult(text='{"caption": "a dog on grass"}', finish_reason="stop", reasoning="a dog, so",
                                reasoning_tokens=4, output_tokens=12, prompt_tokens=9)]
    row, done = _run(ScriptedBackend(answers))
    assert row["status"] == "ok" and done[0][1] == {"caption": "a dog on grass"}
    assert json.loads(row["reasoning"]) == {"dialogue": "a dog, so"}  # the accepted answer's reasoning only
    assert json.loads(row["tokens"]) == {"dialogue": 62, "dialogue.requests": 2, "dialogue.prompt": 18,
                                         "dialogue.reasoning": 54}
    # Reasoning that never ends is its own reason, not invalid JSON.
    row, _ = _run(ScriptedBackend([answers[0]] * 3))
    assert row["reject_reason"] == "reasoning_unfinished"
