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
from m3t_gen.storage.images import PixelProblem, strip_jpeg_metadata, to_rgb
from m3t_gen.storage.sources import FORMATS, ShardReport, parse_meta

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


JPEG_MAX_SIDE = 65_535  # the JPEG format's limit on either side


def prepare_image(raw: bytes, spec: ReadSpec, flags: list[str] | None = None
                  ) -> tuple[dict[str, Any] | None, str | None, dict[str, Any]]:
    """Decode and validate one image. Returns (fields, None, {}) or (None, reason, detail): whatever the bytes
    (any mode, any size, NaN pixels), a reason, never an exception. The output image carries no metadata: a JPEG
    kept as it came loses its metadata segments losslessly (flag ``metadata_stripped``), a re-encoded one is
    written without any."""
    flags = [] if flags is None else flags
    if not raw:
        return None, "empty_file", {"bytes": 0}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette warnings
            img = Image.open(io.BytesIO(raw))
            width, height = img.size  # header only: checked before any pixel is decoded
            refused = _refuse_by_size(width, height, spec)
            if refused:
                return None, *refused
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
    try:
        return _output_image(raw, img, oriented, fmt, spec, flags)
    except PixelProblem as e:
        return None, e.reason, e.detail
    except Exception as e:  # a mode Pillow cannot convert, an encoder's refusal: this sample's, not the run's
        return None, "encode_error", {"error": f"{type(e).__name__}: {str(e)[:200]}", "mode": img.mode,
                                      "width": width, "height": height}


def _refuse_by_size(width: int, height: int, spec: ReadSpec) -> tuple[str, dict[str, Any]] | None:
    """What the header's size alone rules out: too many pixels, too elongated, or too long a side for a JPEG
    after ``max_side``."""
    if width * height > spec.max_pixels:
        return "too_many_pixels", {"width": width, "height": height, "max_pixels": spec.max_pixels}
    ratio = max(width, height) / max(1, min(width, height))
    if spec.max_aspect_ratio and ratio > spec.max_aspect_ratio:
        return "extreme_aspect_ratio", {"width": width, "height": height, "ratio": round(ratio, 2),
                                        "max_aspect_ratio": spec.max_aspect_ratio}
    longest = min(max(width, height), spec.max_side or max(width, height))
    if longest > JPEG_MAX_SIDE:
        return "too_large_for_jpeg", {"width": width, "height": height, "max_jpeg_side": JPEG_MAX_SIDE,
                                      "max_side": spec.max_side}
    return None


def _output_image(raw: bytes, img: Image.Image, oriented: Image.Image, fmt: str | None, spec: ReadSpec,
                  flags: list[str]) -> tuple[dict[str, Any] | None, str | None, dict[str, Any]]:
    """A decoded image -> the output JPEG and its fields: RGB, upright, within ``max_side``, no metadata."""
    needs_encode = fmt != "JPEG" or img.mode != "RGB"
    if oriented is not img:
        needs_encode = True
        img = oriented
    if img.mode != "RGB":
        img = to_rgb(img, flags)
    if max(img.size) < spec.min_side:
        return None, "too_small", {"width": img.width, "height": img.height, "min_side": spec.min_side}
    if spec.max_side and max(img.size) > spec.max_side:
        img.thumbnail((spec.max_side, spec.max_side), Image.Resampling.BICUBIC)
        needs_encode = True
    data = raw
    if not needs_encode:
        stripped = strip_jpeg_metadata(raw)
        if stripped is None:
            needs_encode = True
        elif stripped is not raw:
            data = stripped
            flags.append("metadata_stripped")
    if needs_encode:
        buf = io.BytesIO()
        # comment="": Pillow would otherwise carry a source JPEG's comment over (EXIF/XMP/ICC only when asked).
        img.save(buf, format="JPEG", quality=spec.jpeg_quality, comment=b"")
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


def read_shard(path: str, shard: str, input_spec: InputSpec, spec: ReadSpec,
               limit: int | None) -> Iterator[dict[str, Any]]:
    report = ShardReport()
    count = 0
    started = time.perf_counter()
    for sample in FORMATS[input_spec.format](path, input_spec, report, spec):
        if limit is not None and count >= limit:
            break
        flags: list[str] = list(sample.get("flags") or [])
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
            fields, reason, detail = prepare_image(sample["image"], spec, flags)
            if reason:
                reject(row, NAME, reason, **detail)
            else:
                row.update(fields)
        row["flags"] = flags
        add_timing(row, NAME, time.perf_counter() - started)  # includes reading the member from the shard
        yield row
        started = time.perf_counter()
    detail = report.as_detail()  # shard errors and skipped entries: the writer puts them in the shard's stats
    yield new_row(key=f"{shard}__end", shard=shard, status=MARKER, shard_rows=count,
                  reject_detail=json.dumps(detail) if detail else None)


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
