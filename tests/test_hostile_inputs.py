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


def _read(path, fmt, timeout=60, **input_kw):
    """read_shard in a thread with a deadline: a reader that blocks (a named pipe) fails the test, not hangs it."""
    out: dict = {}

    def work():
        out["rows"] = list(read_shard(str(path), "s", InputSpec(format=fmt, paths=[str(path)], **input_kw),
                                      SPEC, None))

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
