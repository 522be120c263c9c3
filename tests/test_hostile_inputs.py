"""Inputs a hostile or careless user gives: every entry a reader meets is a kept sample, a rejected one with its
reason, or (entries without data of their own) a counted skip; nothing hangs, nothing is read from outside the
allowed roots, no metadata reaches the output. Every input here is built by the test."""

import io
import json
import os
import tarfile
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from m3t_gen.config import InputSpec, ReadSpec
from m3t_gen.rows import MARKER
from m3t_gen.stages.read import prepare_image, read_shard
from m3t_gen.storage.images import strip_jpeg_metadata

SPEC = ReadSpec(min_side=64, max_pixels=4_000_000)
PHOTO = Image.fromarray(skdata.astronaut()).resize((256, 256))


def _jpeg(img: Image.Image = PHOTO, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


GOOD = _jpeg()


def _read(path, fmt, timeout=60, spec=SPEC, **input_kw):
    """read_shard in a thread with a deadline: a reader that blocks (a named pipe) fails the test, not hangs it."""
    out: dict = {}

    def work():
        out["rows"] = list(read_shard(str(path), "s", InputSpec(format=fmt, paths=[str(path)], **input_kw),
                                      spec, None))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "reader blocked"
    rows = out["rows"]
    marker = rows.pop()
    assert marker["status"] == MARKER and marker["shard_rows"] == len(rows)  # read = kept + rejected
    return {r["source_key"]: r for r in rows}, json.loads(marker["reject_detail"] or "{}"), rows


def _outcome(row) -> str:
    return "ok" if row["status"] == "ok" else row["reject_reason"]


def _as_nobody(fn):
    """Run fn() in a forked child as uid 65534 (root reads any file; permission errors need an ordinary user);
    returns what fn returned (JSON-able)."""
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, run, report, exit without running pytest's teardown
        try:
            os.setgid(65534)
            os.setuid(65534)
            payload = json.dumps({"ok": fn()})
        except BaseException as e:  # noqa: BLE001
            payload = json.dumps({"error": repr(e)})
        os.write(w, payload.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        data = json.loads(fh.read() or '{"error": "child died"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data["error"]
    return data["ok"]


# ------------------------------------------------------------------------------------------------ folders


@pytest.fixture
def hostile_folder():
    """A folder input of every kind of entry. Under a world-readable temp dir so the unprivileged child can
    walk it."""
    root = tempfile.mkdtemp(prefix="m3t-hostile-")
    os.chmod(root, 0o755)
    shard = os.path.join(root, "shard")
    outside = os.path.join(root, "outside")
    os.makedirs(os.path.join(shard, "nested", "deeper"))
    os.makedirs(outside)
    with open(os.path.join(outside, "private.jpg"), "wb") as fh:
        fh.write(GOOD)
    files = {
        "good.jpg": GOOD, "good.txt": "café".encode("latin-1"),  # sidecar not UTF-8: repaired and flagged
        "nested/inner.jpg": GOOD, "nested/deeper/deep.png": _png(),
        "noext": GOOD,  # an image without an extension: not guessed, rejected with a reason
        "notes.pdf": b"%PDF-1.4",
        "orphan.txt": b"a caption whose image is missing",
        "locked.jpg": GOOD, "lockedcap.jpg": GOOD, "lockedcap.txt": b"cannot be read",
    }
    for name, data in files.items():
        with open(os.path.join(shard, name), "wb") as fh:
            fh.write(data)
    os.symlink("does-not-exist.jpg", os.path.join(shard, "broken.jpg"))
    os.symlink(os.path.join(outside, "private.jpg"), os.path.join(shard, "escape.jpg"))
    os.symlink("good.jpg", os.path.join(shard, "alias.jpg"))  # inside the folder: followed
    os.symlink("nested", os.path.join(shard, "dirlink"))  # a link to a folder: not descended (loops)
    os.symlink("loop.jpg", os.path.join(shard, "loop.jpg"))
    os.mkfifo(os.path.join(shard, "pipe.jpg"))
    os.makedirs(os.path.join(shard, "closed"))
    with open(os.path.join(shard, "closed", "hidden.jpg"), "wb") as fh:
        fh.write(GOOD)
    for dirpath, dirnames, filenames in os.walk(shard):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and not f.startswith("pipe"):
                os.chmod(p, 0o644)
    os.chmod(os.path.join(shard, "locked.jpg"), 0o000)
    os.chmod(os.path.join(shard, "lockedcap.txt"), 0o000)
    os.chmod(os.path.join(shard, "closed"), 0o000)
    yield shard
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    import shutil

    shutil.rmtree(root)


def _png() -> bytes:
    buf = io.BytesIO()
    PHOTO.save(buf, format="PNG")
    return buf.getvalue()


EXPECTED_FOLDER = {
    "good.jpg": "ok", "alias.jpg": "ok", "nested/inner.jpg": "ok", "nested/deeper/deep.png": "ok",
    "noext": "unsupported_file", "notes.pdf": "unsupported_file", "orphan.txt": "no_image",
    "broken.jpg": "broken_link", "escape.jpg": "path_outside_root", "dirlink": "not_a_regular_file",
    "loop.jpg": "broken_link", "pipe.jpg": "not_a_regular_file", "locked.jpg": "image_unreadable",
    "lockedcap.jpg": "ok", "closed": "unreadable_folder",
}


def test_folder_every_entry_is_kept_or_rejected_with_its_reason(hostile_folder):
    # Once as root first: every module the reader imports lazily (Pillow's plugins, imagehash) is loaded before
    # the unprivileged child runs, which may not be allowed to read the virtualenv (CI's clone is mode 700).
    _read(hostile_folder, "folder")

    def work():
        rows, detail, all_rows = _read(hostile_folder, "folder")
        return {k: [_outcome(r), r["flags"], r["text"]] for k, r in rows.items()}, len(all_rows)

    got, n = _as_nobody(work)
    assert {k: v[0] for k, v in got.items()} == EXPECTED_FOLDER
    assert n == len(EXPECTED_FOLDER)  # each entry once: sidecars belong to their image, nothing else is silent
    assert got["good.jpg"][1] == ["text_not_utf8"] and got["good.jpg"][2].startswith("caf")
    assert got["lockedcap.jpg"][1] == ["sidecar_unreadable"]  # the image is fine; its caption could not be read


def test_folder_symlink_outside_is_read_when_its_root_is_allowed(hostile_folder):
    outside = os.path.join(os.path.dirname(hostile_folder), "outside")
    rows, _, _ = _read(hostile_folder, "folder", allowed_roots=[outside])
    assert _outcome(rows["escape.jpg"]) == "ok"


# ------------------------------------------------------------------------------------------------ tars


def _member(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    if info.type != tarfile.REGTYPE:
        info.size = 0
        return info, None
    return info, data


def _tar(members, cut_at=None, end_block=True) -> bytes:
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for info, data in members:
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if end_block:
        tar.close()
        raw = buf.getvalue()
    else:
        raw = buf.getvalue()  # no end-of-archive blocks: what a writer killed between members leaves
    return raw[:cut_at] if cut_at else raw


def test_tar_links_devices_and_nameless_members_are_rejected_not_dropped(tmp_path):
    members = [
        _member("a.jpg", GOOD), _member("a.txt", b"fine"),
        _member("sym.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member("hard.jpg", type=tarfile.LNKTYPE, linkname="a.jpg"),
        _member("fifo.jpg", type=tarfile.FIFOTYPE),
        _member("dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        _member("sub", type=tarfile.DIRTYPE), _member("sub/b.jpg", GOOD),
        _member("c.jpg", GOOD), _member("c.txt", type=tarfile.SYMTYPE, linkname="/root/.ssh/id_rsa"),
        _member("README", b"no extension"),
        _member("__meta__.json", b"{}"),
    ]
    path = tmp_path / "links-000000.tar"
    path.write_bytes(_tar(members))
    rows, detail, all_rows = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {
        "a": "ok", "sym": "not_a_regular_file", "hard": "not_a_regular_file", "fifo": "not_a_regular_file",
        "dev": "not_a_regular_file", "sub/b": "ok", "c": "not_a_regular_file", "README": "unsupported_file"}
    assert json.loads(rows["sym"]["reject_detail"]) == {"member": "sym.jpg", "kind": "symbolic link",
                                                        "target": "/etc/passwd"}
    assert json.loads(rows["c"]["reject_detail"])["member"] == "c.txt"  # the sample whose caption is a link
    assert detail == {"skipped": {"tar folder member": 1, "webdataset metadata member": 1}}
    assert len(all_rows) == 8


def test_tar_member_cut_off_is_a_rejected_sample_with_its_key(tmp_path):
    raw = _tar([_member(f"{i:03d}.jpg", GOOD) for i in range(3)])
    start_of_last_data = 3 * 512 + 2 * (len(GOOD) + (-len(GOOD)) % 512)
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[: start_of_last_data + 700])
    rows, detail, _ = _read(path, "webdataset")
    assert [_outcome(rows[k]) for k in ("000", "001")] == ["ok", "ok"]
    assert _outcome(rows["002"]) == "damaged_member"
    assert json.loads(rows["002"]["reject_detail"])["member"] == "002.jpg"
    assert "damaged tar" in detail["errors"][0]


@pytest.mark.parametrize("how,message", [("header", "cut inside a member header"),
                                         ("boundary", "without an end-of-archive block")])
def test_tar_cut_where_no_key_is_known_is_a_shard_error(tmp_path, how, message):
    members = [_member(f"{i:03d}.jpg", GOOD) for i in range(3)]
    full = _tar(members, end_block=False)
    raw = full[: len(full) - len(GOOD) - (-len(GOOD)) % 512 - 300] if how == "header" else full
    path = tmp_path / f"{how}.tar"
    path.write_bytes(raw)
    rows, detail, _ = _read(path, "webdataset")
    assert all(_outcome(r) == "ok" for r in rows.values()) and len(rows) == (2 if how == "header" else 3)
    assert message in detail["errors"][0]


def test_tar_with_a_garbage_header_mid_way_is_a_shard_error_not_a_quiet_end(tmp_path):
    raw = bytearray(_tar([_member(f"{i:03d}.jpg", GOOD) for i in range(3)]))
    second = 512 + len(GOOD) + (-len(GOOD)) % 512
    raw[second:second + 100] = b"garbage!" * 12 + b"!!!!"  # name and mode fields: the checksum no longer holds
    path = tmp_path / "garbled.tar"
    path.write_bytes(bytes(raw))
    rows, detail, _ = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {"000": "ok"}
    assert detail["errors"] == [f"damaged tar: bad checksum at byte {second}: the rest cannot be followed"]


# ------------------------------------------------------------------------------------------------ parquet


def test_parquet_cells_of_the_wrong_type_reject_their_row_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(GOOD)
    pq.write_table(pa.table({"path": [1, 2], "caption": ["x", "y"]}), tmp_path / "ints.parquet")
    rows, detail, _ = _read(tmp_path / "ints.parquet", "parquet",
                            columns={"image": None, "image_path": "path", "url": None})
    assert [_outcome(r) for r in rows.values()] == ["bad_value", "bad_value"] and not detail
    assert json.loads(rows["000000000"]["reject_detail"]) == {"column": "path", "type": "int"}

    mixed = pa.table({"image": pa.array([GOOD, None, b"x"], pa.binary()), "caption": ["a", "b", "c"]})
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    rows, _, _ = _read(tmp_path / "mixed.parquet", "parquet", columns={"url": None})
    assert [_outcome(r) for r in rows.values()] == ["ok", "no_image", "not_an_image"]

    text = pa.table({"image": ["not bytes"], "caption": ["a"]})
    pq.write_table(text, tmp_path / "strings.parquet")
    rows, _, _ = _read(tmp_path / "strings.parquet", "parquet", columns={"url": None})
    assert _outcome(rows["000000000"]) == "bad_value"


def test_parquet_paths_are_confined_to_allowed_roots(tmp_path):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "a.jpg").write_bytes(GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jpg").write_bytes(GOOD)
    (data / "imgs" / "link.jpg").symlink_to(elsewhere / "b.jpg")  # inside by name, outside in fact
    refs = ["imgs/a.jpg", str(data / "imgs" / "a.jpg"), "../elsewhere/b.jpg", str(elsewhere / "b.jpg"),
            "/etc/passwd", "imgs/link.jpg"]
    pq.write_table(pa.table({"path": refs, "id": [f"k{i}" for i in range(len(refs))]}), data / "p.parquet")
    cols = {"image": None, "image_path": "path", "key": "id", "url": None, "text": None}
    rows, _, _ = _read(data / "p.parquet", "parquet", columns=cols)
    assert [_outcome(rows[f"k{i}"]) for i in range(len(refs))] == [
        "ok", "ok", "path_outside_root", "path_outside_root", "path_outside_root", "path_outside_root"]
    rows, _, _ = _read(data / "p.parquet", "parquet", columns=cols, allowed_roots=[str(elsewhere)])
    assert [_outcome(rows[f"k{i}"]) for i in range(len(refs))] == [
        "ok", "ok", "ok", "ok", "path_outside_root", "ok"]


def test_parquet_duplicate_keys_and_hf_path_structs(tmp_path):
    (tmp_path / "a.jpg").write_bytes(GOOD)
    t = pa.table({"image": [{"bytes": GOOD, "path": None}, {"bytes": None, "path": "a.jpg"},
                            {"bytes": GOOD, "path": None}],
                  "id": ["x", "y", "x"], "caption": ["1", "2", "3"]})
    pq.write_table(t, tmp_path / "d.parquet")
    _, _, rows = _read(tmp_path / "d.parquet", "parquet", columns={"key": "id", "url": None})
    assert [(r["source_key"], _outcome(r)) for r in rows] == [("x", "ok"), ("y", "ok"), ("x", "duplicate_key")]
    assert json.loads(rows[2]["reject_detail"]) == {"first_index": 0}


# ------------------------------------------------------------------------------------------------ images


def _exif_laden(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {2: (51.0, 30.0, 0.0), 4: (0.0, 7.0, 0.0)}  # GPS: latitude and longitude
    exif[0x9286] = b"ASCII\0\0\0" + b"private notes " * 4000  # user comment, ~56 KB
    base = _jpeg(exif=exif.tobytes(), comment=b"shot at home")
    # A big XMP packet (APP1 segments hold < 64 KB each) and bytes after the end of the image.
    xmp = b"http://ns.adobe.com/xap/1.0/\0" + b"<x:xmpmeta>" + b"A" * 60000 + b"</x:xmpmeta>"
    app1 = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    return base[:2] + app1 * 16 + base[2:] + b"TRAILER: appended data" * 100


def test_metadata_is_stripped_losslessly_from_kept_jpegs():
    raw = _exif_laden()
    assert len(raw) > 1_000_000
    flags: list[str] = []
    fields, reason, _ = prepare_image(raw, SPEC, flags)
    assert reason is None and flags == ["metadata_stripped"] and not fields["reencoded"]
    out = fields["image"]
    assert len(out) < len(GOOD) + 1000  # the megabyte of metadata is gone
    img = Image.open(io.BytesIO(out))
    assert not img.getexif() and "comment" not in img.info and b"xmpmeta" not in out and b"TRAILER" not in out
    # Lossless: the same pixels as the original decodes to.
    assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    assert fields["source_sha256"] != fields["image_sha256"]


def test_rotated_jpeg_is_upright_and_without_metadata():
    fields, reason, _ = prepare_image(_exif_laden(orientation=6), SPEC)
    assert reason is None and fields["reencoded"]
    img = Image.open(io.BytesIO(fields["image"]))
    assert not img.getexif() and "comment" not in img.info and len(fields["image"]) < 100_000


def test_progressive_and_icc_jpegs_strip_to_the_same_pixels():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    raw = _jpeg(progressive=True, icc_profile=icc, exif=exif.tobytes())
    stripped = strip_jpeg_metadata(raw)
    img = Image.open(io.BytesIO(stripped))
    assert img.info.get("icc_profile") == icc and not img.getexif()  # colour kept, camera data gone
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(raw))))
    assert strip_jpeg_metadata(GOOD) is GOOD  # nothing to remove: the bytes are kept as they are
    assert strip_jpeg_metadata(b"\xff\xd8\xff\xe1\x00") is None  # cannot follow: the caller re-encodes


@pytest.mark.parametrize("size,expected", [((2000, 10), "extreme_aspect_ratio"), ((10, 1500), "extreme_aspect_ratio"),
                                           ((1000, 100), "ok")])
def test_aspect_ratio_is_bounded_before_decoding(size, expected):
    fields, reason, detail = prepare_image(_jpeg(Image.new("RGB", size, (90, 120, 30))), SPEC)
    assert (reason or "ok") == expected
    if reason:
        assert detail["max_aspect_ratio"] == 20.0 and detail["ratio"] > 20


# ------------------------------------------------------------------------------------------------ issue 25


def _gradient(mode: str, size: int = 256) -> Image.Image:
    """An image of ``mode`` with real content (a gradient), built the way a camera or a scanner would store it."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float64) / (2 * size - 2)
    if mode in ("I;16", "I;16B"):
        arr = (ramp * 60000 + 1000).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombuffer(mode, (size, size), arr.tobytes(), "raw", mode, 0, 1)
    if mode == "I":
        return Image.fromarray((ramp * 2**30 - 2**29).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray((ramp * 1e-3).astype(np.float32), "F")
    rgb = Image.fromarray((np.stack([ramp, 1 - ramp, ramp * 0.5], -1) * 255).astype(np.uint8), "RGB")
    if mode in ("LA", "PA"):
        img = rgb.convert("L" if mode == "LA" else "P")
        img.putalpha(Image.fromarray((ramp * 255).astype(np.uint8), "L"))
        return img
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        return img
    return rgb.convert(mode)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"transparency": 0} if "transparency" in img.info and fmt == "PNG" else {}))
    return buf.getvalue()


ODD_MODES = [("I;16B", "TIFF"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("LA", "PNG"),
             ("LA", "TIFF"), ("PA", "TIFF"), ("CMYK", "TIFF"), ("CMYK", "JPEG"), ("P+transparency", "PNG"),
             ("1", "PNG"), ("YCbCr", "TIFF"), ("LAB", "TIFF")]


@pytest.mark.parametrize("mode,fmt", ODD_MODES, ids=[f"{m}-{f}" for m, f in ODD_MODES])
def test_every_image_mode_becomes_an_rgb_jpeg_with_its_content(mode, fmt):
    raw = _encoded(_gradient(mode), fmt)
    assert Image.open(io.BytesIO(raw)).mode == mode.split("+")[0]  # the odd mode is what the reader meets
    fields, reason, detail = prepare_image(raw, SPEC)
    assert reason is None, (reason, detail)
    out = np.asarray(Image.open(io.BytesIO(fields["image"])))
    assert out.shape == (256, 256, 3) and out.std() > 20  # the gradient survived (not black, not clipped white)


def test_a_conversion_that_fails_is_that_samples_reason_not_the_runs(tmp_path, monkeypatch):
    import m3t_gen.stages.read as read_mod

    def refuse(img, flags=None):
        raise ValueError("image has wrong mode")

    monkeypatch.setattr(read_mod, "to_rgb", refuse)
    path = tmp_path / "modes-000000.tar"
    path.write_bytes(_tar([_member("a.tif", _encoded(_gradient("I;16B"), "TIFF")), _member("b.jpg", GOOD)]))
    rows, _, _ = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {"a": "encode_error", "b": "ok"}
    assert json.loads(rows["a"]["reject_detail"])["mode"] == "I;16B"


def _pipeline_yaml(tmp_path, paths, **reward_bank):
    """The small-shard pipeline over ``paths`` (images from 64 px), ``reward.self_retrieval`` updated."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "smoke.yaml").read_text())
    data["input"] = {"format": "webdataset", "paths": [str(p) for p in paths]}
    data["read"]["min_side"] = 64
    data["reward"].setdefault("self_retrieval", {}).update(reward_bank)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    return pipeline


def _pipeline_config(tmp_path, paths, **reward_bank):
    from m3t_gen.config import load_config

    return load_config(_pipeline_yaml(tmp_path, paths, **reward_bank))


def test_distractor_bank_skips_what_it_cannot_use_and_says_when_nothing_is_left(tmp_path):
    from m3t_gen.config import ConfigError
    from m3t_gen.scoring.measures import pick_distractors, self_retrieval
    from m3t_gen.stages.reward import bank_images

    odd = tmp_path / "odd-000000.tar"  # what made the driver exit 1 before any stage (issue 25)
    odd.write_bytes(_tar([_member("a.tif", _encoded(_gradient("I;16B"), "TIFF")), _member("b.txt", b"no image"),
                          _member("c.jpg", b"<html>"), _member("d.jpg", GOOD)]))
    shas, images = bank_images(_pipeline_config(tmp_path, [odd]))
    assert len(images) == 2 and all(Image.open(io.BytesIO(b)).format == "JPEG" for b in images)

    bad = tmp_path / "bad-000000.tar"
    bad.write_bytes(_tar([_member("x.jpg", b"<html>"), _member("y.txt", b"caption only")]))
    with pytest.raises(ConfigError) as e:
        bank_images(_pipeline_config(tmp_path, [odd], bank=[str(bad)]))
    assert str(e.value).startswith("reward.self_retrieval.bank: no readable image in 1 input(s)")
    assert "\n" not in str(e.value) and "not_an_image" in str(e.value)
    with pytest.raises(ConfigError, match="reward.self_retrieval.bank: .* matches no file"):
        bank_images(_pipeline_config(tmp_path, [odd], bank=[str(tmp_path / "none-*.tar")]))
    # The run's own input with nothing readable: no error here (every sample is rejected at read, none reaches
    # the reward stage); an empty bank still scores (rank 1 among no distractor).
    shas, images = bank_images(_pipeline_config(tmp_path, [bad]))
    assert shas == [] and images == []
    emb = np.eye(4, dtype=np.float32)[:2]
    rank, prob = self_retrieval(emb, emb[0], pick_distractors(np.zeros((0, 0), np.float32), [], "x", 15, 0), 100.0)
    assert list(rank) == [1, 1] and prob[0] == 1.0


def test_a_side_longer_than_jpeg_allows_is_a_reason_or_downscaled():
    strip = _encoded(Image.new("1", (66_000, 400), 1), "PNG")  # 26 Mpx: under max_pixels
    spec = ReadSpec(min_side=64, max_aspect_ratio=None)
    fields, reason, detail = prepare_image(strip, spec)
    assert reason == "too_large_for_jpeg" and detail["max_jpeg_side"] == 65_535 and detail["width"] == 66_000
    fields, reason, _ = prepare_image(strip, spec.model_copy(update={"max_side": 4096}))
    assert reason is None and (fields["width"], fields["height"]) == (4096, 25)


def test_a_float_image_with_nan_and_inf_is_repaired_and_flagged_or_rejected():
    arr = np.add.outer(np.arange(256), np.arange(256)).astype(np.float32)
    arr[3, 5], arr[100, 7], arr[200, 200] = np.nan, np.inf, -np.inf
    flags: list[str] = []
    fields, reason, _ = prepare_image(_encoded(Image.fromarray(arr, "F"), "TIFF"), SPEC, flags)
    assert reason is None and flags == ["nonfinite_pixels"]
    out = np.asarray(Image.open(io.BytesIO(fields["image"])).convert("L")).astype(float)
    assert out.max() > 240 and out.min() < 15 and 100 < out.mean() < 155  # the ramp, not black
    fields, reason, detail = prepare_image(_encoded(Image.fromarray(np.full((256, 256), np.nan, np.float32), "F"),
                                                    "TIFF"), SPEC)
    assert reason == "no_finite_pixels" and detail == {"pixels": 256 * 256}


def test_two_images_under_one_key_and_unused_members_are_accounted(tmp_path):
    path = tmp_path / "two-000000.tar"
    path.write_bytes(_tar([_member("k.jpg", GOOD), _member("k.png", _png()), _member("k.txt", b"which one?"),
                           _member("m.jpg", GOOD), _member("m.cls", b"3"), _member("m.seg.png", _png())]))
    rows, detail, _ = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {"k": "extra_image", "m": "ok"}
    assert json.loads(rows["k"]["reject_detail"]) == {"member": "k.png", "image": "k.jpg"}
    assert detail == {"skipped": {"unused member (not an image, .txt or .json)": 2}}

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "k.jpg").write_bytes(GOOD)
    (folder / "k.png").write_bytes(_png())
    (folder / "k.txt").write_bytes(b"both")
    rows, _, all_rows = _read(folder, "folder")
    assert {k: (_outcome(r), r["text"]) for k, r in rows.items()} == {"k.jpg": ("ok", "both"), "k.png": ("ok", "both")}


def test_names_that_are_not_utf8_are_escaped_reversibly_and_written(tmp_path, smoke_yaml):
    """A latin-1 tar member, a file named with byte 0xFF, a shard whose own name has one: kept, flagged, written to
    the rows, index, rejects and stats as escaped text whose original bytes come back with name_bytes."""
    from m3t_gen.config import load_config
    from m3t_gen.rows import to_table
    from m3t_gen.run.pipeline import make_context
    from m3t_gen.run.writer import OutputWriter
    from m3t_gen.stages.filter import apply_filter
    from m3t_gen.storage.sources import escape_name, name_bytes

    assert name_bytes(escape_name(os.fsdecode(b"a\\x41\\\\b\xe9"))) == b"a\\x41\\\\b\xe9"  # escapes of escapes
    shard_dir = tmp_path / os.fsdecode(b"in-\xff")
    shard_dir.mkdir()
    path = shard_dir / os.fsdecode(b"caf\xe9-000000.tar")
    path.write_bytes(_tar([
        _member(os.fsdecode(b"caf\xe9.jpg"), GOOD), _member(os.fsdecode(b"caf\xe9.txt"), "café".encode("latin-1")),
        _member(os.fsdecode(b"lien\xe9.jpg"), type=tarfile.SYMTYPE, linkname=os.fsdecode(b"/tmp/\xff")),
        _member("ok.jpg", GOOD), _member("ok.json", b'{"url": "\\udcff"}'),  # a lone surrogate in JSON
    ]))
    rows, _, all_rows = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {
        "caf\\xe9": "ok", "lien\\xe9": "not_a_regular_file", "ok": "ok"}
    assert name_bytes("caf\\xe9") == b"caf\xe9" and rows["caf\\xe9"]["flags"] == ["name_not_utf8", "text_not_utf8"]
    assert json.loads(rows["lien\\xe9"]["reject_detail"])["target"] == "/tmp/\\xff"
    assert rows["ok"]["flags"] == ["json_invalid"] and rows["ok"]["meta"] is None
    to_table(all_rows)  # what the read stage hands Ray: UnicodeEncodeError before the fix

    folder = shard_dir / "folder"
    folder.mkdir()
    (folder / os.fsdecode(b"\xff.jpg")).write_bytes(GOOD)
    (folder / os.fsdecode(b"\xff.pdf")).write_bytes(b"%PDF")
    frows, _, _ = _read(folder, "folder")
    assert {k: _outcome(r) for k, r in frows.items()} == {"\\xff.jpg": "ok", "\\xff.pdf": "unsupported_file"}

    ctx = make_context(load_config(smoke_yaml))
    out = tmp_path / "out"
    writer = OutputWriter(out, ctx, {"s": str(path)})
    for row in all_rows:
        if row["status"] == "ok":  # as the filter would see it, without models
            row.update(caption="c", turns=[{"type": "vqa_holistic", "query": "q", "target": "t"}],
                       scores={"caption": 0.3, "turns": [0.4]}, caption_attempts=1, dialogue_attempts=1)
            apply_filter(row, ctx.config.filter.model_copy(update={"min_turns": 1, "min_turn_score": 0.0}))
    marker = {**all_rows[0], "key": "s__end", "status": MARKER, "shard_rows": len(all_rows), "reject_detail": None}
    writer.consume(all_rows + [marker])
    stats = json.loads((out / "stats" / "s.json").read_text())
    assert stats["read"] == 3 == stats["kept"] + stats["rejected"] and stats["source"] == escape_name(str(path))
    index = pq.read_table(out / "index" / "s.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects" / "s.parquet").to_pylist()
    assert {r["source_key"] for r in index} == {"caf\\xe9", "ok"} and rejects[0]["source_key"] == "lien\\xe9"
    assert name_bytes(index[0]["source_shard"]) == os.fsencode(str(path))


def test_shards_with_the_same_non_utf8_name_in_two_folders_get_distinct_ids(tmp_path, smoke_yaml):
    from m3t_gen.storage.sources import expand_inputs

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / os.fsdecode(b"x\xff-000000.tar")).write_bytes(_tar([_member("k.jpg", GOOD)]))
    shards = expand_inputs(_pipeline_config(tmp_path, [tmp_path / "*" / "*.tar"]))
    assert len({s.shard for s in shards}) == 2 and all(s.shard.isascii() for s in shards)


# Bombs: members that claim (sparse) or inflate to (gzip of zeros) far more than they hold.


def _sparse_member(name: str, claimed: int, data: bytes = b"x" * 10) -> bytes:
    """An old-GNU sparse member: ``data`` stored, ``claimed`` bytes long once its holes are filled with zeros."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[156:157] = tarfile.GNUTYPE_SPARSE

    def num(n: int) -> bytes:
        return tarfile.itn(n, 12, tarfile.GNU_FORMAT)  # octal, or base-256 past 8 GiB

    buf[386:398], buf[398:410] = num(claimed - len(data)), num(len(data))  # one data run, at the end
    buf[483:495] = num(claimed)  # the real size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf) + data + b"\0" * (-len(data) % 512)


def _gzip_of_zeros_tar(headers: list[tuple[str, bytes, int]], tail: list[tuple[str, bytes]]) -> bytes:
    """A .tar.gz whose members are (name, tar type, size) of zeros, then small real members: ~1 MB per GiB."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out, zero = [], bytes(1 << 20)
    for name, kind, size in headers:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, size
        out.append(z.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(size >> 20):
            out.append(z.compress(zero))
        out.append(z.compress(bytes(size % (1 << 20) + (-size % 512))))
    out.append(z.compress(_tar([_member(name, data) for name, data in tail])))
    return b"".join(out) + z.flush()


_BOMB_CHILD = """
import io, json, resource, sys, time
from PIL import Image
from m3t_gen.config import InputSpec, ReadSpec
from m3t_gen.stages.read import prepare_image, read_shard
path, fmt = sys.argv[1], sys.argv[2]
spec = ReadSpec(min_side=64)
buf = io.BytesIO()
Image.new("RGB", (64, 64)).save(buf, format="JPEG")
prepare_image(buf.getvalue(), spec)  # imports and plugins loaded before the baseline, not the shard itself
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
rows = list(read_shard(path, "s", InputSpec(format=fmt, paths=[path]), spec, None))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - t, "rss_growth": peak - before,
                  "rows": [[r["source_key"], r["status"], r["reject_reason"], r["reject_detail"]] for r in rows[:-1]],
                  "shard_rows": rows[-1]["shard_rows"], "detail": json.loads(rows[-1]["reject_detail"] or "{}")}))
"""


def _read_in_child(path, fmt: str = "webdataset") -> dict:
    """Read a shard in a fresh interpreter: its peak RSS growth and time are the reader's alone."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(path), fmt], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shard_rows"] == len(out["rows"])  # read = kept + rejected
    return out


def test_a_sparse_member_claiming_gigabytes_is_rejected_unread(tmp_path):
    path = tmp_path / "sparse-000000.tar"
    path.write_bytes(_sparse_member("big.jpg", 1 << 30) + _sparse_member("huge.jpg", 64 << 30)
                     + _tar([_member("ok.jpg", GOOD)]))
    assert path.stat().st_size < 64_000  # KBs claiming 65 GiB
    out = _read_in_child(path)
    assert [r[:3] for r in out["rows"]] == [["big", "rejected", "member_too_large"],
                                            ["huge", "rejected", "member_too_large"], ["ok", "ok", None]]
    assert json.loads(out["rows"][1][3]) == {"member": "huge.jpg", "bytes": 64 << 30, "max_member_bytes": 64 << 20}
    assert out["rss_growth"] < 100 << 20 and out["seconds"] < 30, out  # 2.1 GB and 71 s before; MemoryError


def test_a_gzip_bomb_is_rejected_while_streaming_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb-000000.tar.gz"
    path.write_bytes(_gzip_of_zeros_tar([("zeros.jpg", tarfile.REGTYPE, 256 << 20)], [("ok.jpg", GOOD)]))
    assert path.stat().st_size < 2 << 20
    out = _read_in_child(path)
    assert [r[:3] for r in out["rows"]] == [["zeros", "rejected", "member_too_large"], ["ok", "ok", None]]
    assert out["rss_growth"] < 100 << 20 and out["seconds"] < 60, out
    # A long-name header tarfile would read whole into memory before any member: the tar cannot be followed.
    path = tmp_path / "longname-000000.tar.gz"
    path.write_bytes(_gzip_of_zeros_tar([("././@LongLink", tarfile.GNUTYPE_LONGNAME, 256 << 20)], [("ok.jpg", GOOD)]))
    out = _read_in_child(path)
    assert out["rows"] == [] and "extended header" in out["detail"]["errors"][0]
    assert out["rss_growth"] < 100 << 20, out


@pytest.mark.parametrize("ext", ["gz", "xz"])
def test_a_cut_compressed_tar_keeps_the_members_before_the_cut(tmp_path, ext):
    import gzip
    import lzma

    compress = {"gz": gzip.compress, "xz": lzma.compress}[ext]
    raw = _tar([_member(f"{i}.jpg", GOOD + os.urandom(20_000)) for i in range(4)])  # random tails: no dedup
    path = tmp_path / f"cut-000000.tar.{ext}"
    whole = compress(raw)
    path.write_bytes(whole)
    rows, detail, _ = _read(path, "webdataset")
    assert [_outcome(r) for r in rows.values()] == ["ok"] * 4 and not detail
    path.write_bytes(whole[: int(len(whole) * 0.7)])
    rows, detail, _ = _read(path, "webdataset")
    assert {k: _outcome(r) for k, r in rows.items()} == {"0": "ok", "1": "ok", "2": "damaged_member"}
    assert detail["errors"][0].startswith("damaged tar: EOFError")


def test_member_and_sample_budgets_in_every_format(tmp_path):
    spec = SPEC.model_copy(update={"max_member_bytes": 200_000, "max_sample_bytes": 300_000})
    big = b"x" * 250_000
    path = tmp_path / "budget-000000.tar"
    path.write_bytes(_tar([_member("a.jpg", GOOD), _member("a.txt", big),
                           _member("b.jpg", GOOD), _member("b.txt", b"y" * 150_000), _member("b.json", b" " * 150_000),
                           _member("c.jpg", GOOD)]))
    rows, _, _ = _read(path, "webdataset", spec=spec)
    assert {k: _outcome(r) for k, r in rows.items()} == {"a": "member_too_large", "b": "sample_too_large", "c": "ok"}
    assert json.loads(rows["b"]["reject_detail"])["member"] == "b.json"

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in {"big.jpg": big, "cap.jpg": GOOD, "cap.txt": big, "ok.jpg": GOOD}.items():
        (folder / name).write_bytes(data)
    rows, _, _ = _read(folder, "folder", spec=spec)
    assert {k: _outcome(r) for k, r in rows.items()} == {"big.jpg": "member_too_large", "cap.jpg": "member_too_large",
                                                         "ok.jpg": "ok"}

    pq.write_table(pa.table({"image": [big, GOOD], "caption": ["a", "b"]}), tmp_path / "cells.parquet")
    (tmp_path / "big.jpg").write_bytes(big)
    pq.write_table(pa.table({"path": ["big.jpg"], "caption": ["a"]}), tmp_path / "paths.parquet")
    rows, _, _ = _read(tmp_path / "cells.parquet", "parquet", spec=spec, columns={"url": None})
    assert [_outcome(r) for r in rows.values()] == ["member_too_large", "ok"]
    rows, _, _ = _read(tmp_path / "paths.parquet", "parquet", spec=spec,
                       columns={"image": None, "image_path": "path", "url": None})
    assert [_outcome(r) for r in rows.values()] == ["member_too_large"]


# ------------------------------------------------------------------------------------------------ end to end


def _smoke_photos(n: int) -> list[bytes]:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "data" / "smoke"
    photos = []
    with tarfile.open(sorted(root.glob("*.tar"))[0]) as tar:
        for info in tar:
            if info.name.endswith(".jpg") and len(photos) < n:
                photos.append(tar.extractfile(info).read())
    return photos


@pytest.mark.slow
def test_hostile_shards_through_a_run_every_entry_accounted_and_visible(tmp_path):
    """`m3t-gen run` over tars with links, pipes, folders, nameless members, repairs, a cut member and a file
    that is no tar: read = kept + rejected in the manifest, every repair and shard error in the summary, the
    manifest, the card and the sample's own JSON."""
    import subprocess
    import sys
    from pathlib import Path

    import webdataset as wds
    import yaml

    photos = _smoke_photos(4)
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}
    with_exif = photos[0][:2] + b"\xff\xe1" + (len(b"Exif\0\0" + exif.tobytes()) + 2).to_bytes(2, "big") + \
        b"Exif\0\0" + exif.tobytes() + photos[0][2:]
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "hostile-000000.tar").write_bytes(_tar([
        _member("p0.jpg", with_exif), _member("p0.txt", "café".encode("latin-1")),
        _member("p1.jpg", photos[1]), _member("p1.json", b"{broken"),
        _member("dir", type=tarfile.DIRTYPE),
        _member("link.jpg", type=tarfile.SYMTYPE, linkname="/etc/shadow"),
        _member("pipe.jpg", type=tarfile.FIFOTYPE),
        _member("strip.jpg", _jpeg(Image.new("RGB", (3000, 60), (20, 80, 200)))),
        _member("noext", photos[2]),
    ]))
    cut = _tar([_member("q0.jpg", photos[2]), _member("q1.jpg", photos[3])])
    (shards / "cut-000000.tar").write_bytes(cut[: 512 * 2 + len(photos[2]) + (-len(photos[2])) % 512 + 900])
    (shards / "fake-000000.tar").write_bytes(b"<html>this download failed</html>")
    expected_read = 6 + 2 + 0  # p0 p1 link pipe strip noext; q0 q1; no sample in a file that is no tar

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "smoke.yaml").read_text())
    data.update(recipe="m3t")
    data.pop("cir")
    data.pop("judge")  # the readers are under test
    data["input"]["paths"] = [str(shards / "*.tar")]
    data["caption"]["model"] = {"backend": "transformers", "model": "tiny:vlm"}
    data["dialogue"]["model"] = {"backend": "transformers", "model": "tiny:lm"}
    data["dialogue"]["sampling"]["max_tokens"] = 400
    data["filter"] = {"min_turn_score": -1.0, "min_turns": 1}
    pipeline = tmp_path / "hostile.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "m3t_gen.cli"]
    proc = subprocess.run(cli + ["run", str(pipeline), "--output", str(out)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["read"] == expected_read == t["kept"] + t["rejected"]
    for reason in ("read:not_a_regular_file", "read:extreme_aspect_ratio", "read:unsupported_file",
                   "read:damaged_member"):
        assert t["reasons"].get(reason), (reason, t["reasons"])
    assert t["reasons"]["read:not_a_regular_file"] == 2
    assert {"text_not_utf8", "json_invalid", "metadata_stripped"} <= set(t["repairs"])
    assert t["skipped_entries"] == {"tar folder member": 1}
    assert set(t["shard_errors"]) == {"cut-000000", "fake-000000"}
    for line in ("repaired", "text_not_utf8", "shard errors in 2 input shard(s)", "fake-000000: damaged tar"):
        assert line in proc.stdout, (line, proc.stdout)

    samples = {}
    for sub in ("shards", "filtered"):
        tars = sorted(str(p) for p in (out / sub).glob("*.tar"))
        for s in (wds.WebDataset(tars, shardshuffle=False) if tars else []):
            meta = json.loads(s["json"])
            samples[meta["source"]["key"]] = (meta, s["jpg"])
    assert samples["p0"][0]["flags"] == ["text_not_utf8", "metadata_stripped"]
    assert not Image.open(io.BytesIO(samples["p0"][1])).getexif()  # no camera or GPS data in the output
    assert samples["p1"][0]["flags"] == ["json_invalid"]

    card = subprocess.run(cli + ["card", str(out)], capture_output=True, text=True, timeout=300)
    assert card.returncode == 0, card.stderr[-2000:]
    from m3t_gen.tools.card import md

    text = (out / "README.md").read_text()
    assert f"| {md('text_not_utf8')} | 1 |" in text and f"| {md('fake-000000')} | damaged tar" in text


@pytest.mark.slow
def test_a_bank_without_a_readable_image_ends_the_run_with_one_line(tmp_path):
    """Starts Ray, no engine: the bank is read on the driver before any stage (issue 25: a traceback before)."""
    import subprocess
    import sys

    good = tmp_path / "in-000000.tar"
    good.write_bytes(_tar([_member("a.jpg", GOOD)]))
    bad = tmp_path / "bank-000000.tar"
    bad.write_bytes(_tar([_member("x.jpg", b"<html>"), _member("y.tif", _encoded(_gradient("I;16B"), "TIFF")[:200])]))
    pipeline = _pipeline_yaml(tmp_path, [good], bank=[str(bad)])
    proc = subprocess.run([sys.executable, "-m", "m3t_gen.cli", "run", str(pipeline), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if "reward.self_retrieval.bank: no readable image in 1 input(s)" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
