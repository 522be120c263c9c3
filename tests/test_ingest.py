"""The read stage against a corpus of bad inputs built here, each kind named; plus parquet and folder sources."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from m3t_gen.config import DedupeSpec, InputSpec, ReadSpec
from m3t_gen.rows import MARKER
from m3t_gen.stages.dedupe import HashIndex
from m3t_gen.stages.read import read_shard

SPEC = ReadSpec(min_side=256, max_pixels=2_000_000, max_text_chars=50)
PHOTO = Image.fromarray(skdata.astronaut())  # 512x512 RGB


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.fromarray(skdata.coffee())  # 600 wide x 400 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    return _bytes(img, "JPEG", exif=exif.tobytes())


def _tar(members: list[tuple[str, bytes]], cut_at: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw[:cut_at] if cut_at else raw


GOOD = _bytes(PHOTO, "JPEG", quality=90)
gray16 = Image.fromarray((skdata.camera().astype(np.uint16) * 200))
# (member name, bytes, expected: "ok" or reason code, expected flags)
CORPUS = [
    ("good.jpg", GOOD, "ok", []),
    ("cmyk.jpg", _bytes(PHOTO.convert("CMYK"), "JPEG"), "ok", []),
    ("palette.png", _bytes(PHOTO.convert("P"), "PNG"), "ok", []),
    ("rgba.png", _bytes(PHOTO.convert("RGBA"), "PNG"), "ok", []),
    ("la.png", _bytes(PHOTO.convert("LA"), "PNG"), "ok", []),
    ("gray16.png", _bytes(gray16, "PNG"), "ok", []),
    ("exif.jpg", _exif_rotated(), "ok", []),
    ("webp.webp", _bytes(PHOTO, "WEBP"), "ok", []),
    ("truncated.jpg", GOOD[: len(GOOD) // 2], "truncated_image", []),
    ("zero.jpg", b"", "empty_file", []),
    ("notimage.jpg", b"<html>404 not found</html>", "not_an_image", []),
    ("small.jpg", _bytes(PHOTO.resize((100, 80)), "JPEG"), "too_small", []),
    ("bomb.png", _bytes(Image.new("RGB", (2000, 1500)), "PNG"), "too_many_pixels", []),
]


@pytest.fixture(scope="module")
def bad_tar(tmp_path_factory):
    members = []
    for name, data, _, _ in CORPUS:
        members.append((name, data))
    members += [
        ("badjson.jpg", GOOD), ("badjson.json", b"{not json"),
        ("nonutf8.jpg", GOOD), ("nonutf8.txt", "café".encode("latin-1")),
        ("longtext.jpg", GOOD), ("longtext.txt", b"word " * 100),
        ("textonly.txt", b"a caption without an image"),
        ("good.txt", b"repeated key, far from its first members"),  # good seen again later: duplicate key
        ("../evil.jpg", GOOD),
        ("twice.jpg", GOOD), ("twice.jpg", GOOD),
    ]
    path = tmp_path_factory.mktemp("bad") / "bad-000000.tar"
    path.write_bytes(_tar(members))
    return path


def _read(path, fmt="webdataset", spec=SPEC, **input_kw):
    rows = list(read_shard(str(path), "s", InputSpec(format=fmt, paths=[str(path)], **input_kw), spec, None))
    marker = rows.pop()
    assert marker["status"] == MARKER and marker["shard_rows"] == len(rows)
    first: dict = {}
    for r in rows:
        first.setdefault(r["source_key"], r)
    assert len(rows) == len(first) + sum(r["reject_reason"] == "duplicate_key" for r in rows)
    return first, marker


def test_bad_input_corpus_gives_expected_reasons(bad_tar):
    rows, marker = _read(bad_tar)
    for name, _, expected, _ in CORPUS:
        row = rows[name.split(".")[0]]
        got = row["status"] if row["status"] == "ok" else row["reject_reason"]
        assert got == expected, (name, row["reject_detail"])
    assert rows["badjson"]["flags"] == ["json_invalid"] and rows["badjson"]["status"] == "ok"
    assert rows["nonutf8"]["flags"] == ["text_not_utf8"] and "caf" in rows["nonutf8"]["text"]
    assert rows["longtext"]["flags"] == ["text_truncated"] and len(rows["longtext"]["text"]) == 50
    assert rows["textonly"]["reject_reason"] == "no_image"
    assert rows["../evil"]["reject_reason"] == "unsafe_name"
    assert rows["twice"]["reject_reason"] == "duplicate_member"
    # Read = kept + rejected for the shard; nothing vanished (the repeated key "good" is its own row).
    ok = [r for r in rows.values() if r["status"] == "ok"]
    rejected = [r for r in rows.values() if r["status"] == "rejected"]
    assert len(ok) + len(rejected) + 1 == marker["shard_rows"]
    assert all(r["reject_stage"] == "read" and r["image"] is None for r in rejected)


def test_duplicate_key_is_recorded(tmp_path):
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar([("a.jpg", GOOD), ("b.jpg", GOOD), ("a.txt", b"again")]))
    rows = list(read_shard(str(path), "s", InputSpec(paths=[str(path)]), SPEC, None))[:-1]
    assert [r["source_key"] for r in rows] == ["a", "b", "a"]
    assert rows[2]["reject_reason"] == "duplicate_key"
    assert json.loads(rows[2]["reject_detail"]) == {"first_index": 0}


def test_conversions_give_rgb_jpeg_and_orientation_applied(bad_tar):
    rows, _ = _read(bad_tar)
    for key in ("cmyk", "palette", "rgba", "la", "gray16", "exif", "webp"):
        img = Image.open(io.BytesIO(rows[key]["image"]))
        assert img.format == "JPEG" and img.mode == "RGB", key
        assert rows[key]["reencoded"]
    assert (rows["exif"]["width"], rows["exif"]["height"]) == (400, 600)  # rotated upright
    assert rows["rgba"]["image"] is not None
    # A JPEG that needs nothing keeps its original bytes (no needless re-encode).
    assert rows["good"]["image"] == GOOD and not rows["good"]["reencoded"]
    # 16-bit greyscale is scaled, not clipped to white.
    g = np.asarray(Image.open(io.BytesIO(rows["gray16"]["image"])))
    assert g.std() > 20


def test_tar_cut_off_mid_stream_keeps_what_was_read(tmp_path):
    raw = _tar([(f"{i:03d}.jpg", GOOD) for i in range(4)])
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    rows, marker = _read(path)
    assert marker["shard_rows"] == len(rows) >= 2
    assert "damaged tar" in json.loads(marker["reject_detail"])["errors"][0]
    assert rows["000"]["status"] == "ok"


def test_max_side_resizes():
    from m3t_gen.stages.read import prepare_image

    fields, reason, _ = prepare_image(GOOD, ReadSpec(min_side=64, max_side=128))
    assert reason is None and max(fields["width"], fields["height"]) == 128 and fields["reencoded"]


def test_parquet_with_bytes_and_with_paths(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(GOOD)
    t = pa.table({"image": [{"bytes": GOOD, "path": None}, {"bytes": b"junk", "path": None}],
                  "caption": ["an astronaut", "broken"], "url": ["http://x/a", "http://x/b"]})
    pq.write_table(t, tmp_path / "bytes.parquet")
    rows, _ = _read(tmp_path / "bytes.parquet", fmt="parquet")
    assert rows["000000000"]["status"] == "ok" and rows["000000000"]["text"] == "an astronaut"
    assert rows["000000000"]["url"] == "http://x/a"
    assert rows["000000001"]["reject_reason"] == "not_an_image"

    t2 = pa.table({"path": ["imgs/a.jpg", "imgs/missing.jpg"], "id": ["k1", "k2"], "caption": ["x", "y"]})
    pq.write_table(t2, tmp_path / "paths.parquet")
    rows, _ = _read(tmp_path / "paths.parquet", fmt="parquet",
                    columns={"image": None, "image_path": "path", "key": "id", "url": None})
    assert rows["k1"]["status"] == "ok"
    assert rows["k2"]["reject_reason"] == "image_unreadable"


def test_parquet_missing_column_is_a_shard_error(tmp_path):
    pq.write_table(pa.table({"img": [GOOD]}), tmp_path / "p.parquet")
    rows, marker = _read(tmp_path / "p.parquet", fmt="parquet")
    assert rows == {} and "lacks column" in json.loads(marker["reject_detail"])["errors"][0]


def test_folder_with_sidecars(tmp_path):
    (tmp_path / "a.jpg").write_bytes(GOOD)
    (tmp_path / "a.txt").write_text("sidecar caption")
    (tmp_path / "b.png").write_bytes(_bytes(PHOTO, "PNG"))
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    rows, _ = _read(tmp_path, fmt="folder")
    assert rows["a.jpg"]["text"] == "sidecar caption" and rows["a.jpg"]["status"] == "ok"
    assert rows["b.png"]["status"] == "ok"
    assert rows["notes.pdf"]["reject_reason"] == "unsupported_file"


def test_hash_index_exact_and_near_duplicates():
    idx = HashIndex(DedupeSpec(max_distance=4))
    idx.add("k0", "sha-a", "f0f0f0f0f0f0f0f0")
    assert idx.find("sha-a", "0000000000000000") == ("exact", "k0", 0)
    assert idx.find("sha-b", "f0f0f0f0f0f0f0f3") == ("perceptual", "k0", 2)  # 2 bits differ
    assert idx.find("sha-b", "0f0f0f0f0f0f0f0f") is None
    strict = HashIndex(DedupeSpec(exact=True, perceptual=False))
    strict.add("k0", "sha-a", "f0f0f0f0f0f0f0f0")
    assert strict.find("sha-b", "f0f0f0f0f0f0f0f0") is None


def test_near_duplicate_photo_is_caught_by_phash():
    from m3t_gen.stages.read import prepare_image

    a, _, _ = prepare_image(GOOD, SPEC)
    b, _, _ = prepare_image(_bytes(PHOTO.resize((500, 500)), "JPEG", quality=70), SPEC)
    c, _, _ = prepare_image(_bytes(Image.fromarray(skdata.rocket()), "JPEG"), SPEC)
    idx = HashIndex(DedupeSpec(max_distance=6))
    idx.add("a", a["source_sha256"], a["phash"])
    hit = idx.find(b["source_sha256"], b["phash"])
    assert hit is not None and hit[:2] == ("perceptual", "a")
    assert idx.find(c["source_sha256"], c["phash"]) is None


def test_remote_paths_through_fsspec(tmp_path):
    """A shard on an fsspec filesystem (memory:// here; s3://, gs://, https:// alike) reads like a local one."""
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/shards/remote-000000.tar", "wb") as fh:
        fh.write(_tar([("a.jpg", GOOD), ("a.txt", b"remote caption")]))
    rows = list(read_shard("memory://bucket/shards/remote-000000.tar", "r",
                           InputSpec(paths=["memory://bucket/shards/*.tar"]), SPEC, None))
    assert rows[0]["status"] == "ok" and rows[0]["text"] == "remote caption"
    assert rows[-1]["status"] == MARKER and rows[-1]["shard_rows"] == 1


def test_input_patterns_globs_braces_and_remote(tmp_path):
    import fsspec
    import yaml

    from m3t_gen.config import load_config
    from m3t_gen.storage.sources import expand_inputs

    for i in range(3):
        (tmp_path / f"part-{i:03d}.tar").write_bytes(_tar([("a.jpg", GOOD)]))
    fs = fsspec.filesystem("memory")
    with fs.open("/b/x-000.tar", "wb") as fh:
        fh.write(_tar([("a.jpg", GOOD)]))
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "pipelines" / "smoke.yaml").read_text())
    data["input"]["paths"] = [str(tmp_path / "part-{000..001}.tar"), "memory://b/*.tar"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    shards = expand_inputs(load_config(tmp_path / "p.yaml"))
    assert [s.shard for s in shards] == ["part-000", "part-001", "x-000"]
    assert shards[2].path.startswith("memory://") and shards[2].path.endswith("/b/x-000.tar")
    rows = list(read_shard(shards[2].path, "x", InputSpec(paths=["memory://b/*.tar"]), SPEC, None))
    assert rows[0]["status"] == "ok"
