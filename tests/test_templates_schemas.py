import json

import pytest

from m3t_gen.text.schemas import dialogue_decoding_schema, load_schema, validation_error
from m3t_gen.stages import caption, dialogue
from m3t_gen.text.templates import PromptTemplate, TemplateError, load_template

ROW = {"key": "s_000001", "width": 640, "height": 480, "text": "alt", "caption": "A dog on grass."}


def test_web_text_is_data_never_evaluated():
    row = dict(ROW, text="{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %} {{ config.__class__ }}")
    prompt = load_template("caption_dense.j2").render(**caption.template_fields(row))
    assert "{{ 7 * 7 }}" in prompt and "49" not in prompt
    assert "{% for x in range(3) %}" in prompt


def test_sandbox_blocks_python_internals():
    t = PromptTemplate("evil.j2", "evil.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        t.render()


def test_strict_undefined_names_the_missing_field():
    t = PromptTemplate("typo.j2", "typo.j2", "Caption: {{ captoin }}")
    with pytest.raises(TemplateError, match="captoin"):
        t.render(caption="x")


def test_dialogue_prompt_lists_the_configured_mix_in_order():
    mix = {"classification": 1, "retrieval": 1, "vqa_holistic": 2, "vqa_localized": 2, "vqa_creative": 1}
    prompt = load_template("m3t_dialogue.j2").render(**dialogue.template_fields(ROW, mix))
    assert "exactly 7 query -> target pairs" in prompt
    order = [prompt.index(f"{i}. {t}") for i, t in enumerate(
        ["classification", "retrieval", "vqa_holistic", "vqa_holistic", "vqa_localized", "vqa_localized",
         "vqa_creative"], start=1)]
    assert order == sorted(order)
    assert ROW["caption"] in prompt


def test_decoding_schema_pins_the_mix_and_bounds_strings():
    schema = dialogue_decoding_schema({"classification": 1, "retrieval": 1, "vqa_localized": 1}, 10)
    good = {"turns": [{"type": "classification", "query": "what?", "target": "dog"},
                      {"type": "retrieval", "query": "dog, grass"},
                      {"type": "vqa_localized", "query": "colour?", "target": "brown"}]}
    assert validation_error(good, schema) is None
    wrong_order = {"turns": [good["turns"][1], good["turns"][0], good["turns"][2]]}
    assert validation_error(wrong_order, schema) is not None
    too_long = json.loads(json.dumps(good))
    too_long["turns"][0]["target"] = "x" * 11
    assert validation_error(too_long, schema) is not None
    quote = json.loads(json.dumps(good))
    quote["turns"][0]["target"] = 'a"b'
    assert validation_error(quote, schema) is not None
    missing = {"turns": good["turns"][:2]}
    assert validation_error(missing, schema) is not None
    # The general schema file accepts the same dialogue.
    assert validation_error(good, load_schema("m3t_dialogue.schema.json")) is None


def test_bounded_text_refuses_a_trailing_newline_and_a_lone_surrogate():
    """Patterns are ECMA-262 (the JSON Schema spec): Python's re lets "$" match before a final newline, so with
    the pure-Python validator "dog\n" passed a bounded text. A lone surrogate (a JSON "\\ud800" escape) is not
    text and cannot be written as UTF-8: refused with a reason, not a crash."""
    schema = dialogue_decoding_schema({"classification": 1}, 10)
    for bad, fragment in (("dog\n", "turns/0/target: "), ("do\ud800g", "lone surrogate")):
        answer = json.loads(json.dumps({"turns": [{"type": "classification", "query": "what?", "target": bad}]}))
        error = validation_error(answer, schema)
        assert error is not None and fragment in error, error
    assert validation_error({"turns": [{"type": "classification", "query": "what?", "target": "dog"}]}, schema) is None


def test_template_hash_changes_with_text():
    a = PromptTemplate("a", "a", "x {{ caption }}")
    b = PromptTemplate("a", "a", "y {{ caption }}")
    assert a.sha256 != b.sha256 and len(a.short_hash) == 12
