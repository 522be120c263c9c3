"""read: input shard -> validated, oriented RGB images as rows (CPU, Ray tasks; one task per input shard).

Nothing is dropped silently: every sample found in the shard becomes a row, either ``ok`` or ``rejected``
with a reason code; a damaged tar ends the shard with what could be read plus a recorded shard error.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import warnings
from typing import Any, Iterator

import pyarrow as pa
from PIL import Image, ImageOps

from m3t_gen.config import ReadSpec
from m3t_gen.rows import MARKER, add_timing, new_row, reject, to_table

NAME = "read"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ROWS_PER_BATCH = 64
_SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


def decode_text(raw: bytes | None, max_chars: int, flags: list[str]) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        flags.append("text_not_utf8")
    text = text.strip()
    if len(text) > max_chars:
        text = text[:max_chars]
        flags.append("text_truncated")
    return text


def prepare_image(raw: bytes, spec: ReadSpec) -> tuple[dict[str, Any] | None, str | None, dict[str, Any]]:
    """Decode and validate one image. Returns (fields, None, {}) or (None, reason, detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size  # header only: checked before any pixel is decoded
            if width * height > spec.max_pixels:
                return None, "too_many_pixels", {"width": width, "height": height, "max_pixels": spec.max_pixels}
            img.load()
    except Image.DecompressionBombError as e:
        return None, "too_many_pixels", {"error": str(e)[:200]}
    except Exception as e:  # PIL raises many types for corrupt/truncated/non-image data
        return None, "decode_error", {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    needs_encode = img.format != "JPEG" or img.mode != "RGB"
    oriented = ImageOps.exif_transpose(img)
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
        "reencoded": needs_encode,
    }
    return fields, None, {}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))  # alpha flattened onto white
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def iter_tar_samples(path: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Group tar members by key with webdataset's own tar iterators; a damaged tar stops with an error noted."""
    import webdataset.tariterators as wt

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {str(exn)[:200]}")
        return False  # a tar stream cannot resync after a bad header: stop this shard

    with open(path, "rb") as stream:
        files = wt.tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        yield from wt.group_by_keys(files, handler=handler)


def read_shard(path: str, shard: str, spec: ReadSpec, limit: int | None) -> Iterator[dict[str, Any]]:
    errors: list[str] = []
    count = 0
    started = time.perf_counter()
    for sample in iter_tar_samples(path, errors):
        if limit is not None and count >= limit:
            break
        source_key = str(sample["__key__"])
        flags: list[str] = []
        row = new_row(key=f"{shard}_{count:06d}", shard=shard, source_key=source_key)
        count += 1
        row["text"] = decode_text(sample.get("txt"), spec.max_text_chars, flags)
        meta_raw = sample.get("json")
        if meta_raw is not None:
            try:
                meta = json.loads(meta_raw)
                row["url"] = meta.get("url") if isinstance(meta, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                flags.append("json_invalid")
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if image_ext is None:
            reject(row, NAME, "no_image", members=sorted(k for k in sample if not k.startswith("__")))
        else:
            fields, reason, detail = prepare_image(sample[image_ext], spec)
            if reason:
                reject(row, NAME, reason, **detail)
            else:
                row.update(fields)
        row["flags"] = json.dumps(flags)
        now = time.perf_counter()
        add_timing(row, NAME, now - started)  # includes reading the tar member
        yield row
        started = time.perf_counter()
    yield new_row(key=f"{shard}__end", shard=shard, status=MARKER, shard_rows=count,
                  reject_detail=json.dumps({"errors": errors}) if errors else None)


def read_shards(batch: pa.Table, spec: ReadSpec, limit: int | None) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of input shards in, a stream of row batches out (never a whole shard in memory)."""
    for item in batch.to_pylist():
        rows: list[dict[str, Any]] = []
        for row in read_shard(item["path"], item["shard"], spec, limit):
            rows.append(row)
            if len(rows) >= ROWS_PER_BATCH:
                yield to_table(rows)
                rows = []
        if rows:
            yield to_table(rows)
