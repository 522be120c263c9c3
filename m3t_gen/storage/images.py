"""Image bytes in and out: one conversion to RGB, one metadata stripper, one thumbnail maker, used by the
reader, the OpenAI backend's data URLs, the card and the inspector."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


# JPEG segments that change how the pixels decode, by marker and payload signature: JFIF, the ICC colour profile
# and Adobe's colour-transform flag. Every other application segment (EXIF, XMP, IPTC, maker notes: camera,
# GPS, software, private data) and comments go; the entropy-coded data is copied as is.
_JPEG_KEEP = {0xE0: (b"JFIF\0", b"JFXX\0"), 0xE2: (b"ICC_PROFILE\0",), 0xEE: (b"Adobe",)}


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """The same JPEG without metadata segments or bytes after its end, losslessly; ``data`` itself when there was
    nothing to remove; None when the segment structure cannot be followed (the caller re-encodes)."""
    if data[:2] != b"\xff\xd8":
        return None
    out, i, n, removed = [data[:2]], 2, len(data), False
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # end of image: anything after it (trailers, appended files) goes too
            out.append(data[i:i + 2])
            removed |= i + 2 < n
            return b"".join(out) if removed else data
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            out.append(data[i:i + 2])
            i += 2
            continue
        if i + 4 > n:
            return None
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if end > n or end < i + 4:
            return None
        segment = data[i:end]
        metadata = marker == 0xFE or (0xE0 <= marker <= 0xEF and not segment[4:].startswith(_JPEG_KEEP.get(marker, ())))
        if metadata:
            removed = True
        else:
            out.append(segment)
        i = end
        if marker == 0xDA:  # a scan: entropy-coded bytes up to the next marker that is not stuffing or a restart
            j = i
            while True:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    return None
                follower = data[j + 1]
                if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                    j += 2
                elif follower == 0xFF:
                    j += 1
                else:
                    break
            out.append(data[i:j])
            i = j
    return None  # no end-of-image marker


class PixelProblem(ValueError):
    """Pixels that cannot become an image (not one finite value): carries the rejection reason and its detail."""

    def __init__(self, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # La / RGBa: alpha premultiplied
_ROWS_PER_BLOCK = 1024  # greyscale scaling in row blocks: a float copy of a whole 89-Mpx image would be ~700 MB


def to_rgb(img: Image.Image, flags: list[str] | None = None) -> Image.Image:
    """RGB for any mode: transparency flattened onto white (black would read as content), 16/32-bit integer and
    float greyscale (TIFF ``I;16B``, ``I``, ``F``...) scaled from its actual range. NaN and infinite pixels
    (float images) are set to the ends of the finite range and flagged ``nonfinite_pixels`` in ``flags``; an
    image without one finite pixel raises PixelProblem. A mode Pillow cannot convert raises ValueError."""
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;"):
        return Image.fromarray(_grey_to_8bit(np.asarray(img), flags), "L").convert("RGB")
    return img.convert("RGB")


def _grey_to_8bit(arr: np.ndarray, flags: list[str] | None) -> np.ndarray:
    """Wide greyscale (any byte order) -> uint8, its finite range stretched to 0..255 (a plain convert clips
    16-bit values to 255 and turns NaN into black)."""
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        bad = int(arr.size - np.count_nonzero(finite))
        if bad == arr.size:
            raise PixelProblem("no_finite_pixels", pixels=arr.size)
        if bad:
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
            arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
            if flags is not None:
                flags.append("nonfinite_pixels")
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.empty(arr.shape, np.uint8)
    for start in range(0, arr.shape[0], _ROWS_PER_BLOCK):
        block = arr[start:start + _ROWS_PER_BLOCK].astype(np.float64)
        out[start:start + _ROWS_PER_BLOCK] = np.clip(np.rint((block - lo) * scale), 0, 255)
    return out


def thumbnail_jpeg(image: bytes, side: int, quality: int = 85) -> bytes:
    """A JPEG of at most ``side`` px on its longer side (raises on bytes that are not an image)."""
    with Image.open(io.BytesIO(image)) as im:
        im = to_rgb(im)
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
