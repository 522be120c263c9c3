"""CLIP scoring throughput (issue 5): the embed stage (Arrow batch in -> JPEG decode -> processor -> image and
caption forward -> Arrow batch out, as Ray Data calls it) vs a bare loop doing decode -> processor -> the same
two forwards at the same batch size, on the same images, in one run. Prints one JSON line (medians with min/max over repeats).

    python bench/reward_throughput.py [--images 256] [--batch 32] [--repeats 3] [--size base|large|tiny]

Random weights of a real architecture (ViT-B/32 "base" by default; "large" = ViT-L/14 sizes) are built locally:
speed depends on shapes, not on weights. On a GPU machine add --device cuda.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image


SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=16), proj=64),
    "base": dict(text=dict(), vision=dict(image_size=224, patch_size=32), proj=512),
    "large": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                  vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14), proj=768),
}


def build_clip(size: str, out: Path) -> Path:
    """A random-weight CLIP saved in HF format with the tiny tokenizer and a CLIPImageProcessor."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

    from m3t_gen.models import resolve

    tiny = Path(resolve("tiny:clip"))
    tok = AutoTokenizer.from_pretrained(tiny)
    s = SIZES[size]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, **s["text"]),
                     vision_config=s["vision"], projection_dim=s["proj"])
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    proc = AutoImageProcessor.from_pretrained(tiny)
    side = s["vision"]["image_size"]
    proc.size = {"shortest_edge": side}
    proc.crop_size = {"height": side, "width": side}
    proc.save_pretrained(out)
    return out


def photos(n: int) -> list[bytes]:
    import skimage.data as sk

    bases = [getattr(sk, k)() for k in ("astronaut", "coffee", "chelsea", "rocket", "retina")]
    out = []
    for i in range(n):
        img = Image.fromarray(bases[i % len(bases)]).convert("RGB").rotate(i % 17)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from m3t_gen.config import load_config
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.rows import new_row, to_table
    from m3t_gen.stages.embed import EmbedStage

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_clip(args.size, Path(d) / "clip")
        cfg = load_config(root / "pipelines" / "smoke.yaml", [f"reward.model={model_dir}"]
                          + (["reward.resources.num_gpus=1"] if args.device == "cuda" else []))
        stage = EmbedStage(make_context(cfg))
        clip = stage.clip
        data = photos(args.images)
        rows = [new_row(key=f"b_{i:06d}", shard="b", image=b, caption="a photo") for i, b in enumerate(data)]
        batches = [to_table(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]

        def bare() -> None:
            for i in range(0, len(data), args.batch):
                imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in data[i:i + args.batch]]
                inputs = clip.image_processor(images=imgs, return_tensors="pt")
                texts = clip.tokenizer(["a photo"] * len(imgs), padding=True, truncation=True,
                                       max_length=clip.max_text_tokens, return_tensors="pt")
                with torch.inference_mode():
                    clip.model.get_image_features(pixel_values=inputs["pixel_values"].to(clip.device, clip.dtype))
                    clip.model.get_text_features(input_ids=texts["input_ids"].to(clip.device),
                                                 attention_mask=texts["attention_mask"].to(clip.device))
                if clip.device == "cuda":
                    torch.cuda.synchronize()

        def in_stage() -> None:
            for b in batches:
                stage(b)
            if clip.device == "cuda":
                torch.cuda.synchronize()

        bare(), in_stage()  # warm-up (allocators, kernels)
        res: dict[str, list[float]] = {"bare": [], "stage": []}
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("stage", in_stage)):
                t = time.perf_counter()
                fn()
                res[name].append(args.images / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in res.items()}
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    print(json.dumps({
        "bench": "reward_throughput", "size": args.size, "device": args.device, "gpu": gpu,
        "images": args.images, "batch": args.batch, "torch_threads": torch.get_num_threads(),
        "images_per_s": {k: {"median": round(med[k], 2), "min": round(min(v), 2), "max": round(max(v), 2)}
                         for k, v in res.items()},
        "ratio_stage_vs_bare": round(med["stage"] / med["bare"], 3),
    }))


if __name__ == "__main__":
    main()
