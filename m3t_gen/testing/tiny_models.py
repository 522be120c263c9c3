"""Tiny random-weight models, built locally in seconds, in the same on-disk formats as real checkpoints.

They let the whole pipeline (and the tests) run on a laptop without a model hub:

- ``vlm``: a LLaVA-style model (``LlavaForConditionalGeneration``: a tiny CLIP vision tower, a projector and
  a tiny Qwen2 language model) with a ``LlavaProcessor``; loads like ``llava-hf/llava-1.5-7b-hf`` through
  ``AutoProcessor`` + ``AutoModelForImageTextToText`` (and in vLLM);
- ``qwen2_5_vl``: a tiny ``Qwen2_5_VLForConditionalGeneration`` (the production captioner's architecture:
  window-attention ViT, 14-px patches merged 2x2, M-RoPE text model) with transformers' own
  ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` / ``Qwen2_5_VLProcessor`` and the Qwen vision tokens;
  loads like ``Qwen/Qwen2.5-VL-7B-Instruct`` through ``AutoProcessor`` + ``AutoModelForImageTextToText`` and in
  vLLM. Images are resized to at most 112x112 px (16 image tokens);
- ``lm``: a tiny ``Qwen2ForCausalLM`` with its tokenizer; loads through ``AutoTokenizer`` +
  ``AutoModelForCausalLM`` (and in vLLM);
- ``qwen3``: a tiny ``Qwen3ForCausalLM`` with ``<think>``/``</think>`` and a Qwen3-style chat template
  (``enable_thinking``): the reasoning-writer tests (vLLM's ``qwen3`` reasoning parser);
- ``clip``: a tiny ``CLIPModel`` with tokenizer and image processor; loads like
  ``openai/clip-vit-large-patch14`` through ``AutoModel`` + ``AutoTokenizer`` + ``AutoImageProcessor``.

All five share one byte-level BPE tokenizer trained here on local text only (Python's own docstrings plus a
few fixed paragraphs), with ChatML special tokens and a chat template that takes string content or lists of
``text`` / ``image`` parts. Builds are deterministic: a fixed seed gives the same weights every time.

``ensure_tiny_model`` builds into a temporary directory beside the cache entry and renames it into place,
so concurrent builders (several Ray actors) never see half a model.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from m3t_gen.turns import TURN_TYPE_NAMES

KINDS = ("vlm", "qwen2_5_vl", "lm", "qwen3", "clip")
SEED = 20240531
VOCAB_SIZE = 2000  # BPE vocabulary, special tokens included (the VLM adds <image> on top)
# Bump when the builder changes what it writes; recorded in the stamp file.
BUILD_VERSION = 2  # 2: LLaVA vision weights under vision_tower.vision_model.* (vLLM's names)
STAMP_FILE = "m3t_tiny_model.json"
# Builds seed torch's global RNG, which threads share: one build at a time per process.
_BUILD_LOCK = threading.Lock()

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
# Qwen2-VL / Qwen2.5-VL vision tokens (same strings as the real tokenizer), and Qwen3's reasoning markers.
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
THINK_START, THINK_END = "<think>", "</think>"
# Qwen2.5-VL geometry: 14-px patches, 2x2 merge -> one token per 28x28 px; at most 112x112 px = 16 tokens.
QWEN_VL_PATCH = 14
QWEN_VL_MAX_PIXELS = 112 * 112
QWEN_VL_MIN_PIXELS = 56 * 56

# Vision tower geometry (VLM and CLIP): 32x32 images in 8x8 patches -> 16 patches (+1 CLS token).
IMAGE_SIZE = 32
PATCH_SIZE = 8
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Tiny Qwen2: head_dim = 128 / 2 = 64 (vLLM's CPU attention needs head_dim >= 64).
_TEXT_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
)

# Qwen2's pre-tokenization regex (contractions, letter runs, single digits, punctuation runs, whitespace).
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

_PARAGRAPHS = [
    "A photo of a dog running on the beach at sunset, with waves breaking behind it.",
    "Two people are sitting at a wooden table in a cafe, drinking coffee and reading a newspaper.",
    "The image shows a red car parked on a quiet street next to a tall green tree.",
    "An astronaut in a white space suit holds a helmet and smiles in front of a flag.",
    "A bowl of fresh fruit: apples, bananas, oranges and grapes on a kitchen counter.",
    "A city skyline at night, the buildings lit up and reflected in the river below.",
    "Describe the image in detail. What objects are visible, and where are they located?",
    "Question: what color is the shirt of the person on the left? Answer: the shirt is blue.",
    "Question: how many birds are on the wire? Answer: there are three birds on the wire.",
    "The caption says the picture was taken in the mountains during winter, with snow on the trees.",
    "Write a short story inspired by the picture, in two or three sentences.",
    "Is the image a photograph, a drawing, or a screenshot of a web page?",
    "The small cat sleeps on a soft blue blanket near the window, in the warm morning light.",
    "A group of children play football in a park; one of them kicks the ball toward the goal.",
    "The text on the sign reads 'Open every day from 9 to 5'.",
    "Classify the image into one of the following categories: animal, vehicle, food, person, place.",
    "Which of these captions best matches the image? Choose the number of the best caption.",
    "The user asks a question about the image and the assistant answers it, turn after turn.",
    "Return the answer as a JSON object that follows the schema, with no other text.",
    "A plate with pasta, tomato sauce and basil leaves; a glass of water stands next to it.",
]

_JSON_KEYS = ["type", "question", "answer", "caption", "turns", "label", "score", "text", "reason", "index"]
_TURN_TYPES = list(TURN_TYPE_NAMES)
# Pure-Python standard-library sources whose docstrings are read (by parsing the files, never importing them,
# so the text does not depend on what is imported or monkeypatched in the process). Missing files are skipped.
_DOC_SOURCES = [
    "argparse.py", "textwrap.py", "string.py", "difflib.py", "calendar.py", "json/__init__.py",
    "json/encoder.py", "json/decoder.py", "functools.py", "collections/__init__.py", "os.py", "posixpath.py",
    "pathlib.py", "pathlib/_local.py", "random.py", "statistics.py", "datetime.py", "_pydatetime.py",
    "_pydecimal.py", "fractions.py", "heapq.py", "bisect.py", "enum.py", "contextlib.py", "threading.py",
    "queue.py", "copy.py", "pprint.py", "codecs.py", "shutil.py", "tempfile.py", "csv.py", "urllib/parse.py",
    "html/__init__.py", "zipfile.py", "zipfile/__init__.py", "tarfile.py", "email/message.py", "http/client.py",
    "gettext.py", "locale.py", "logging/__init__.py", "unittest/case.py", "typing.py", "dataclasses.py",
    "inspect.py", "subprocess.py", "ipaddress.py", "smtplib.py", "configparser.py", "optparse.py",
]


# --------------------------------------------------------------------------------------------------- tokenizer


def _docstrings(max_chars: int = 600_000) -> list[str]:
    """Docstrings of a fixed list of standard-library source files, in file order."""
    import ast
    import inspect

    stdlib = Path(os.__file__).parent
    out: list[str] = []
    seen: set[str] = set()
    total = 0
    for rel in _DOC_SOURCES:
        try:
            tree = ast.parse((stdlib / rel).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            doc = inspect.cleandoc(doc)
            if doc in seen:
                continue
            seen.add(doc)
            out.append(doc)
            total += len(doc)
            if total >= max_chars:
                return out
    return out


def _synthetic_json(rng: random.Random, words: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append(
                {
                    "type": rng.choice(_TURN_TYPES),
                    "question": " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "?",
                    "answer": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + ".",
                }
            )
        obj: dict[str, Any] = {"turns": turns}
        for key in rng.sample(_JSON_KEYS, 2):
            obj[key] = rng.choice([rng.randint(0, 99), rng.choice(words), rng.random() < 0.5])
        out.append(json.dumps(obj, indent=rng.choice([None, 2])))
    return out


def training_corpus() -> list[str]:
    """The tokenizer's training text: deterministic for a given Python version, all local."""
    rng = random.Random(SEED)
    words = sorted({w.strip(".,:;?!'\"").lower() for p in _PARAGRAPHS for w in p.split()} - {""})
    chat = [
        f"{IM_START}user\n{IMAGE_TOKEN}\n{p}{IM_END}\n{IM_START}assistant\n{q}{IM_END}\n{EOS_TOKEN}"
        for p, q in zip(_PARAGRAPHS, reversed(_PARAGRAPHS))
    ]
    return _PARAGRAPHS * 20 + chat * 5 + _synthetic_json(rng, words, 400) + _docstrings()


def _train_bpe():
    """A byte-level BPE trained on ``training_corpus()``; returns a fresh ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_bpe_json())


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # The Qwen2 pipeline (NFC, Qwen2's split regex, then bytes): transformers 5 loads a ``qwen2`` checkpoint's
    # tokenizer as ``Qwen2Tokenizer``, which rebuilds exactly this pipeline around the saved vocab and merges,
    # so the tokenizer encodes the same whichever class loads it.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


def chat_template(image_placeholder: str | None, thinking: bool = False) -> str:
    """ChatML; content is a string or a list of parts. Image parts render as ``image_placeholder``
    (dropped when None: the text-only LM). ``add_generation_prompt`` opens the assistant turn; with
    ``thinking`` it also opens the reasoning block (``<think>``, as Qwen3-Thinking and DeepSeek-R1 templates do,
    so even a random model is inside it), or with ``enable_thinking=false`` writes an empty one (Qwen3's way to
    switch thinking off)."""
    image = image_placeholder or ""
    gen_prompt = "{{- '" + IM_START + "assistant\\n' -}}"
    if thinking:
        gen_prompt += (
            "{%- if enable_thinking is defined and enable_thinking is false -%}"
            "{{- '" + THINK_START + "\\n\\n" + THINK_END + "\\n\\n' -}}"
            "{%- else -%}{{- '" + THINK_START + "\\n' -}}{%- endif -%}"
        )
    return (
        "{%- for message in messages -%}"
        "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- elif message['content'] is not none -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] in ['image', 'image_url', 'image_pil'] -%}"
        "{{- '" + image + "' -}}"
        "{%- elif part['type'] == 'text' -%}"
        "{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '" + IM_END + "\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + gen_prompt + "{%- endif -%}"
    )


def build_tokenizer(kind: str):
    """The transformers tokenizer for ``kind`` (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tokenizers import AddedToken

    backend = _train_bpe()
    kwargs: dict[str, Any] = {}
    if kind == "vlm":
        backend.add_special_tokens([IMAGE_TOKEN])
        kwargs["extra_special_tokens"] = [IM_START, IM_END, IMAGE_TOKEN]
    elif kind == "qwen2_5_vl":
        vision = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
        backend.add_special_tokens(vision)
        kwargs["extra_special_tokens"] = [IM_START, IM_END, *vision]
    elif kind == "qwen3":
        # Not special (as in Qwen3's own tokenizer): they stay in the decoded text, where parsers find them.
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
        kwargs["extra_special_tokens"] = [IM_START, IM_END]
    else:
        kwargs["extra_special_tokens"] = [IM_START, IM_END]
    if kind == "clip":
        # Like CLIP's own tokenizer: every text ends with the end-of-text token, whose position the text tower
        # pools; 77 positions.
        eos_id = backend.token_to_id(EOS_TOKEN)
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
                    special_tokens=[(EOS_TOKEN, eos_id)],
                ),
            ]
        )
        kwargs["model_max_length"] = 77
        kwargs["bos_token"] = None
    else:
        kwargs["model_max_length"] = _TEXT_DIMS["max_position_embeddings"]
        kwargs["padding_side"] = "left"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, **kwargs)
    placeholders = {"vlm": IMAGE_TOKEN, "qwen2_5_vl": VISION_START + IMAGE_PAD + VISION_END}
    if kind != "clip":
        tok.chat_template = chat_template(placeholders.get(kind), thinking=kind == "qwen3")
    return tok


# ------------------------------------------------------------------------------------------------------ models


def _qwen2_config(tok, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tok),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        **_TEXT_DIMS,
        **extra,
    )


def _generation_config(tok):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=None,
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )


def _clip_vision_dims() -> dict[str, Any]:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,  # head_dim 64
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )


def _image_processor():
    try:  # transformers >= 5.x: the PIL backend has its own class (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as cls
    return cls(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        do_convert_rgb=True,
    )


def _build_lm(out_dir: Path) -> None:
    from transformers import Qwen2ForCausalLM

    tok = build_tokenizer("lm")
    config = _qwen2_config(tok)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _build_vlm(out_dir: Path) -> None:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer("vlm")
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = _qwen2_config(tok)
    text_config.architectures = ["Qwen2ForCausalLM"]
    vision_config = CLIPVisionConfig(**_clip_vision_dims())
    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=num_patches,  # "default" strategy drops the CLS token
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out_dir)
    _rename_llava_vision_weights(out_dir)


def _rename_llava_vision_weights(out_dir: Path) -> None:
    """transformers 5 saves a LLaVA's CLIP tower as ``vision_tower.embeddings.*`` (its CLIPVisionModel without the
    ``vision_model`` level); vLLM's llava loader, and LLaVA checkpoints on the hub, spell it
    ``vision_tower.vision_model.*``. transformers loads either spelling, so write the hub's."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for name, t in tensors.items():
        head, sep, tail = name.partition("vision_tower.")
        if sep and not tail.startswith("vision_model."):
            name = f"{head}vision_tower.vision_model.{tail}"
        renamed[name] = t
    save_file(renamed, path, metadata={"format": "pt"})


def _build_qwen2_5_vl(out_dir: Path) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_tokenizer("qwen2_5_vl")
    ids = {t: tok.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
    head_dim = _TEXT_DIMS["hidden_size"] // _TEXT_DIMS["num_attention_heads"]
    text_config = dict(
        vocab_size=len(tok),
        **_TEXT_DIMS,
        # M-RoPE: (temporal, height, width) sections of the rotary half-dimension, as in the real config.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=2,
        hidden_size=128,
        intermediate_size=256,
        num_heads=2,  # head_dim 64
        patch_size=QWEN_VL_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        out_hidden_size=_TEXT_DIMS["hidden_size"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    pixels = dict(min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS, patch_size=QWEN_VL_PATCH,
                  merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=tok.chat_template,
    )
    processor.save_pretrained(out_dir)


def _build_qwen3(out_dir: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_tokenizer("qwen3")
    config = Qwen3Config(
        vocab_size=len(tok),
        head_dim=_TEXT_DIMS["hidden_size"] // _TEXT_DIMS["num_attention_heads"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        **_TEXT_DIMS,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


TINY_CLIP_DIM = 64  # the tiny CLIP's embedding width (synthetic pools in bench/ match it)


def _build_clip(out_dir: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    tok = build_tokenizer("clip")
    eos_id = tok.eos_token_id
    text_config = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TINY_CLIP_DIM,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    config = CLIPConfig(text_config=text_config, vision_config=_clip_vision_dims(), projection_dim=TINY_CLIP_DIM)
    config.architectures = ["CLIPModel"]
    model = CLIPModel(config).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    _image_processor().save_pretrained(out_dir)


_BUILDERS = {"lm": _build_lm, "vlm": _build_vlm, "qwen2_5_vl": _build_qwen2_5_vl, "qwen3": _build_qwen3,
             "clip": _build_clip}


def _portable_configs(out_dir: Path) -> None:
    """Write the saved configs the way most hub checkpoints spell them, so older transformers read them too.

    - the tokenizer class as ``PreTrainedTokenizerFast`` (transformers 5 writes its new name
      ``TokenizersBackend``, unknown to 4.x) and the extra special tokens as ``additional_special_tokens``
      (5 reads that old key; 4.x expects a dict under the new one);
    - the image processor under its canonical name ``CLIPImageProcessor`` (not the ``...Pil`` backend class), as
      real checkpoints do: ``AutoImageProcessor`` then picks the torchvision or the PIL backend by what is
      installed; and a ``preprocessor_config.json`` beside the nested one in ``processor_config.json``.
    """
    path = out_dir / "tokenizer_config.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        if isinstance(data.get("extra_special_tokens"), list):
            data["additional_special_tokens"] = data.pop("extra_special_tokens")
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    proc = out_dir / "processor_config.json"
    pre = out_dir / "preprocessor_config.json"
    if proc.exists() and not pre.exists():
        nested = json.loads(proc.read_text()).get("image_processor")
        if isinstance(nested, dict):
            pre.write_text(json.dumps(nested, indent=2, sort_keys=True) + "\n")
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = out_dir / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        target = data.get("image_processor", data)
        if isinstance(target, dict) and str(target.get("image_processor_type", "")).startswith("CLIPImageProcessor"):
            target["image_processor_type"] = "CLIPImageProcessor"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny_model(kind: str, out_dir: Path) -> Path:
    """Build the tiny ``kind`` model (one of ``KINDS``) into ``out_dir`` (created; must be empty if it
    exists) and return ``out_dir``. Deterministic: the same code gives the same files."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model {kind!r} (expected one of: {', '.join(KINDS)})")
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    # Seed a private copy of the global RNG: the weights are fixed and the caller's RNG state is untouched.
    from transformers.utils import logging as hf_logging

    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        bars_were_disabled = not hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bars in every actor's log
        try:
            torch.manual_seed(SEED)
            _BUILDERS[kind](out_dir)
        finally:
            if not bars_were_disabled:
                hf_logging.enable_progress_bar()
    _portable_configs(out_dir)
    (out_dir / STAMP_FILE).write_text(json.dumps({"kind": kind, "build_version": BUILD_VERSION}) + "\n")
    return out_dir


def ensure_tiny_model(kind: str, cache_dir: Path) -> Path:
    """Return ``cache_dir/kind``, building it first if missing. Safe with concurrent callers: each builds in
    its own temporary directory beside the target and renames it into place; a loser of the race uses the
    winner's copy."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model {kind!r} (expected one of: {', '.join(KINDS)})")
    cache_dir = Path(cache_dir)
    final = cache_dir / kind
    if (final / STAMP_FILE).exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.building-", dir=cache_dir))
    try:
        build_tiny_model(kind, tmp)
        # mkdtemp makes a private (0700) directory and safetensors writes 0600 files: open them up as a
        # normal build output would be, since the cache may be shared.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)  # atomic; also replaces an empty directory
        except OSError:
            if not (final / STAMP_FILE).exists():
                raise RuntimeError(
                    f"{final} exists but is not a complete tiny model; delete it and try again"
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
