"""The small-shard pipeline end to end: Ray Data, a tiny Qwen2.5-VL captioner and a tiny LM writer in the real vLLM
engine (CPU build), tiny CLIP reward; then the output read back by the tools trainers use."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_summary_and_manifest(smoke_run):
    out, proc = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["read"] == 19
    assert totals["read"] == totals["kept"] + totals["rejected"]
    assert totals["kept"] > 0
    # The bundled shard holds one truncated JPEG and one thumbnail below min_side.
    assert totals["reasons"]["read:truncated_image"] == 1
    assert totals["reasons"]["read:too_small"] == 1
    assert totals["reasons"]["dedupe:duplicate"] == 1  # skimage ships chelsea twice (as "chelsea" and "cat")
    assert [s["stage"] for s in manifest["stages"]] == ["read", "dedupe", "caption", "embed", "dialogue", "reward",
                                                        "judge", "filter"]
    assert "total: read 19 = kept" in proc.stdout
    # Images reached the captioner: every caption request held the Qwen2.5-VL image placeholder tokens (the
    # bundled photos at max_side 512 are at least 4, at most 16 tokens in the tiny model's 112x112 px budget).
    caption = next(s for s in manifest["stages"] if s["stage"] == "caption")
    assert caption["requests"] >= caption["in"]
    assert 4 * caption["requests"] <= caption["image_tokens"] <= 16 * caption["requests"]
    assert caption["prompt_tokens"] > caption["image_tokens"]
    dialogue = next(s for s in manifest["stages"] if s["stage"] == "dialogue")
    assert dialogue["prompt_tokens"] > 0 and "image_tokens" not in dialogue  # a text-only writer
    assert "caption: " in proc.stdout and "image tokens" in proc.stdout
    assert manifest["config"]["caption"]["model"]["backend"] == "vllm"
    # The judge saw each image in the real vLLM engine: one verdict call and one answerability call per sample,
    # each with the Qwen2.5-VL image placeholder tokens.
    judge = next(s for s in manifest["stages"] if s["stage"] == "judge")
    assert manifest["config"]["judge"]["model"]["backend"] == "vllm"
    assert judge["requests"] >= 2 * judge["in"] and judge["image_tokens"] >= 4 * judge["requests"]
    assert judge["output_tokens"] > 0 and judge["in"] == judge["kept"] + judge["rejected"]


def test_every_kept_turn_and_triplet_is_judged_and_the_filter_acts_on_verdicts(smoke_run):
    out, _ = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    turns = [t for s in _samples(out) for t in s["turns"]]
    assert turns and all(t["verdict"] in ("supported", "contradicted", "not_answerable") for t in turns)
    assert all(1 <= t["judge_score"] <= 5 and isinstance(t["judge_reason"], str) for t in turns)
    # drop_contradicted is on: no kept turn is contradicted, the dropped ones say why.
    assert not [t for t in turns if t["verdict"] == "contradicted"]
    dropped = [t for s in _samples(out) for t in s.get("dropped_turns", [])]
    assert any(t["reason"].startswith("judge: contradicted") for t in dropped)
    # Answerability: VQA turns carry the judge's own answer and its agreement with the target; others do not.
    vqa = [t for t in turns if t["type"].startswith("vqa_")]
    assert vqa and all(isinstance(t["answer"], str) and 0 <= t["agreement"] <= 1 for t in vqa)
    assert all(t.get("answer") is None for t in turns if not t["type"].startswith("vqa_"))
    triplets = [json.loads(line) for p in sorted((out / "triplets").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert triplets and all(m["verdict"] != "contradicted" and 1 <= m["judge_score"] <= 5
                            for t in triplets for m in t["modifications"])
    table = {s["stage"]: s for s in manifest["cir"]["stages"]}
    assert table["triplet_judge"]["image_tokens"] >= 2 * 4 * table["triplet_judge"]["requests"]  # both images
    # The quality report, from the finished output: every kept turn counted under its type.
    q = manifest["quality"]
    assert q["m3t"]["turns_kept"] == len(turns) and q["m3t"]["samples"] == manifest["totals"]["kept"]
    for t, r in q["m3t"]["types"].items():
        assert r["kept"] == sum(x["type"] == t for x in turns)
        assert sum(r["verdicts"].values()) == r["kept"] if r["kept"] else True
    assert q["cir"]["triplets"] == manifest["cir"]["kept"]
    assert q["cir"]["modifications_kept"] == sum(len(t["modifications"]) for t in triplets)


def test_conservation_per_input_shard(smoke_run):
    out, _ = smoke_run
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert len(stats) == 2
    for s in stats:
        rejects = pq.read_table(out / "rejects" / f"{s['shard']}.parquet")
        index = pq.read_table(out / "index" / f"{s['shard']}.parquet")
        assert s["read"] == s["kept"] + s["rejected"] == index.num_rows + rejects.num_rows
        assert all(r for r in rejects.column("reason").to_pylist())
    assert not list(out.rglob("*.tmp"))


def test_tars_read_back_with_webdataset_and_validate(smoke_run):
    out, _ = smoke_run
    schema = json.loads((ROOT / "schemas" / "m3t_sample.schema.json").read_text())
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(samples) == manifest["totals"]["kept"]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    mix = manifest["config"]["dialogue"]["mix"]
    for s in samples:
        meta = s["json"]
        jsonschema.validate(meta, schema)
        assert s["jpg"].size == (meta["image"]["width"], meta["image"]["height"])
        assert meta["lineage"]["models"]["dialogue"] == "tiny:lm"
        all_turns = meta["turns"] + meta.get("dropped_turns", [])
        assert Counter(t["type"] for t in all_turns) == Counter({k: v for k, v in mix.items() if v})
        assert len(meta["turns"]) >= manifest["config"]["filter"]["min_turns"]
        retrieval = [t for t in all_turns if t["type"] == "retrieval"]
        assert all(t["target"] == meta["caption"] for t in retrieval)


def test_tars_load_with_hf_datasets(smoke_run):
    from datasets import load_dataset

    out, _ = smoke_run
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    ds = load_dataset("webdataset", data_files={"train": tars}, split="train")
    manifest = json.loads((out / "manifest.json").read_text())
    assert ds.num_rows == manifest["totals"]["kept"]
    row = ds[0]
    assert row["jpg"].size[0] > 0 and "turns" in row["json"]


def test_rerun_resumes_and_skips_done_shards(smoke_run):
    out, _ = smoke_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 already done, 0 to run" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert before == after


def test_resume_with_a_changed_config_is_refused(smoke_run):
    out, _ = smoke_run
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out),
           "--set", "filter.min_turns=6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "different config (filter.min_turns: 3 -> 6)" in proc.stderr


def _by_key(out):
    import webdataset as wds

    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)} if tars else {}


def test_refilter_equals_a_fresh_run_with_the_same_thresholds(smoke_run, tmp_path):
    import shutil

    out, _ = smoke_run
    copy = tmp_path / "refiltered"
    shutil.copytree(out, copy)
    # The last one re-decides on the judge's verdicts, without re-judging.
    new = ["filter.min_turns=2", "filter.max_turn_rank=10", "filter.min_turn_score=-0.2", "filter.drop_contradicted=false",
           "filter.min_judge_score=2"]
    cmd = [sys.executable, "-m", "m3t_gen.cli", "refilter", str(copy)] + sum((["--set", s] for s in new), [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    fresh = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(fresh)]
    proc = subprocess.run(cmd + sum((["--set", s] for s in new), []), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _by_key(copy), _by_key(fresh)
    assert set(a) == set(b) and a
    from conftest import assert_same_turns

    for key in a:  # negatives too (mined for every written turn): the same, scores up to CLIP's noise
        assert_same_turns(a[key]["turns"], b[key]["turns"])
        assert a[key].get("dropped_turns") == b[key].get("dropped_turns"), key
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (copy, fresh))
    assert ma["totals"] == mb["totals"]
    assert ma["config_hash"] == mb["config_hash"]
    assert any(t["verdict"] == "contradicted" for s in a.values() for t in s["turns"])  # revived by the refilter
    assert ma["quality"]["m3t"]["types"] == mb["quality"]["m3t"]["types"]  # the report follows the refilter
    # A refiltered run resumes like a fresh one: nothing left to do.
    proc = subprocess.run([sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"),
                           "--output", str(copy)] + sum((["--set", s] for s in new), []),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0 to run" in proc.stderr


def test_refilter_refuses_non_filter_keys(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "m3t_gen.cli", "refilter", str(out), "--set", "seed=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "only filter.*" in proc.stderr


def test_cir_triplets_have_the_configured_modifications_and_validate(smoke_run):
    out, proc = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    cir = manifest["cir"]
    n = manifest["config"]["cir"]["modify"]["n"]
    schema = json.loads((ROOT / "schemas" / "cir_triplet.schema.json").read_text())
    triplets = [json.loads(line) for p in sorted((out / "triplets").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert cir["pairs"] == cir["kept"] + cir["rejected"] and len(triplets) == cir["kept"] > 0
    pool_keys = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (out / "pool").glob("*.tar")),
                                                      shardshuffle=False)}
    assert cir["pool"] == len(pool_keys)
    categories = set(manifest["config"]["cir"]["modify"]["categories"])
    for t in triplets:
        jsonschema.validate(t, schema)
        assert len(t["modifications"]) + len(t["dropped_modifications"]) == n
        assert {m["category"] for m in t["modifications"]} <= categories
        assert t["image"] in pool_keys and t["target_image"] in pool_keys and t["image"] != t["target_image"]
        assert 1 <= t["rank"] <= manifest["config"]["cir"]["pairing"]["max_rank"]
    for p in (out / "triplet_stats").glob("*.json"):
        s = json.loads(p.read_text())
        assert s["pairs"] == s["kept"] + s["rejected"]
    # Per-stage accounting of the CIR pass, as for the sample stages (m3t-gen plan --from-run reads it).
    table = {s["stage"]: s for s in cir["stages"]}
    assert list(table) == ["modify", "triplet_reward", "triplet_judge", "triplet_filter"]
    assert table["modify"]["in"] == cir["pairs"] and table["triplet_filter"]["kept"] == cir["kept"]
    assert sum(s["rejected"] for s in table.values()) == cir["rejected"]
    assert table["modify"]["busy_seconds"] > 0 and table["modify"]["output_tokens"] > 0
    assert table["triplet_reward"]["busy_seconds"] > 0 and "output_tokens" not in table["triplet_reward"]
    assert "cir: pool" in proc.stdout


def _run_smoke(out, *sets):
    proc = subprocess.run([sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"),
                           "--output", str(out)] + sum((["--set", s] for s in sets), []),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "manifest.json").read_text()), proc


def _samples(out):
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)]


def test_single_stage_variant_mllm_writes_turns_from_the_image(tmp_path):
    """dialogue.source=image: no caption call; the tiny Qwen2.5-VL in vLLM sees each image and writes every turn
    (JSON-schema constrained); its retrieval target becomes the sample's caption."""
    out = tmp_path / "single"
    manifest, _ = _run_smoke(
        out, "recipe=m3t", "dialogue.source=image", "dialogue.model.model=tiny:qwen2_5_vl",
        "dialogue.sampling.max_tokens=512", "filter.min_turns=1", "filter.min_turn_score=null", "limit=4",
        "judge=null")  # the writer is under test here; the judge has its own (test_every_kept_turn_...)
    assert "caption" not in [s["stage"] for s in manifest["stages"]]
    dialogue = next(s for s in manifest["stages"] if s["stage"] == "dialogue")
    assert dialogue["image_tokens"] >= 4 * dialogue["requests"]  # the image reached the writer
    schema = json.loads((ROOT / "schemas" / "m3t_sample.schema.json").read_text())
    samples = _samples(out)
    assert samples and len(samples) == manifest["totals"]["kept"]
    for meta in samples:
        jsonschema.validate(meta, schema)
        retrieval = [t for t in meta["turns"] + meta.get("dropped_turns", []) if t["type"] == "retrieval"]
        assert retrieval and retrieval[0]["target"] == meta["caption"]
        assert "caption" not in meta["lineage"]["attempts"]


def test_cir_mllm_variant_sees_both_images(tmp_path):
    """cir.modify.source=images: the tiny Qwen2.5-VL in vLLM gets the reference and target images (read by seek
    from the pool tars) and writes the modification texts."""
    out = tmp_path / "cir-images"
    manifest, _ = _run_smoke(
        out, "recipe=cir", "cir.modify.source=images", "cir.modify.model.model=tiny:qwen2_5_vl",
        "cir.modify.model.backend=vllm", "cir.modify.model.options={enforce_eager: true, max_model_len: 2048, "
        "limit_images_per_prompt: 2, engine_args: {kv_cache_memory_bytes: 134217728}}", "limit=4",
        "cir.filter.min_modification_score=-1", "cir.judge=null", "negatives=null")
    cir = manifest["cir"]
    assert cir["pairs"] > 0 and cir["pairs"] == cir["kept"] + cir["rejected"]
    assert manifest["models"]["modify"] == "tiny:qwen2_5_vl"
    modify = next(s for s in cir["stages"] if s["stage"] == "modify")
    assert modify["image_tokens"] >= 2 * 4 * modify["requests"]  # both images in every request
    triplets = [json.loads(line) for p in sorted((out / "triplets").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(triplets) == cir["kept"]
    assert all(len(t["modifications"]) + len(t["dropped_modifications"]) == 3 for t in triplets)


def test_reasoning_writer_in_the_pipeline(tmp_path):
    """A reasoning writer (tiny Qwen3 in vLLM, qwen3 parser, thinking on with a budget): the schema constrains the
    answer after the reasoning, the reasoning is kept apart in KEY.json, and its tokens are counted."""
    out = tmp_path / "reasoning"
    budget = 24
    manifest, proc = _run_smoke(
        out, "recipe=m3t", "dialogue.model.model=tiny:qwen3",
        f"dialogue.model.reasoning={{parser: qwen3, budget: {budget}}}", "filter.min_turns=1",
        "filter.min_turn_score=null", "limit=4", "judge=null")
    dialogue = next(s for s in manifest["stages"] if s["stage"] == "dialogue")
    assert dialogue["kept"] > 0
    n = dialogue["requests"]
    # Forced end of reasoning after the budget: "</think>" and what the template puts around it.
    assert n * budget <= dialogue["reasoning_tokens"] <= n * (budget + 4)
    assert dialogue["output_tokens"] > dialogue["reasoning_tokens"]
    assert "reasoning tokens" in proc.stdout
    samples = _samples(out)
    assert samples
    for meta in samples:
        assert meta["reasoning"]["dialogue"]  # the reasoning text, kept out of the parsed turns
        assert "</think>" not in json.dumps(meta["turns"])
    # reasoning.keep: false drops the text, counts stay.
    out2 = tmp_path / "reasoning-dropped"
    manifest2, _ = _run_smoke(
        out2, "recipe=m3t", "dialogue.model.model=tiny:qwen3",
        f"dialogue.model.reasoning={{parser: qwen3, budget: {budget}, keep: false}}", "filter.min_turns=1",
        "filter.min_turn_score=null", "limit=2", "judge=null")
    assert all("reasoning" not in meta for meta in _samples(out2))
    assert next(s for s in manifest2["stages"] if s["stage"] == "dialogue")["reasoning_tokens"] > 0


def test_no_engine_processes_left_after_runs(smoke_run):
    """Every stage shuts its engine down when its actor ends: after the runs (they are subprocesses that have
    exited), no vLLM engine core or worker outlives them (zombies, already dead, excepted)."""
    import psutil

    import time

    mine = {p.pid for p in psutil.Process().children(recursive=True)}  # engines of tests in this process

    def left() -> list:
        found = []
        for p in psutil.process_iter(["pid", "name", "status"]):
            if p.info["name"] and p.info["name"].startswith("VLLM::") and p.info["pid"] not in mine \
                    and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append((p.info["pid"], p.info["name"]))
        return found

    deadline = time.time() + 60  # an engine of the last run may still be exiting on a busy machine
    while left() and time.time() < deadline:
        time.sleep(1)
    assert not left(), left()
