"""read: input shard -> validated, oriented RGB images as rows (CPU, Ray tasks; one task per input shard).

Nothing is dropped silently: every sample found in the shard becomes a row, ``ok`` or ``rejected`` with a
reason code (docs/reasons.md); damage to the shard itself is recorded in its stats. Rows stream out in small
batches, so a shard is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from typing import Any, Iterator

import pyarrow as pa
from PIL import Image, ImageOps

from m3t_gen.config import InputSpec, ReadSpec
from m3t_gen.rows import MARKER, add_timing, new_row, reject, to_table
from m3t_gen.sources import FORMATS, parse_meta

NAME = "read"
ROWS_PER_BATCH = 128


def decode_text(raw: bytes | str | None, max_chars: int, flags: list[str]) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            flags.append("text_not_utf8")
    else:
        text = str(raw)
    text = text.replace("\x00", "").strip()
    if len(text) > max_chars:
        text = text[:max_chars]
        flags.append("text_truncated")
    return text


def _decode_failure(raw: bytes, exc: Exception) -> tuple[str, dict[str, Any]]:
    detail = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "bytes": len(raw)}
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not_an_image", detail
    if "truncated" in str(exc).lower() or isinstance(exc, (EOFError, SyntaxError)):
        return "truncated_image", detail
    return "decode_error", detail


def prepare_image(raw: bytes, spec: ReadSpec) -> tuple[dict[str, Any] | None, str | None, dict[str, Any]]:
    """Decode and validate one image. Returns (fields, None, {}) or (None, reason, detail)."""
    if not raw:
        return None, "empty_file", {"bytes": 0}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette warnings
            img = Image.open(io.BytesIO(raw))
            width, height = img.size  # header only: checked before any pixel is decoded
            if width * height > spec.max_pixels:
                return None, "too_many_pixels", {"width": width, "height": height, "max_pixels": spec.max_pixels}
            fmt = img.format
            img.load()
            # exif_transpose returns a copy even when there is nothing to do: only call it when needed.
            orientation = img.getexif().get(0x0112, 1)
            oriented = ImageOps.exif_transpose(img) if orientation not in (1, None) else img
    except Image.DecompressionBombError as e:
        return None, "too_many_pixels", {"error": str(e)[:200]}
    except Exception as e:  # PIL raises many types for corrupt/truncated/non-image data
        reason, detail = _decode_failure(raw, e)
        return None, reason, detail

    needs_encode = fmt != "JPEG" or img.mode != "RGB"
    if oriented is not img:
        needs_encode = True
        img = oriented
    if img.mode != "RGB":
        img = _to_rgb(img)
    if max(img.size) < spec.min_side:
        return None, "too_small", {"width": img.width, "height": img.height, "min_side": spec.min_side}
    if spec.max_side and max(img.size) > spec.max_side:
        img.thumbnail((spec.max_side, spec.max_side), Image.Resampling.BICUBIC)
        needs_encode = True
    data = raw
    if needs_encode:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=spec.jpeg_quality)
        data = buf.getvalue()
    fields = {
        "image": data,
        "width": img.width,
        "height": img.height,
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "reencoded": needs_encode,
    }
    if spec.dedupe.perceptual:
        import imagehash

        fields["phash"] = str(imagehash.phash(img))
    return fields, None, {}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))  # alpha flattened onto white
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: scale the actual range to 8 bits (a plain convert clips to 255).
        lo, hi = img.getextrema()
        scale = 255.0 / max(hi - lo, 1)
        return img.point(lambda v: (v - lo) * scale).convert("L").convert("RGB")
    return img.convert("RGB")


def read_shard(path: str, shard: str, input_spec: InputSpec, spec: ReadSpec,
               limit: int | None) -> Iterator[dict[str, Any]]:
    errors: list[str] = []
    count = 0
    started = time.perf_counter()
    for sample in FORMATS[input_spec.format](path, input_spec, errors):
        if limit is not None and count >= limit:
            break
        flags: list[str] = []
        row = new_row(key=f"{shard}_{count:06d}", shard=shard, source_key=str(sample["source_key"])[:500])
        count += 1
        row["text"] = decode_text(sample.get("text"), spec.max_text_chars, flags)
        meta = parse_meta(sample.get("meta"), flags)
        url = meta.get("url")
        row["url"] = url if isinstance(url, str) else None
        row["meta"] = json.dumps(meta, ensure_ascii=False, default=str) if meta else None
        if sample["problem"]:
            reject(row, NAME, sample["problem"], **(sample["problem_detail"] or {}))
        else:
            fields, reason, detail = prepare_image(sample["image"], spec)
            if reason:
                reject(row, NAME, reason, **detail)
            else:
                row.update(fields)
        row["flags"] = json.dumps(flags)
        add_timing(row, NAME, time.perf_counter() - started)  # includes reading the member from the shard
        yield row
        started = time.perf_counter()
    yield new_row(key=f"{shard}__end", shard=shard, status=MARKER, shard_rows=count,
                  reject_detail=json.dumps({"errors": errors}) if errors else None)


def read_shards(batch: pa.Table, input_spec: InputSpec, spec: ReadSpec, limit: int | None) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of input shards in, a stream of row batches out."""
    for item in batch.to_pylist():
        rows: list[dict[str, Any]] = []
        for row in read_shard(item["path"], item["shard"], input_spec, spec, limit):
            rows.append(row)
            if len(rows) >= ROWS_PER_BATCH:
                yield to_table(rows)
                rows = []
        if rows:
            yield to_table(rows)
