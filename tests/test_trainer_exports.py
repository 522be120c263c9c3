"""Exports read the way the trainers' own loaders read them (MuCo's src/loader.py; CLIP4Cir's and SPRC's
src/data_utils.py CIRRDataset / FashionIQDataset in training mode), written from reading those loaders: the same
globs, paths, keys, types and the operations that would fail on a wrong file (indexing 7 slots, .tolist() on a
turn, str.replace on a target, PIL opening every image). Every exported row goes through them."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PHI3V_IMAGE = "<|image_1|>"
QWEN2_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3t_gen.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))


# ------------------------------------------------------------------------------------------------ MuCo


def muco_items(meta_folder: Path, image_folder: Path, pretraining: bool, rng: random.Random):
    """(query text, positive texts, query image) per row, as MuCo's CustomDataset builds them."""
    import pandas as pd

    files = sorted(glob.glob(os.path.join(meta_folder, "*/*_generated_sentence.parquet")))
    assert files, f"the loader's glob finds nothing under {meta_folder}"
    for meta in (r for f in files for r in pd.read_parquet(f).to_dict("records")):
        assert not isinstance(meta["qry"], str)  # the multi-turn branch
        if pretraining:
            order = list(range(len(meta["qry"])))
            rng.shuffle(order)
            query = [rng.choice(meta["qry"][i].tolist()) for i in order]
            pos = [meta["pos_text"][i] for i in order]
            [meta["pos_sentence"][i] for i in order], [meta["neg_text"][i] for i in order]  # indexed too
            query = [q.replace(PHI3V_IMAGE, QWEN2_VL_IMAGE) if n == 0 else q.replace(f"{PHI3V_IMAGE}\n", "")
                     for n, q in enumerate(query)]
            pos = [p.replace(PHI3V_IMAGE, QWEN2_VL_IMAGE) if n == 0 else p.replace(f"{PHI3V_IMAGE}\n", "")
                   for n, p in enumerate(pos)]
            query_text = "\n".join(query[k] for k in range(7))  # the 7-slot template: IndexError if fewer
            pos_texts = [pos[k] for k in range(7)]
        else:
            i = rng.randrange(len(meta["qry"]))
            phrasing = meta["qry"][i]
            query_text = (phrasing if isinstance(phrasing, str) else rng.choice(phrasing.tolist()))
            query_text = query_text.replace(PHI3V_IMAGE, QWEN2_VL_IMAGE)
            pos_texts = [meta["pos_text"][i].replace(PHI3V_IMAGE, QWEN2_VL_IMAGE)]
            assert isinstance(meta["pos_sentence"][i], str) and isinstance(meta["qry_sentence"], str)
            if meta["qry_sentence"] != "":  # the loader's generation target: "Image description: ..."
                query_text.replace(QWEN2_VL_IMAGE, f"Image description: {meta['qry_sentence']}")
        assert len(meta["qry_image_path"]) > 0 and meta["pos_image_path"] == ""  # image query, text target
        image = Image.open(os.path.join(image_folder, meta["qry_image_path"])).convert("RGB")
        yield query_text, pos_texts, image


@pytest.fixture(scope="module")
def complete_run(smoke_run, tmp_path_factory):
    """The smoke run re-decided with no turn threshold and the judge's verdicts ignored (`m3t-gen refilter`):
    every dialogue keeps its 7 turns."""
    out = tmp_path_factory.mktemp("complete") / "out"
    shutil.copytree(smoke_run[0], out)
    proc = _cli("refilter", out, "--set", "filter.min_turn_score=null", "--set", "filter.min_turns=1",
                "--set", "filter.drop_contradicted=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_muco_export_loads_in_both_modes_with_image_tokens(complete_run, smoke_run, tmp_path):
    from transformers import AutoProcessor

    from m3t_gen.models import resolve

    manifest = json.loads((complete_run / "manifest.json").read_text())
    to = tmp_path / "muco"
    proc = _cli("export", complete_run, "--format", "muco", "--to", to)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain/M3T/M3T_generated_sentence.parquet" in proc.stdout
    # The processor family the trainer collates with (Qwen2-VL): the swapped placeholder becomes image tokens.
    processor = AutoProcessor.from_pretrained(resolve("tiny:qwen2_5_vl"))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rng = random.Random(0)
    for mode in ("pretrain", "finetune"):
        items = list(muco_items(to / mode, to / "images", mode == "pretrain", rng))
        assert len(items) == manifest["totals"]["kept"], mode  # every dialogue complete after the refilter
        for query_text, pos_texts, image in items:
            assert query_text.count(QWEN2_VL_IMAGE) == 1 and PHI3V_IMAGE not in query_text
            assert all(isinstance(p, str) and p for p in pos_texts)
            batch = processor(text=[query_text], images=[image], return_tensors="pt")
            n = int((batch["input_ids"] == pad).sum())
            assert n == int(batch["image_grid_thw"][0].prod()) // 4 > 0
    # The pretraining file keeps MuCo's slot order.
    import pandas as pd

    pre = pd.read_parquet(to / "pretrain" / "M3T" / "M3T_generated_sentence.parquet")
    assert all(list(t) == ["classification", "vqa_holistic", "vqa_holistic", "vqa_localized", "vqa_localized",
                           "vqa_creative", "retrieval"] for t in pre["turn_types"])
    retrieval = pre["pos_text"].map(lambda p: p[6])
    assert (retrieval == pre["qry_sentence"]).all()  # the retrieval target is the dense caption

    # The smoke run as filtered: dialogues with dropped turns go to fine-tuning only, and the count says so.
    partial = tmp_path / "muco-partial"
    proc = _cli("export", smoke_run[0], "--format", "muco", "--to", partial)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = json.loads((smoke_run[0] / "manifest.json").read_text())["totals"]["kept"]
    n_pre = len(list(muco_items(partial / "pretrain", partial / "images", True, rng)))
    n_fine = len(list(muco_items(partial / "finetune", partial / "images", False, rng)))
    assert n_fine == kept and n_pre < kept
    assert f"left out {kept - n_pre:>5}  pretrain: kept turns are not the 7-slot mix" in proc.stdout


# ------------------------------------------------------------------------------------------------ CIR


def test_cirr_export_reads_as_cirr_dataset_trains(smoke_run, tmp_path):
    out = smoke_run[0]
    triplets = [json.loads(line) for p in sorted((out / "triplets").glob("*.jsonl")) for line in p.read_text().splitlines()]
    base = tmp_path / "cirr_dataset"
    proc = _cli("export", out, "--format", "cirr", "--to", base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # CIRRDataset('train', 'relative'): captions + name -> relative path, both under base_path/'cirr_dataset'.
    records = json.loads((base / "cirr" / "captions" / "cap.rc2.train.json").read_text())
    name_to_relpath = json.loads((base / "cirr" / "image_splits" / "split.rc2.train.json").read_text())
    assert isinstance(records, list) and isinstance(name_to_relpath, dict)
    assert len(records) == sum(len(t["modifications"]) for t in triplets)  # one record per modification text
    for r in records:
        members = r["img_set"]["members"]
        ref, tgt, caption = r["reference"], r["target_hard"], r["caption"]
        assert isinstance(caption, str) and caption and isinstance(members, list) and ref in members
        for name in (ref, tgt):
            Image.open(base / name_to_relpath[name]).convert("RGB")
        assert isinstance(r["pairid"], int) and r["target_soft"] == {tgt: 1.0}
    for name, rel in name_to_relpath.items():  # classic mode iterates every image of the split
        Image.open(base / rel).load()


@pytest.mark.parametrize("ext", ["jpg", "png"])  # CLIP4Cir opens <name>.jpg, SPRC <name>.png
def test_fashioniq_export_reads_as_fashioniq_dataset_trains(smoke_run, tmp_path, ext):
    out = smoke_run[0]
    triplets = [json.loads(line) for p in sorted((out / "triplets").glob("*.jsonl")) for line in p.read_text().splitlines()]
    base = tmp_path / "fashionIQ_dataset"
    proc = _cli("export", out, "--format", "fashioniq", "--to", base, "--image-ext", ext, "--category", "toptee")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((base / "captions" / "cap.toptee.train.json").read_text())
    names = json.loads((base / "image_splits" / "split.toptee.train.json").read_text())
    assert all(isinstance(n, str) for n in names)
    assert len(records) == sum(len(t["modifications"]) // 2 for t in triplets)
    for r in records:
        caps = r["captions"]
        assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)  # cap1 and cap2 / cap2 and cap1
        for name in (r["candidate"], r["target"]):
            assert name in names
            image = Image.open(base / "images" / f"{name}.{ext}")
            assert image.format == {"jpg": "JPEG", "png": "PNG"}[ext]
            image.convert("RGB")
    odd = sum(1 for t in triplets if len(t["modifications"]) % 2 and len(t["modifications"]) > 1)
    if odd:
        assert f"left out {odd:>5}  odd modification text" in proc.stdout


def test_cir_exports_of_a_run_without_triplets_fail_in_one_line(tmp_path, smoke_run):
    m3t_only = tmp_path / "m3t-only"
    shutil.copytree(smoke_run[0], m3t_only, ignore=shutil.ignore_patterns("triplets"))
    for fmt in ("cirr", "fashioniq"):
        proc = _cli("export", m3t_only, "--format", fmt, "--to", tmp_path / fmt)
        assert proc.returncode == 2 and "no CIR triplets" in proc.stderr and "Traceback" not in proc.stderr
