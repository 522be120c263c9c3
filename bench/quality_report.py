"""Quality report time (issue 16): the report over an output of N samples and of 10 N samples, against the bare
cost of reading the same tars (iter_tar over every KEY.json), measured in the same run.

    python bench/quality_report.py [--samples 2000] [--scale 10] [--from-output out/smoke]

Synthetic outputs: WebDataset tars of KEY.json samples in the shape the writer produces (7 turns of the default
mix, scores, verdicts), texts drawn from a vocabulary so that some queries repeat and some nearly repeat, as in a
real run; a 64-byte stand-in for each image (the report does not read images). ``--from-output`` also times the
report on a finished run (the small-shard output). Prints one JSON line: seconds, seconds per 1k samples, the
report / read ratio at each size, and the growth factor from N to scale x N (linear: equal to scale).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def write_output(root: Path, n: int, seed: int = 0, per_tar: int = 1000) -> None:
    import webdataset as wds

    from m3t_gen.turns import DEFAULT_MIX, TURN_TYPES, turn_plan

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    things = vocab[:400]
    (root / "shards").mkdir(parents=True)
    plan = turn_plan(DEFAULT_MIX)
    writer = None
    for i in range(n):
        if i % per_tar == 0:
            if writer:
                writer.close()
            writer = wds.TarWriter(str(root / "shards" / f"s-{i // per_tar:04d}.tar"), encoder=False)
        caption = " ".join(rng.choices(vocab, k=40))
        turns = []
        for j, t in enumerate(plan):
            query = " ".join(["what", "is", "the"] + rng.choices(things, k=rng.randint(2, 8)))
            target = caption if TURN_TYPES[t["type"]].target_is_caption else " ".join(rng.choices(things, k=rng.randint(1, 4)))
            turns.append({"type": t["type"], "query": query, "target": target, "score": rng.uniform(-0.2, 0.5),
                          "prob": rng.random(), "rank": rng.randint(1, 16), "i": j,
                          "verdict": rng.choice(["supported", "contradicted", "not_answerable"]),
                          "judge_score": rng.randint(1, 5), "judge_reason": "r",
                          "answer": None, "agreement": rng.random() if t["type"].startswith("vqa") else None})
        meta = {"key": f"s_{i:07d}", "caption": caption, "turns": turns, "scores": {"caption": 0.3}}
        writer.write({"__key__": meta["key"], "jpg": b"\0" * 64, "json": json.dumps(meta).encode()})
    writer.close()


def time_report(root: Path, config: dict) -> tuple[float, float, dict]:
    from m3t_gen.run.quality import quality_report
    from m3t_gen.storage.store import Store, iter_tar

    store = Store(root)
    t = time.perf_counter()
    n = 0
    for rel in store.files("shards", ".tar"):
        for _ in iter_tar(store.local(rel)):
            n += 1
    read = time.perf_counter() - t
    t = time.perf_counter()
    report = quality_report(store, config)
    return time.perf_counter() - t, read, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--from-output", type=Path, default=None, help="also time the report on this finished run")
    args = ap.parse_args()
    from m3t_gen.turns import DEFAULT_MIX

    config = {"dialogue": {"mix": DEFAULT_MIX}, "filter": {"min_turn_score": 0.0}}
    out: dict = {"bench": "quality_report", "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.samples, args.samples * args.scale):
            root = Path(tmp) / str(n)
            write_output(root, n)
            seconds, read, report = time_report(root, config)
            assert report["m3t"]["samples"] == n, report["m3t"]["samples"]
            out["sizes"][n] = {"report_s": round(seconds, 3), "read_s": round(read, 3),
                               "report_per_1k_samples_s": round(1000 * seconds / n, 4),
                               "report_over_read": round(seconds / read, 2),
                               "near_duplicate_query_share": report["m3t"]["near_duplicate_queries"]["share"]}
    small, large = (out["sizes"][n]["report_s"] for n in (args.samples, args.samples * args.scale))
    out["growth"] = round(large / small, 2)
    out["scale"] = args.scale
    if args.from_output:
        from m3t_gen.run.quality import quality_report
        from m3t_gen.storage.store import Store

        manifest = json.loads((args.from_output / "manifest.json").read_text())
        t = time.perf_counter()
        quality_report(Store(args.from_output), manifest["config"])
        out["from_output"] = {"path": str(args.from_output), "samples": manifest["totals"]["kept"],
                              "report_s": round(time.perf_counter() - t, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
