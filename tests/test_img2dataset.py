"""A real img2dataset output is read as is, captions and metadata included.

img2dataset (in its own virtualenv, .venv-img2dataset: it pins webdataset<0.3 and pandas<3) downloads real photos
from an HTTP server on 127.0.0.1, plus one URL that 404s and one that serves bytes that are not an image, and
writes webdataset shards with its .parquet and _stats.json beside each tar. The project's reader then reads every
tar, and what it read is checked against img2dataset's own records. Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from m3t_gen.config import InputSpec, ReadSpec
from m3t_gen.storage.sources import parse_meta, read_webdataset
from m3t_gen.stages.read import read_shard

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-img2dataset"
SETUP = ROOT / "scripts" / "setup_img2dataset.sh"
CLI = VENV / "bin" / "img2dataset"

SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
SKLEARN_PHOTOS = ["china", "flower"]  # load_sample_images, in this order
# Non-ASCII, commas and quotes: the caption must come through byte for byte.
CAPTION = 'a photo of {name}, "café" ☕ — 写真'


@pytest.fixture(scope="module")
def img2dataset_cli() -> Path:
    """The img2dataset CLI from .venv-img2dataset, made by scripts/setup_img2dataset.sh when missing."""
    if not (CLI.exists() and (VENV / ".installed").exists()):
        try:
            proc = subprocess.run(["bash", str(SETUP)], cwd=ROOT, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{VENV.name} is missing and {SETUP.name} timed out creating it")
        if proc.returncode != 0 or not CLI.exists():
            tail = (proc.stderr or proc.stdout)[-1500:]
            pytest.fail(f"{VENV.name} is missing and {SETUP.name} could not create it (rc {proc.returncode}; "
                        f"PyPI unreachable?):\n{tail}")
    return CLI


def _write_photos(folder: Path) -> dict[str, bytes]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = {name: getattr(data, name)() for name in SKIMAGE_PHOTOS}
    arrays.update(zip(SKLEARN_PHOTOS, load_sample_images().images))
    files = {}
    for name, array in arrays.items():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)  # camera stays greyscale, as served
        files[f"{name}.jpg"] = buf.getvalue()
    files["not_an_image.jpg"] = b"<html><body>this is not a picture</body></html>\n" * 20
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return files


class _Server:
    """http.server on 127.0.0.1 (free port) in a thread; records the paths asked for."""

    def __init__(self, folder: Path):
        requested: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                requested.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.requested = requested
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _offline_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        NO_ALBUMENTATIONS_UPDATE="1",  # albumentations asks PyPI for a newer version at import otherwise
        WANDB_MODE="disabled", WANDB_SILENT="true", WANDB_DIR=str(tmp),
        PYTHONWARNINGS="ignore",
    )
    env.pop("PYTHONPATH", None)
    return env


def test_img2dataset_output_is_read_as_is(img2dataset_cli, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    files = _write_photos(served)
    photos = [f"{n}.jpg" for n in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]

    with _Server(served) as server:
        captions = {f"{server.base}/{p}": CAPTION.format(name=p[:-4]) for p in photos}
        bad = {f"{server.base}/missing.jpg": "a photo that is not there",
               f"{server.base}/not_an_image.jpg": "a page, not a photo"}
        all_captions = {**captions, **bad}
        urls = list(all_captions)
        url_list = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [all_captions[u] for u in urls],
                                 "license": [f"cc-by-{i}" for i in range(len(urls))]}), url_list)
        out = tmp_path / "i2d"
        cmd = [str(img2dataset_cli), "--url_list", str(url_list), "--input_format", "parquet",
               "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["license"]',
               "--output_format", "webdataset", "--output_folder", str(out),
               "--image_size", "256", "--resize_mode", "keep_ratio",
               "--processes_count", "1", "--thread_count", "2", "--number_sample_per_shard", "6",
               "--timeout", "10", "--retries", "0",
               "--enable_wandb", "False", "--distributor", "multiprocessing"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, f"img2dataset failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Every URL was asked for exactly once (retries 0), and nothing else.
    assert sorted(server.requested) == sorted("/" + u.rsplit("/", 1)[1] for u in urls)

    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 2, sorted(p.name for p in out.iterdir())  # 10 URLs, 6 per shard
    records, totals, read_total = [], {"count": 0, "successes": 0}, 0
    for tar in tars:
        stats = json.loads((out / f"{tar.stem}_stats.json").read_text())
        records_here = pq.read_table(out / f"{tar.stem}.parquet").to_pylist()
        records += records_here
        totals["count"] += stats["count"]
        totals["successes"] += stats["successes"]
        assert stats["count"] == len(records_here)

        rows = list(read_shard(str(tar), "s", InputSpec(format="webdataset", paths=[str(tar)]),
                               ReadSpec(min_side=64), None))
        marker, samples = rows[-1], rows[:-1]
        assert marker["status"] == "marker" and marker["reject_detail"] is None  # no damage to the tar
        assert marker["shard_rows"] == len(samples)
        ok = [r for r in samples if r["status"] == "ok"]
        rejected = [r for r in samples if r["status"] == "rejected"]
        assert len(ok) + len(rejected) == len(samples)  # rows read = ok + rejected
        assert not rejected, [(r["source_key"], r["reject_reason"], r["reject_detail"]) for r in rejected]
        # img2dataset's own count of what it wrote to this tar is what was read from it.
        assert len(samples) == stats["successes"]
        assert stats["successes"] == sum(r["status"] == "success" for r in records_here)
        read_total += len(samples)

        by_key = {r["source_key"]: r for r in samples}
        assert len(by_key) == len(samples)
        for rec in records_here:
            if rec["status"] != "success":
                assert rec["key"] not in by_key
                continue
            row = by_key[rec["key"]]
            assert row["url"] == rec["url"] and row["url"] in captions
            assert row["text"] == captions[row["url"]] == rec["caption"]
            assert row["flags"] == []
            # The bytes img2dataset downloaded are the ones served, and the image read from the tar decodes
            # at the size img2dataset recorded.
            assert rec["sha256"] == hashlib.sha256(files[row["url"].rsplit("/", 1)[1]]).hexdigest()
            img = Image.open(io.BytesIO(row["image"]))
            img.load()
            assert img.mode == "RGB" and img.size == (row["width"], row["height"]) == (rec["width"], rec["height"])
            assert min(img.size) == 256  # keep_ratio: the shorter side is resized to image_size
            # img2dataset's metadata rides along on the row (and into the output's source.meta).
            row_meta = json.loads(row["meta"])
            assert row_meta["license"] == rec["license"] and row_meta["original_width"] == rec["original_width"]

        # The metadata img2dataset wrote (json member) comes through the project's webdataset reader whole.
        errors: list[str] = []
        for raw in read_webdataset(str(tar), InputSpec(format="webdataset", paths=[str(tar)]), errors):
            flags: list[str] = []
            meta = parse_meta(raw["meta"], flags)
            rec = next(r for r in records_here if r["key"] == raw["source_key"])
            assert not flags and meta["key"] == rec["key"] and meta["license"] == rec["license"]
            assert meta["caption"] == rec["caption"] and meta["original_width"] == rec["original_width"]
        assert errors == []

    # Across shards: every photo was downloaded and read once; the two bad URLs failed in img2dataset and are
    # recorded in its parquet, not in any tar.
    assert totals == {"count": len(urls), "successes": len(photos)}
    assert read_total == len(photos)
    assert sorted(r["url"] for r in records if r["status"] == "success") == sorted(captions)
    failed = {r["url"]: r for r in records if r["status"] != "success"}
    assert sorted(failed) == sorted(bad)
    assert failed[f"{server.base}/missing.jpg"]["status"] == "failed_to_download"
    assert "404" in failed[f"{server.base}/missing.jpg"]["error_message"]
    assert failed[f"{server.base}/not_an_image.jpg"]["status"] == "failed_to_resize"
    assert failed[f"{server.base}/not_an_image.jpg"]["error_message"]
