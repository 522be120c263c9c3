"""The tiny models build fast and deterministically, and load back through the same Auto* classes as the real
checkpoints they stand in for (Qwen/Qwen2.5-VL-7B-Instruct, llava-hf/llava-1.5-7b-hf, a Qwen2 chat LM, a Qwen3
reasoning LM, openai/clip-vit-large-patch14)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from m3t_gen.testing import tiny_models  # noqa: E402
from m3t_gen.testing.tiny_models import (  # noqa: E402
    EOS_TOKEN,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_TOKEN,
    STAMP_FILE,
    THINK_END,
    THINK_START,
    VISION_END,
    VISION_START,
    build_tiny_model,
    ensure_tiny_model,
)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tiny-cache")
    for kind in tiny_models.KINDS:
        ensure_tiny_model(kind, cache)
    return cache


@pytest.fixture(scope="session")
def astronaut():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


# ------------------------------------------------------------------------------------------------ building


def test_ensure_builds_once_into_cache_dir(tiny_cache: Path):
    for kind in tiny_models.KINDS:
        path = tiny_cache / kind
        assert (path / "config.json").is_file()
        assert (path / "model.safetensors").is_file()
        assert json.loads((path / STAMP_FILE).read_text())["kind"] == kind
    before = _digest(tiny_cache / "lm")
    mtime = (tiny_cache / "lm" / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("lm", tiny_cache) == tiny_cache / "lm"
    assert (tiny_cache / "lm" / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert _digest(tiny_cache / "lm") == before
    # No half-built leftovers beside the finished models.
    assert sorted(p.name for p in tiny_cache.iterdir()) == sorted(tiny_models.KINDS)


@pytest.mark.parametrize("kind", tiny_models.KINDS)
def test_build_is_deterministic(kind: str, tiny_cache: Path, tmp_path: Path):
    again = build_tiny_model(kind, tmp_path / kind)
    assert _digest(again) == _digest(tiny_cache / kind)


def test_build_refuses_non_empty_dir_and_unknown_kind(tmp_path: Path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("")
    with pytest.raises(FileExistsError):
        build_tiny_model("lm", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_model("gpt5", tmp_path / "y")
    with pytest.raises(ValueError, match="unknown tiny model"):
        ensure_tiny_model("gpt5", tmp_path)


def test_build_leaves_global_rng_alone(tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("lm", tmp_path / "lm")
    assert torch.equal(torch.rand(3), expected)


def test_concurrent_ensure_gives_one_complete_model(tiny_cache: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def worker():
        try:
            barrier.wait()
            results.append(ensure_tiny_model("lm", cache))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [cache / "lm"] * 3
    assert sorted(p.name for p in cache.iterdir()) == ["lm"]  # losers cleaned up their temp dirs
    assert _digest(cache / "lm") == _digest(tiny_cache / "lm")


def test_ensure_rejects_incomplete_target(tmp_path: Path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")  # someone else's half-written directory
    with pytest.raises(RuntimeError, match="not a complete tiny model"):
        ensure_tiny_model("lm", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer(tiny_cache: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_cache / "lm")
    assert 1500 <= len(tok) <= 2100
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    for special in (EOS_TOKEN, IM_START, IM_END):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(special)], special
    text = 'Héllo wörld: {"caption": "a red car", "n": 42}\n\t日本語 😀'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # it learned merges, not just bytes
    # The file on disk and the class transformers picks for a qwen2 checkpoint encode identically.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_cache / "lm" / "tokenizer.json"))
    for s in (text, "  leading spaces,\n\nnew lines 12345", f"{IM_START}user\nhi{IM_END}\n"):
        assert raw.encode(s, add_special_tokens=False).ids == tok(s, add_special_tokens=False)["input_ids"]


def test_chat_template_string_and_parts(tiny_cache: Path):
    from transformers import AutoTokenizer

    vlm_tok = AutoTokenizer.from_pretrained(tiny_cache / "vlm")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image", "image": object()}, {"type": "text", "text": "And this?"}]},
    ]
    rendered = vlm_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"{IM_START}system\nBe brief.{IM_END}\n"
        f"{IM_START}user\n{IMAGE_TOKEN}What is this?{IM_END}\n"
        f"{IM_START}assistant\nA cat.{IM_END}\n"
        f"{IM_START}user\n{IMAGE_TOKEN}And this?{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    no_prompt = vlm_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    assert no_prompt == f"{IM_START}system\nBe brief.{IM_END}\n"
    lm_tok = AutoTokenizer.from_pretrained(tiny_cache / "lm")
    assert IMAGE_TOKEN not in lm_tok.apply_chat_template(messages, tokenize=False)  # text-only: images dropped


# ------------------------------------------------------------------------------------------------ models


def test_lm_loads_and_generates(tiny_cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_cache / "lm"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads >= 64  # vLLM CPU attention
    assert cfg.vocab_size == len(tok)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert set(model.generation_config.eos_token_id) == {im_end, tok.eos_token_id}
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n")
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] - enc["input_ids"].shape[1] <= 5
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_vlm_loads_like_llava(tiny_cache: Path, astronaut):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_cache / "vlm"
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == image_id
    text_cfg = model.config.text_config
    assert text_cfg.hidden_size // text_cfg.num_attention_heads >= 64

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.count(IMAGE_TOKEN) == 1
    enc = processor(images=[astronaut], text=[prompt], return_tensors="pt")
    n_image_tokens = int((enc["input_ids"] == image_id).sum())
    assert n_image_tokens == model.config.image_seq_length == 16
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
        feats = feats if isinstance(feats, torch.Tensor) else getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats))
        # The processor's expansion of <image> matches the number of features the model scatters in.
        assert feats.reshape(-1, text_cfg.hidden_size).shape[0] == n_image_tokens
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], text_cfg.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert 0 < out.shape[1] - enc["input_ids"].shape[1] <= 4


def test_llava_vision_weights_carry_vllms_names(tiny_cache: Path):
    from safetensors import safe_open

    with safe_open(str(tiny_cache / "vlm" / "model.safetensors"), "pt") as f:
        vision = [k for k in f.keys() if "vision_tower" in k]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


def test_qwen2_5_vl_loads_like_the_real_checkpoint(tiny_cache: Path, astronaut):
    """Qwen2.5-VL through AutoProcessor + AutoModelForImageTextToText, the classes a hub checkpoint resolves to:
    the processor expands the vision placeholder into one token per 28x28 px (at most 112x112 px here), and the
    model puts that many vision features in."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_cache / "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids(VISION_START)
    text_cfg = model.config.text_config
    assert text_cfg.hidden_size // text_cfg.num_attention_heads >= 64  # vLLM CPU attention
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert f"{VISION_START}{IMAGE_PAD}{VISION_END}" in prompt
    texts = {}
    for name, image, tokens in (("astronaut", astronaut, 16), ("wide", Image.new("RGB", (600, 150), "red"), 7),
                                ("blue", Image.new("RGB", (512, 512), "blue"), 16)):
        enc = processor(images=[image], text=[prompt], return_tensors="pt")
        n = int((enc["input_ids"] == model.config.image_token_id).sum())
        grid = enc["image_grid_thw"][0]
        assert n == int(grid.prod()) // 4 == tokens, name  # one token per 2x2 merged 14-px patches
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        texts[name] = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert texts["blue"] != texts["wide"]  # what the model writes depends on the image


def test_qwen3_loads_and_switches_thinking(tiny_cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_cache / "qwen3"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim >= 64
    # <think> / </think> are single tokens that stay in decoded text (where reasoning parsers look for them).
    for marker in (THINK_START, THINK_END):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    ids = tok(f"{THINK_START}a{THINK_END}b", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == f"{THINK_START}a{THINK_END}b"
    msgs = [{"role": "user", "content": "Hi"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith(f"assistant\n{THINK_START}\n")
    assert off.endswith(f"assistant\n{THINK_START}\n\n{THINK_END}\n\n")


def test_clip_loads_like_openai_clip(tiny_cache: Path, astronaut):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    path = tiny_cache / "clip"
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    assert type(model).__name__ == "CLIPModel"
    assert tok.model_max_length == 77

    def features(out):  # transformers 5 returns a model output with the projection in pooler_output
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    texts = ["an astronaut in a white suit", "a bowl of fruit on a table"]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    assert (enc["input_ids"] == tok.eos_token_id).any(dim=1).all()  # the text tower pools at the EOS token
    long = tok(["word " * 200], truncation=True, return_tensors="pt")
    assert long["input_ids"].shape[1] == 77
    with torch.no_grad():
        img = features(model.get_image_features(**image_processor(images=[astronaut], return_tensors="pt")))
        txt = features(model.get_text_features(**enc))
        features(model.get_text_features(**long))
    assert img.shape == (1, 64) and txt.shape == (2, 64)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not torch.allclose(txt[0], txt[1])
    sims = torch.nn.functional.cosine_similarity(img, txt)
    assert sims.shape == (2,)
