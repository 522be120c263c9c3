"""The transformers backend on the tiny models: images + JSON schema, per-request seeds that do not depend on the
batch, text-only requests, max_tokens."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from pydantic import ValidationError  # noqa: E402

from m3t_gen.backends import registry  # noqa: E402
from m3t_gen.backends.base import GenerationRequest  # noqa: E402
from m3t_gen.backends.transformers_backend import TransformersBackend, _make_gumbel_processor  # noqa: E402
from m3t_gen.config import ModelSpec  # noqa: E402

# Strings must be bounded by a pattern: a random model never closes an unbounded string, and xgrammar's maxLength
# lets control bytes through. The class is positive (printable ASCII but quote and backslash, then Unicode without
# the surrogates): with a negated class like [^"\\\x00-\x1f], xgrammar 0.2.8 also admits byte sequences that are
# not valid UTF-8, which decode to one U+FFFD each and can break the length bound.
SHORT = "^[ !#-\\[\\]-~\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]{1,40}$"
CAPTION_SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "pattern": SHORT},
        "kind": {"enum": ["photo", "drawing", "screenshot"]},
        "people": {"type": "boolean"},
    },
    "required": ["caption", "kind", "people"],
    "additionalProperties": False,
}
QA_SCHEMA = {
    "type": "object",
    "properties": {
        "turns": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"q": {"type": "string", "pattern": SHORT}, "a": {"type": "string", "pattern": SHORT}},
                "required": ["q", "a"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["turns"],
    "additionalProperties": False,
}


def _spec(model: str, **options) -> ModelSpec:
    # model_construct: these tests must not depend on the other backends' modules (ModelSpec validation imports
    # every registered backend); the options still go through TransformersBackend.Options.
    return ModelSpec.model_construct(
        backend="transformers", model=model, revision=None, trust_remote_code=False, dtype="auto", options=options
    )


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("M3T_GEN_CACHE", str(tmp_path_factory.mktemp("m3t-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def vlm(tiny_env) -> TransformersBackend:
    return TransformersBackend(_spec("tiny:vlm", device="cpu", max_batch_size=4))


@pytest.fixture(scope="session")
def lm(tiny_env) -> TransformersBackend:
    return TransformersBackend(_spec("tiny:lm"))


@pytest.fixture(scope="session")
def astronaut():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def image_request(image, text="Describe the image.", seed=0, **kw) -> GenerationRequest:
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
    ]
    return GenerationRequest(messages=messages, seed=seed, **kw)


def text_request(text="Tell me about the sea.", seed=0, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], seed=seed, **kw)


# ------------------------------------------------------------------------------------------------ setup


def test_registered_and_options_strict():
    assert registry.get_backend("transformers") is TransformersBackend
    opts = TransformersBackend.Options.model_validate({"device": "cpu", "max_batch_size": 2})
    assert opts.device == "cpu" and opts.max_batch_size == 2 and opts.attn_implementation is None
    with pytest.raises(ValidationError):
        TransformersBackend.Options.model_validate({"devcie": "cpu"})
    with pytest.raises(ValidationError):
        TransformersBackend.Options.model_validate({"device": "tpu"})
    with pytest.raises(ValidationError):
        TransformersBackend.Options.model_validate({"max_batch_size": 0})


def test_model_spec_validates_options_through_registry():
    pytest.importorskip("m3t_gen.backends.vllm_backend")
    spec = ModelSpec(backend="transformers", model="tiny:lm", options={"device": "cpu"})
    assert spec.options == {"device": "cpu"}
    with pytest.raises(ValidationError):
        ModelSpec(backend="transformers", model="tiny:lm", options={"bogus": 1})


def test_detects_model_kind(vlm, lm):
    assert vlm.is_vlm and vlm.processor is not None
    assert not lm.is_vlm and lm.processor is None
    assert str(vlm.device) == "cpu"
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in lm.eos_token_ids and lm.tokenizer.eos_token_id in lm.eos_token_ids


# ------------------------------------------------------------------------------------------------ generation


def test_image_prompt_with_json_schema(vlm, astronaut):
    reqs = [
        image_request(astronaut, seed=s, temperature=1.0, max_tokens=200, json_schema=CAPTION_SCHEMA)
        for s in (11, 12)
    ] + [image_request(astronaut, "Ask and answer.", seed=13, temperature=0.8, max_tokens=300, json_schema=QA_SCHEMA)]
    results = vlm.generate(reqs)
    assert len(results) == 3
    for req, res in zip(reqs, results):
        assert res.finish_reason == "stop", res
        doc = json.loads(res.text)
        jsonschema.validate(doc, req.json_schema)
        assert 0 < res.output_tokens <= req.max_tokens
        assert res.prompt_tokens > 16  # the 16 image tokens plus the text
    assert results[0].text != results[1].text


def test_qwen2_5_vl_through_its_real_processor(tiny_env, astronaut):
    """The production captioner's architecture on the transformers backend: Qwen2_5_VLProcessor (torchvision image
    processor) and Qwen2_5_VLForConditionalGeneration, a batch of differently sized images under one JSON schema;
    the same output schema as the other backends."""
    from PIL import Image

    qwen = TransformersBackend(_spec("tiny:qwen2_5_vl", device="cpu", max_batch_size=4))
    assert qwen.is_vlm and type(qwen.processor).__name__ == "Qwen2_5_VLProcessor"
    images = [astronaut, Image.new("RGB", (600, 150), "red"), astronaut.resize((200, 120))]
    reqs = [image_request(im, seed=s, temperature=1.0, max_tokens=200, json_schema=CAPTION_SCHEMA)
            for s, im in enumerate(images)]
    results = qwen.generate(reqs)
    for res, tokens in zip(results, (16, 7, 15)):  # one token per 28x28 px, at most 112x112 px
        assert res.finish_reason == "stop", res
        jsonschema.validate(json.loads(res.text), CAPTION_SCHEMA)
        assert res.image_tokens == tokens and res.prompt_tokens > tokens
    # Batched or alone: the same text for the same seed (left padding and per-image grids line up).
    assert qwen.generate([reqs[1]])[0].text == results[1].text


def test_same_seed_same_output_alone_and_batched(vlm, astronaut):
    target_free = image_request(astronaut, seed=1234, temperature=1.0, max_tokens=24)
    target_json = image_request(astronaut, seed=99, temperature=0.9, top_p=0.95, max_tokens=200,
                                json_schema=CAPTION_SCHEMA)
    alone_free = vlm.generate([target_free])[0]
    alone_json = vlm.generate([target_json])[0]
    batch = [
        text_request("A question without an image, rather longer than the others so padding differs.", seed=5,
                     temperature=0.7, max_tokens=24),
        target_free,
        image_request(astronaut, "Something else entirely?", seed=77, temperature=1.3, top_p=0.8, max_tokens=24),
    ]
    batched = vlm.generate(batch)
    assert batched[1].text == alone_free.text
    assert batched[1].output_tokens == alone_free.output_tokens
    mixed = vlm.generate([batch[0], target_json, batch[2]])
    assert mixed[1].text == alone_json.text
    jsonschema.validate(json.loads(mixed[1].text), CAPTION_SCHEMA)
    # and the neighbours answer as they would alone
    assert vlm.generate([batch[2]])[0].text == batched[2].text


def test_different_seeds_differ(vlm, astronaut):
    results = vlm.generate([image_request(astronaut, seed=s, temperature=1.0, max_tokens=12) for s in range(4)])
    assert len({r.text for r in results}) == 4


def test_temperature_zero_and_tiny_top_p_are_greedy(lm):
    greedy = lm.generate([text_request(seed=s, temperature=0.0, max_tokens=12) for s in (1, 2)])
    assert greedy[0].text == greedy[1].text
    nucleus_of_one = lm.generate([text_request(seed=3, temperature=1.0, top_p=1e-6, max_tokens=12)])[0]
    assert nucleus_of_one.text == greedy[0].text
    sampled = lm.generate([text_request(seed=3, temperature=1.0, max_tokens=12)])[0]
    assert sampled.text != greedy[0].text


def test_text_only_lm(lm):
    reqs = [
        text_request("What is the capital of France?", seed=1, max_tokens=16),
        GenerationRequest(
            messages=[
                {"role": "system", "content": "Answer in JSON."},
                {"role": "user", "content": [{"type": "text", "text": "Describe a red car."}]},
            ],
            seed=2,
            max_tokens=200,
            temperature=1.0,
            json_schema=CAPTION_SCHEMA,
        ),
    ]
    free, constrained = lm.generate(reqs)
    assert free.text and free.output_tokens > 0
    jsonschema.validate(json.loads(constrained.text), CAPTION_SCHEMA)
    assert constrained.finish_reason == "stop"


def test_max_tokens_gives_length(lm, vlm, astronaut):
    res = lm.generate([text_request(seed=4, max_tokens=5, temperature=1.0)])[0]
    assert res.finish_reason == "length" and res.output_tokens == 5
    # a JSON answer cut short is reported as such, not as a stop
    res = vlm.generate([image_request(astronaut, seed=4, max_tokens=6, temperature=1.0, json_schema=QA_SCHEMA)])[0]
    assert res.finish_reason == "length" and res.output_tokens == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.text)


def test_empty_batch(vlm):
    assert vlm.generate([]) == []


def test_text_only_model_rejects_images(lm, astronaut):
    with pytest.raises(ValueError, match="text-only"):
        lm.generate([image_request(astronaut)])


def test_max_batch_size_splits_without_changing_results(tiny_env, vlm, astronaut):
    small = TransformersBackend(_spec("tiny:vlm", max_batch_size=1))
    reqs = [image_request(astronaut, f"Question {i}?", seed=i, temperature=1.0, max_tokens=10) for i in range(3)]
    assert [r.text for r in small.generate(reqs)] == [r.text for r in vlm.generate(reqs)]


# ------------------------------------------------------------------------------------------------ the sampler


def test_gumbel_processor_samples_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature, n = 0.8, 3000
    counts: Counter[int] = Counter()
    for seed in range(n):
        proc = _make_gumbel_processor([seed], [temperature], [1.0])
        counts[int(proc(None, logits.clone()).argmax())] += 1
    probs = torch.softmax(logits[0] / temperature, dim=-1).tolist()
    for token, p in enumerate(probs):
        assert abs(counts[token] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.005, (counts, probs)


def test_gumbel_processor_top_p_and_masks():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0, float("-inf")]])
    seen = set()
    for seed in range(300):
        proc = _make_gumbel_processor([seed], [1.0], [0.9])
        seen.add(int(proc(None, logits.clone()).argmax()))
    assert seen == {0, 1}  # the tail is outside the nucleus; the masked token never comes back
    # rows are independent: row 0's draws do not depend on row 1's presence
    a = _make_gumbel_processor([7], [1.0], [1.0])(None, torch.zeros(1, 50))
    b = _make_gumbel_processor([7, 8], [1.0, 1.0], [1.0, 1.0])(None, torch.zeros(2, 50))
    assert torch.equal(a[0], b[0]) and not torch.equal(b[0], b[1])
