"""Hard negatives (m3t_gen/run/negatives.py): the guard's decisions from recorded scores, the miner on planted data
(exact neighbours, a sample's own turns never its negatives, planted false negatives dropped with their reason),
and on the small-shard run: every kept turn carries guarded negatives, candidates = kept + dropped, refilter
re-decides without mining, and the `mmeb` export loads row by row the way VLM2Vec's and MuCo's loaders read it
(notes on their code: the comments of m3t_gen/tools/export.py's mmeb section)."""

from __future__ import annotations

import ast
import glob
import json
import os
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3t_gen.config import BandSpec, NegativeGuardSpec, NegativesSpec
from m3t_gen.run.negatives import (CANDIDATE_SCHEMA, IMAGE, Bank, ShardTurns, Texts, candidate_table, decide,
                                   mine_images, mine_text, same_answer, threshold)
from m3t_gen.turns import TURN_TYPE_NAMES

from conftest import assert_same_candidates, assert_same_turns, run_cli


def _table(rows):
    base = {"i": 0, "type": "classification", "text": "x", "source": "s", "source_i": 0, "similarity": 0.5,
            "rank": 1, "score": 0.1, "positive": 0.3, "same_text": False, "kept": False, "reason": None}
    return pa.Table.from_pylist([dict(base, **r) for r in rows], schema=CANDIDATE_SCHEMA)


def test_guard_decides_from_recorded_scores_each_drop_with_its_reason():
    t = _table([
        {"key": "a", "rank": 1, "text": "A Cat.", "same_text": True},             # the positive's own text
        {"key": "a", "rank": 2, "similarity": 0.99},                              # a paraphrase of it
        {"key": "a", "rank": 3, "score": 0.29},                                   # >= 0.95 x 0.3: false negative
        {"key": "a", "rank": 4, "score": 0.2},
        {"key": "a", "rank": 5, "score": 0.1},
        {"key": "a", "rank": 6, "score": 0.0},                                    # over per_turn (2)
        {"key": "b", "rank": 1, "positive": -0.2, "score": -0.195},               # above -0.21: dropped
        {"key": "b", "rank": 2, "positive": -0.2, "score": -0.25},
        {"key": "b", "i": None, "type": IMAGE, "rank": 1, "similarity": 0.97},   # a near-duplicate image
        {"key": "b", "i": None, "type": IMAGE, "rank": 2, "similarity": 0.9},
    ])
    out = decide(t, NegativeGuardSpec(per_turn=2, images_per_sample=1))
    assert out.column("reason").to_pylist() == ["same_text", "near_duplicate", "above_positive", None, None,
                                                "over_limit", "above_positive", None, "near_duplicate", None]
    assert out.column("kept").to_pylist() == [r is None for r in out.column("reason").to_pylist()]
    # Thresholds change, scores do not: a looser guard keeps the paraphrase and the close one.
    loose = decide(out, NegativeGuardSpec(per_turn=5, max_positive_ratio=1.0, max_text_similarity=1.0))
    assert loose.column("reason").to_pylist()[:6] == ["same_text", None, None, None, None, None]
    assert loose.column("score").equals(t.column("score"))
    assert threshold(np.array([0.3, -0.2]), 0.95).tolist() == pytest.approx([0.285, -0.21])
    assert same_answer("  A  Cat. ", "a cat")


# ------------------------------------------------------------------------------------------ planted, on Ray


def _unit(rng, d):
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def _shard(rng, keys, d, plant):
    """Each sample: one classification turn and two vqa_holistic turns (whose targets nearly coincide: a
    sample's own turns must never be its negatives)."""
    cls, vqa = TURN_TYPE_NAMES.index("classification"), TURN_TYPE_NAMES.index("vqa_holistic")
    sample, turn, kind, targets, embs = [], [], [], [], []
    for s, key in enumerate(keys):
        own = _unit(rng, d)
        for i, (code, emb, text) in enumerate(((cls, plant.get(key, (None, _unit(rng, d)))[1], f"label {key}"),
                                               (vqa, own, f"answer {key}"),
                                               (vqa, _unit(rng, d) * 0.01 + own, f"answer2 {key}"))):
            sample.append(s), turn.append(i), kind.append(code)
            targets.append(plant[key][0] if i == 0 and key in plant else text)
            embs.append(emb / np.linalg.norm(emb))
    images = np.stack([plant.get(f"img:{k}", _unit(rng, d)) for k in keys]).astype(np.float32)
    return ShardTurns(keys=Texts.of(keys), image_emb=images, caption_emb=images.copy(),
                      sample=np.array(sample, np.int32), turn=np.array(turn, np.int32), kind=np.array(kind, np.int8),
                      queries=Texts.of([f"q{n}" for n in range(len(sample))]), targets=Texts.of(targets),
                      target_emb=np.stack(embs).astype(np.float32), positive=np.full(len(sample), 0.3, np.float32))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_miner_finds_exact_neighbours_from_other_samples_and_the_guard_drops_planted_false_negatives(ray_local):
    ray = ray_local
    rng = np.random.default_rng(0)
    d = 32
    label = _unit(rng, d)
    dup_image = _unit(rng, d).astype(np.float32)
    plant = {"a0": ("a red bus", label), "b3": ("A red bus.", label),  # the same answer, another image
             "a1": ("a bus", label + 0.05 * _unit(rng, d)),            # a paraphrase
             "img:a2": dup_image, "img:b4": dup_image}                 # the same photo twice
    shards = [_shard(rng, [f"a{n}" for n in range(6)], d, plant), _shard(rng, [f"b{n}" for n in range(7)], d, plant)]
    bank = Bank([ray.put(s) for s in shards], np.stack([s.counts() for s in shards]))
    spec = NegativesSpec(candidates=3, text=BandSpec(max_rank=4), image=BandSpec(max_rank=3),
                         precision="fp32")
    vqa = TURN_TYPE_NAMES.index("vqa_holistic")
    found = mine_text(0, vqa, bank, spec, slack=2, use_gpu=False)
    me = shards[0]
    for r, src in zip(found["row"], found["source"]):
        assert src != me.keys[int(me.sample[r])]  # never a sample's own other turn, however close
    # Exact: each turn's candidates are its nearest vqa targets of other samples, in order (numpy, float64).
    all_rows = [(s, r) for s, sh in enumerate(shards) for r in sh.of_kind(vqa)]
    emb = np.stack([shards[s].target_emb[r] for s, r in all_rows]).astype(np.float64)
    owner = [shards[s].keys[int(shards[s].sample[r])] for s, r in all_rows]
    for n, r in enumerate(me.of_kind(vqa)):
        sims = emb @ emb[n]
        order = [m for m in np.argsort(-sims, kind="stable") if owner[m] != owner[n]][:3]
        got = [src for row, src in zip(found["row"], found["source"]) if row == r]
        assert got == [owner[m] for m in order]

    cls = TURN_TYPE_NAMES.index("classification")
    text = [mine_text(0, cls, bank, spec, slack=2, use_gpu=False)]
    images = mine_images(0, bank, spec, use_gpu=False)
    scores = [np.full(len(text[0]["row"]), 0.1, np.float32)]
    table = decide(candidate_table(me, text, scores, images), NegativesSpec().guard).to_pylist()
    planted = next(c for c in table if c["key"] == "a0" and c["source"] == "b3")
    assert (planted["reason"], planted["similarity"]) == ("same_text", pytest.approx(1.0))
    paraphrase = next(c for c in table if c["key"] == "a0" and c["source"] == "a1")
    assert paraphrase["reason"] == "near_duplicate" and paraphrase["text"] == "a bus"
    photo = next(c for c in table if c["key"] == "a2" and c["type"] == IMAGE and c["source"] == "b4")
    assert photo["reason"] == "near_duplicate" and photo["rank"] == 1
    assert all(c["reason"] is None or c["reason"] in ("same_text", "near_duplicate", "above_positive", "over_limit")
               for c in table)


# ------------------------------------------------------------------------------------------ the small-shard run


def _candidates(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "negatives").glob("*.parquet"))])


@pytest.mark.slow
def test_small_shard_run_carries_guarded_negatives_on_every_kept_turn(smoke_run):
    from m3t_gen.storage.store import iter_tar

    out, _ = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    guard = NegativeGuardSpec.model_validate(manifest["config"]["negatives"]["guard"])
    table = _candidates(out).to_pylist()
    assert table, "no candidate mined"
    by_turn: dict = {}
    for c in table:
        by_turn.setdefault((c["key"], c["i"]), []).append(c)
    turns = 0
    for tar in sorted((out / "shards").glob("*.tar")):
        for key, _, sample in iter_tar(tar):
            for t in sample["turns"]:
                turns += 1
                assert "negatives" in t
                kept = [c for c in by_turn.get((key, t["i"]), []) if c["kept"]]
                assert [n["text"] for n in t["negatives"]] == [c["text"] for c in kept]
                assert len(kept) <= guard.per_turn
                for c in kept:  # every kept negative is below the guard, another sample's, not the positive
                    assert c["score"] < threshold(np.array([t["score"]]), guard.max_positive_ratio)[0] + 1e-6
                    assert c["similarity"] <= guard.max_text_similarity and c["source"] != key
                    assert not same_answer(c["text"], t["target"])
            assert [n["source"] for n in sample["negative_images"]] == [
                c["source"] for c in by_turn.get((key, None), []) if c["kept"]]
    stats = [json.loads(p.read_text()) for p in sorted((out / "negatives_stats").glob("*.json"))]
    assert sum(s["candidates"] for s in stats) == len(table) == sum(s["kept"] + s["dropped"] for s in stats)
    assert sum(s["turns"] for s in stats) == turns == manifest["negatives"]["turns"]
    assert manifest["negatives"]["turns_with_negatives"] > 0
    assert all(c["reason"] for c in table if not c["kept"])


@pytest.mark.slow
def test_refilter_redecides_the_guard_without_mining_again(smoke_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(smoke_run[0], out)
    before = _candidates(out)
    proc = run_cli("refilter", str(out), "--set", "negatives.guard.max_positive_ratio=0.2",
                   "--set", "negatives.guard.per_turn=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _candidates(out)
    mined = [c for c in CANDIDATE_SCHEMA.names if c not in ("kept", "reason")]
    assert after.select(mined).equals(before.select(mined))  # the same candidates and scores: nothing re-mined
    assert sum(after.column("kept").to_pylist()) < sum(before.column("kept").to_pylist())
    guard = json.loads((smoke_run[0] / "manifest.json").read_text())["config"]["negatives"]["guard"]
    redecided = decide(before, NegativeGuardSpec(**dict(guard, max_positive_ratio=0.2, per_turn=1)))
    assert after.column("reason").to_pylist() == redecided.column("reason").to_pylist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["negatives"]["kept"] == sum(after.column("kept").to_pylist())


# ------------------------------------------------------------------------------------------ mmeb export


PHI3V, QWEN = "<|image_1|>", "<|image_pad|>"


def vlm2vec_rows(root, subset):
    """VLM2Vec (TIGER-AI-Lab/VLM2Vec src/data/dataset/mmeb_dataset.py, data_prepare_v4 at 6e1e1d4): the subset
    loaded by name with split "original", each row's texts token-swapped for a Qwen backbone (str.replace on
    qry, pos and a non-empty neg), one negative kept as a one-item list, paths joined to image_dir and opened
    by the collator (Image.open(...).convert("RGB")); rows with an empty query or positive skipped."""
    from datasets import load_dataset
    from PIL import Image

    # A cache of its own: datasets' cache is keyed by path, and pytest reuses temporary paths across sessions.
    ds = load_dataset(str(root), subset, split="original", cache_dir=str(root.parent / f"hf-cache-{subset}"))
    for row in ds:
        if (not row["qry"] and not row["qry_image_path"]) or (not row["pos_text"] and not row["pos_image_path"]):
            continue
        qry = row["qry"].replace(PHI3V, QWEN)
        pos = row["pos_text"].replace(PHI3V, QWEN)
        neg = row["neg_text"].replace(PHI3V, QWEN) if row["neg_text"] else ""
        negs = [neg] if neg else []
        images = {}
        for side in ("qry_image_path", "pos_image_path", "neg_image_path"):
            if row[side]:
                with Image.open(os.path.join(root, row[side])) as im:
                    images[side] = im.convert("RGB")
        for text, side in ((qry, "qry_image_path"), (pos, "pos_image_path")):
            assert (QWEN in text) == (side in images)  # Qwen processors refuse an image without its token
        yield qry, pos, negs, images


def muco_rows(root, rng):
    """MuCo (naver-ai/muco src/loader.py at 604da53, CustomDataset.__getitem__, single-query branch): every
    */*_generated_sentence.parquet through pandas; a str qry; qry_sentence / pos_sentence read; when neg_text is
    a column: an ndarray (else eval of a list literal), one index drawn with random.sample, the image path at
    min(index, len - 1), its image opened when the path is not empty; placeholders swapped."""
    import pandas as pd
    from PIL import Image

    files = sorted(glob.glob(os.path.join(root, "*/*_generated_sentence.parquet")))
    assert files
    for meta in (r for f in files for r in pd.read_parquet(f).to_dict("records")):
        assert isinstance(meta["qry"], str)
        query, pos = meta["qry"], meta["pos_text"]
        meta["qry_sentence"], meta["pos_sentence"]  # noqa: B018  (read by the loader: KeyError if absent)
        neg, neg_path = "", ""
        if "neg_text" in meta:
            negs = meta["neg_text"] if isinstance(meta["neg_text"], np.ndarray) else ast.literal_eval(meta["neg_text"])
            paths = (meta["neg_image_path"] if isinstance(meta["neg_image_path"], np.ndarray)
                     else ast.literal_eval(meta["neg_image_path"]))
            n = rng.sample(range(len(negs)), k=1)[0]  # ValueError on an empty list
            neg, neg_path = negs[n], paths[min(n, len(paths) - 1)]
        for path in (meta["qry_image_path"], meta["pos_image_path"], neg_path):
            if len(path) > 0:
                Image.open(os.path.join(root, path)).convert("RGB")
        yield query, pos, neg, meta


@pytest.mark.slow
def test_mmeb_export_loads_row_by_row_in_vlm2vec_and_muco_with_negatives(smoke_run, tmp_path):
    out, _ = smoke_run
    to = tmp_path / "mmeb"
    proc = run_cli("export", str(out), "--format", "mmeb", "--to", str(to))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from m3t_gen.storage.store import iter_tar

    samples = [s for tar in sorted((out / "shards").glob("*.tar")) for _, _, s in iter_tar(tar)]
    kept_turns = sum(len(s["turns"]) for s in samples)
    with_negs = sum(bool(t["negatives"]) for s in samples for t in s["turns"])
    turns = list(vlm2vec_rows(to, "M3T_turns"))
    assert len(turns) == kept_turns
    assert sum(bool(negs) for _, _, negs, _ in turns) == with_negs > 0
    t2i = list(vlm2vec_rows(to, "M3T_t2i"))
    assert len(t2i) == sum(t["type"] == "retrieval" for s in samples for t in s["turns"])
    assert any("neg_image_path" in images for *_, images in t2i)  # image negatives reach the trainer
    rng = random.Random(0)
    rows = list(muco_rows(to, rng))
    assert len(rows) == kept_turns + len(t2i)
    drawn = [neg for _, _, neg, _ in rows if neg]
    assert len(drawn) == with_negs + sum(bool(negs) for _, _, negs, _ in t2i)
    targets = {(s["key"], t["i"]): t for s in samples for t in s["turns"]}
    for query, pos, neg, meta in rows:  # a drawn text negative is never the row's own positive
        if neg and meta["turn_type"] != "t2i":
            assert not same_answer(neg, targets[(meta["key"], meta["i"])]["target"])


@pytest.mark.slow
def test_quality_report_card_and_inspect_show_the_negatives(smoke_run, tmp_path):
    out = smoke_run[0]
    report = json.loads((out / "manifest.json").read_text())["quality"]["negatives"]
    table = _candidates(out).to_pylist()
    assert set(report["types"]) == {c["type"] for c in table}
    for t, r in report["types"].items():
        rows = [c for c in table if c["type"] == t]
        assert (r["candidates"], r["kept"]) == (len(rows), sum(c["kept"] for c in rows))
        assert {why: d["count"] for why, d in r["dropped"].items()} == {
            why: sum(c["reason"] == why for c in rows) for why in {c["reason"] for c in rows if c["reason"]}}
        assert r["score"]["n"] == r["kept"]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert run_cli("card", str(copy)).returncode == 0
    card = (copy / "README.md").read_text()
    section = card[card.index("### Hard negatives"):]
    assert all(f"| {t.replace('_', '&#95;')} | {r['candidates']} | {r['kept']} |" in section
               for t, r in report["types"].items())
    assert (copy / "card" / "negatives.png").stat().st_size > 0
    proc = run_cli("inspect", str(out), "--html", str(tmp_path / "page.html"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "page.html").read_text()
    assert page.count('class="negatives"') == sum(
        bool(t["negatives"]) for _, _, s in _kept_samples(out)[:24] for t in s["turns"])


def _kept_samples(out):
    from m3t_gen.storage.store import iter_tar

    return [x for tar in sorted((out / "shards").glob("*.tar")) for x in iter_tar(tar)]


def test_plan_budgets_the_negatives_pass():
    from pathlib import Path

    from m3t_gen.config import load_config
    from m3t_gen.tools.plan import embedding_dim, make_plan

    cfg = load_config(Path(__file__).resolve().parents[1] / "pipelines" / "smoke.yaml")
    n, (d, _) = 1000, embedding_dim(cfg)
    plan = make_plan(cfg, n)
    neg = next(p for p in plan.stages if p.stage == "negatives")
    flops = 2 * n * n * d + sum(2 * (n * c) ** 2 * d for c in cfg.dialogue.mix.values())
    assert f"kNN FLOP = {flops:.3g}" in neg.notes and neg.wall_hours > 0
    without = make_plan(cfg.model_copy(update={"negatives": None}), n)
    assert "negatives" not in [p.stage for p in without.stages]
    assert plan.wall_hours == pytest.approx(without.wall_hours + neg.wall_hours)


@pytest.mark.slow
def test_a_rerun_writes_only_the_shard_whose_marker_is_missing_and_the_same_negatives(smoke_run, tmp_path):
    """Resume: a shard without its marker (a crash before it was written) is mined and written again, with the
    same candidates and the same KEY.json as before (exact search, no randomness); the others are left alone."""
    from pathlib import Path

    out = tmp_path / "out"
    shutil.copytree(smoke_run[0], out)
    markers = sorted((out / "negatives_stats").glob("*.json"))
    gone = markers[0].stem
    before = pq.read_table(out / "negatives" / f"{gone}.parquet")
    samples = {k: s for k, _, s in _kept_samples(out)}
    kept_mtime = {m.name: m.stat().st_mtime_ns for m in markers[1:]}
    markers[0].unlink()
    (out / "negatives" / f"{gone}.parquet").unlink()
    root = Path(__file__).resolve().parents[1]
    proc = run_cli("run", str(root / "pipelines" / "smoke.yaml"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(markers)} shard(s), 1 to write" in proc.stdout + proc.stderr
    assert_same_candidates(pq.read_table(out / "negatives" / f"{gone}.parquet"), before)
    again = {k: s for k, _, s in _kept_samples(out)}
    assert set(again) == set(samples)
    for key, sample in samples.items():
        assert_same_turns(again[key]["turns"], sample["turns"])
    assert {m.name: m.stat().st_mtime_ns for m in markers[1:]} == kept_mtime


def test_validate_refuses_mining_tasks_that_cannot_fit_the_local_ray(tmp_path):
    from conftest import one_line_exit_2, small_pipeline

    line = one_line_exit_2(["validate", small_pipeline(tmp_path, negatives__resources={"num_cpus": 2})],
                           "negatives.resources.num_cpus")
    assert "ray.num_cpus 2" in line
    one_line_exit_2(["validate", small_pipeline(tmp_path, cir__pairing={"resources": {"num_cpus": 3}})],
                    "cir.pairing.resources.num_cpus")
