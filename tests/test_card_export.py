"""Dataset card, exports and the HTML inspector on a real finished run (the small-shard pipeline, built once)."""

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "m3t_gen.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run_out(smoke_run, tmp_path_factory):
    """A copy of the session's smoke run (the card and the page are written into it; the original stays as run)."""
    import shutil

    out = tmp_path_factory.mktemp("card") / "out"
    shutil.copytree(smoke_run[0], out)
    return out


@pytest.fixture(scope="module")
def manifest(run_out):
    return json.loads((run_out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def triplets(run_out):
    """The kept CIR triplets of the run (the smoke recipe is m3t+cir); [] for an M3T-only run."""
    from m3t_gen.tools.run_reader import iter_triplets

    return list(iter_triplets(run_out))


@pytest.fixture(scope="module")
def card(run_out):
    proc = _cli("card", run_out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = run_out / "README.md"
    assert f"wrote {path}" in proc.stdout
    return path


# ----------------------------------------------------------------------------------------- card
def test_card_parses_as_a_dataset_card_with_the_configs_entry(card, manifest, triplets):
    from huggingface_hub import DatasetCard

    from m3t_gen.tools.card import md

    parsed = DatasetCard.load(card)
    data = parsed.data.to_dict()
    assert data["configs"][0] == {"config_name": "default",
                                  "data_files": [{"split": "train", "path": "shards/*.tar"}]}
    if triplets:
        assert data["configs"][1] == {"config_name": "triplets",
                                      "data_files": [{"split": "train", "path": "triplet_shards/*.tar"}]}
    assert data["license"] == "other"  # the smoke config names none
    assert data["size_categories"] == ["n<1K"]
    assert "visual-question-answering" in data["task_categories"]
    assert data["pretty_name"] and "m3t-gen" in data["tags"]

    text = parsed.text
    for stage, short in manifest["templates"].items():
        assert short in text, stage
    assert "Write one dense, objective description of the image" in text  # the caption prompt's text
    for model in manifest["models"].values():
        assert f"`{model}`" in text
    for code, count in manifest["totals"]["reasons"].items():
        stage, reason = code.split(":", 1)
        assert f"| {md(stage)} | {md(reason)} | {count} |" in text, code
    assert f"| kept samples | {manifest['totals']['kept']} |" in text
    if triplets:
        assert f"| kept triplets | {len(triplets)} |" in text
        assert "composed-image-retrieval" in data["tags"]
    # The quality report, one row per turn type with its kept count from the manifest's report.
    assert "## Quality report" in text
    for t, r in manifest["quality"]["m3t"]["types"].items():
        assert re.search(rf"^\| {md(t)} \| [^|]+ \| [^|]+ \| {r['generated']} \| {r['kept']} \|", text, re.M), t
    if triplets:
        assert "### CIR modification texts" in text and f"in {len(triplets)} triplets" in text


@pytest.mark.parametrize("kept,label", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (54_321, "10K<n<100K"),
                                        (2_000_000, "1M<n<10M")])
def test_size_category(kept, label):
    from m3t_gen.tools.card import size_category

    assert size_category(kept) == label


def test_load_dataset_reads_the_shards_through_the_card(card, manifest, triplets, tmp_path):
    from datasets import load_dataset

    ds = load_dataset(str(card.parent), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == manifest["totals"]["kept"]
    assert {"jpg", "json"} <= set(ds.column_names)
    row = ds[0]
    assert row["jpg"].size[0] > 0 and row["json"]["turns"]
    if triplets:  # as the card says to load them
        files = str(card.parent / "triplets" / "*.jsonl")
        cir = load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
        assert cir.num_rows == len(triplets) == manifest["cir"]["kept"]
        assert cir[0]["modifications"][0]["text"]
        assert 'load_dataset("json", data_files=' in card.read_text()
        # ... and as the card's own second config, beside the default one.
        cfg = load_dataset(str(card.parent), "triplets", split="train", cache_dir=str(tmp_path / "hf"))
        assert cfg.num_rows == len(triplets)
        assert sorted(r["id"] for r in cfg["json"]) == sorted(t["id"] for t in triplets)


def test_card_of_a_cir_only_run_points_at_the_triplets(run_out, triplets, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from m3t_gen.tools.card import write_card

    if not triplets:
        pytest.skip("the smoke recipe wrote no CIR triplets")
    cir_only = tmp_path / "run"  # what a `recipe: cir` run leaves: the pool and triplets, no M3T shards
    shutil.copytree(run_out, cir_only, ignore=shutil.ignore_patterns("shards", "index", "filtered", "card",
                                                                       "README.md"))
    manifest = json.loads((cir_only / "manifest.json").read_text())
    manifest["recipe"] = manifest["config"]["recipe"] = "cir"
    (cir_only / "manifest.json").write_text(json.dumps(manifest))
    data = DatasetCard.load(write_card(cir_only)).data.to_dict()
    assert data["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "triplets/*.jsonl"}]}]
    assert data["task_categories"] == ["image-feature-extraction", "feature-extraction"]
    ds = load_dataset(str(cir_only), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(triplets)


def test_plots_and_gallery_exist_and_are_valid_images(card, manifest, triplets):
    text = card.read_text()
    pngs = re.findall(r"\]\((card/[^)]+\.png)\)", text)
    expected = {"card/scores.png", "card/turn_types.png", "card/image_sizes.png", "card/quality.png"}
    expected |= {"card/negatives.png"} if manifest.get("negatives") else set()
    assert set(pngs) == (expected | {"card/cir.png"} if triplets else expected)
    for rel in pngs:
        path = card.parent / rel
        assert path.is_file() and path.stat().st_size > 0, rel
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
            im.verify()
    thumbs = re.findall(r"\]\((card/example-\d+\.jpg)\)", text)
    assert len(thumbs) == min(6, manifest["totals"]["kept"])
    for rel in thumbs:
        with Image.open(card.parent / rel) as im:
            assert im.format == "JPEG" and max(im.size) <= 256


def test_card_escapes_untrusted_text(tmp_path):
    from m3t_gen.tools.card import write_card

    out = _evil_run(tmp_path)
    text = write_card(out).read_text()
    assert "<script" not in text and "<img" not in text and "](javascript" not in text
    assert "&lt;script&gt;" in text
    assert "&lt;script&gt;alert(5)&lt;/script&gt;" in text  # the triplet gallery


# ----------------------------------------------------------------------------------------- export
def test_mtcir_export_without_triplets_is_a_clear_error(run_out, tmp_path):
    from m3t_gen.tools.export import RunOutputError, export

    m3t_only = tmp_path / "run"  # the run as an M3T-only recipe leaves it: no triplets/
    shutil.copytree(run_out, m3t_only, ignore=shutil.ignore_patterns("triplets", "card", "README.md"))
    with pytest.raises(RunOutputError, match="this run has no CIR triplets; run a CIR recipe"):
        export(m3t_only, "mtcir", tmp_path / "cir")
    proc = _cli("export", m3t_only, "--format", "mtcir", "--to", tmp_path / "cir")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: this run has no CIR triplets; run a CIR recipe"
    assert not (tmp_path / "cir").exists()


def test_mtcir_export_of_the_run_s_triplets(run_out, triplets, tmp_path):
    if not triplets:
        pytest.skip("the smoke recipe wrote no CIR triplets")
    target = tmp_path / "cir" / "triplets.jsonl"  # --to FILE.jsonl: the file itself, images/ beside it
    proc = _cli("export", run_out, "--format", "mtcir", "--to", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == len(triplets)
    for line, t in zip(lines, triplets):
        assert set(line) == {"id", "image", "target_image", "modifications"}
        assert line["id"] == t["id"]
        assert line["image"] == f"images/{t['image']}.jpg" and line["target_image"] == f"images/{t['target_image']}.jpg"
        for rel in (line["image"], line["target_image"]):
            with Image.open(target.parent / rel) as im:
                assert im.format == "JPEG"
        assert line["modifications"] == [{"category": m["category"], "text": m["text"]} for m in t["modifications"]]
    assert not list(target.parent.rglob("*.tmp"))


def test_mtcir_export_reads_triplets_written_into_a_run(run_out, tmp_path):
    from m3t_gen.tools.export import export

    copy = tmp_path / "run"
    shutil.copytree(run_out, copy, ignore=shutil.ignore_patterns("triplets", "card", "README.md"))
    keys = pq.read_table(copy / "index").column("key").to_pylist()
    (copy / "triplets").mkdir()
    triplet = {"id": "t0", "image": keys[0], "target_image": keys[1],
               "modifications": [{"category": "color", "text": "make the sky red"}]}
    (copy / "triplets" / "part-0.jsonl").write_text(json.dumps(triplet) + "\n")
    result = export(copy, "mtcir", tmp_path / "cir")
    lines = [json.loads(line) for line in (tmp_path / "cir" / "train.jsonl").read_text().splitlines()]
    assert result["rows"] == 1 and lines == [{"id": "t0", "image": f"images/{keys[0]}.jpg",
                                              "target_image": f"images/{keys[1]}.jpg",
                                              "modifications": triplet["modifications"]}]
    assert (tmp_path / "cir" / lines[0]["image"]).is_file() and (tmp_path / "cir" / lines[0]["target_image"]).is_file()


def test_commands_on_a_folder_without_manifest_fail_with_one_line(tmp_path):
    for args in (["card", tmp_path], ["inspect", tmp_path, "--html", tmp_path / "x.html"],
                 ["export", tmp_path, "--format", "muco", "--to", tmp_path / "m"]):
        proc = _cli(*args, timeout=120)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "no manifest.json" in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------- HTML
@pytest.fixture(scope="module")
def html_page(run_out, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "inspect.html"
    proc = _cli("inspect", run_out, "--html", path, "--n", 24)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def test_html_is_self_contained(html_page, manifest, triplets):
    text = html_page.read_text()
    # Raw "<" only starts markup (all text is escaped): no attribute may point anywhere but at a data: URL.
    assert not re.search(r"""<[^>]*\s(?:src|href)\s*=\s*(?!["']?data:)""", text, re.I)
    assert "<link" not in text and "<script" not in text and "<iframe" not in text
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert "url(" not in style and "@import" not in style
    kept = min(24, manifest["totals"]["kept"])
    filtered = sum(n for code, n in manifest["totals"]["reasons"].items() if code.startswith("filter:"))
    shown_triplets = min(24, len(triplets))
    assert text.count('<img src="data:image/jpeg;base64,') == kept + min(24, filtered) + 2 * shown_triplets
    assert "Rejected by the filter" in text
    if triplets:
        assert f"CIR triplets ({shown_triplets} shown" in text
    assert 'class="dropped"' in text  # the smoke thresholds drop some turns in kept samples
    assert "judge: contradicted" in text  # a turn the judge's verdict dropped, with its reason
    assert re.search(r'<td class="why">(supported|contradicted|not_answerable) [1-5]/5: ', text)  # verdicts shown


def test_html_escapes_untrusted_text(tmp_path):
    from m3t_gen.tools.inspect_html import write_html

    text = write_html(_evil_run(tmp_path), tmp_path / "evil.html").read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and 'href="javascript' not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    assert "&lt;script&gt;alert(5)&lt;/script&gt;" in text and "<svg" not in text


def test_html_renders_in_headless_chromium(html_page, tmp_path):
    # scripts/setup.sh installs Debian's chromium: its absence is a broken setup, not a reason to skip.
    assert CHROMIUM.exists(), "/usr/bin/chromium is absent: run scripts/setup.sh (apt-get install -y chromium)"
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           html_page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-3000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size[0] == 1200
        assert ImageStat.Stat(im.convert("L")).var[0] > 200  # a blank page has variance 0
        # The photo thumbnails are the only saturated colour on the page.
        saturation = im.convert("HSV").getchannel("S").histogram()
        assert sum(saturation[60:]) / (im.size[0] * im.size[1]) > 0.01


# ----------------------------------------------------------------------------------------- helpers
def _evil_run(tmp_path: Path) -> Path:
    """A minimal finished run whose texts are hostile: one kept sample and one filtered one."""
    out = tmp_path / "evil"
    for sub in ("shards", "filtered"):
        (out / sub).mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    turn = {"type": "vqa_creative", "query": "<img src=x onerror=alert(2)>", "target": "[x](javascript:alert(3))",
            "score": 0.1, "i": 0}
    sample = {"key": "evil_0", "caption": "<script>alert(1)</script> | ** __ `", "turns": [turn],
              "dropped_turns": [dict(turn, i=1, reason="<b>bold</b>")],
              "scores": {"caption": 0.1, "mean_turn": 0.1, "min_turn": 0.1},
              "image": {"width": 64, "height": 48, "sha256": "0" * 64},
              "source": {"shard": "evil", "key": "0", "url": "javascript:alert(4)", "text": "<i>alt</i>"},
              "lineage": {}}
    rejected = dict(sample, key="evil_1", rejected={"stage": "filter", "reason": "<u>too_few</u>", "detail": None})
    for sub, s in (("shards", sample), ("filtered", rejected)):
        with tarfile.open(out / sub / "evil-0000.tar", "w") as tf:
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps(s).encode())):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (out / "triplets").mkdir()
    (out / "triplets" / "part-00000.jsonl").write_text(json.dumps({
        "id": "evil_0__evil_1", "image": "evil_0", "target_image": "evil_1",
        "modifications": [{"category": "<i>cat</i>", "text": "<script>alert(5)</script>", "score": 0.2}],
        "dropped_modifications": [{"category": "x", "text": "[y](javascript:z)", "score": 0.0, "reason": "<b>r</b>"}],
        "reference_caption": "<svg onload=alert(6)>", "similarity": 0.5, "rank": 1}) + "\n")
    (out / "manifest.json").write_text(json.dumps({
        "name": "<b>evil</b>", "recipe": "m3t", "config_hash": "x", "config": {"recipe": "m3t"},
        "templates": {}, "models": {"caption": "a`b|c"}, "totals": {"read": 2, "kept": 1, "rejected": 1,
                                                                  "reasons": {"filter:<u>too_few</u>": 1}}}))
    return out
