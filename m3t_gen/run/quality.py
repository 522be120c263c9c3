"""The dataset's quality report, computed from a finished output (its kept and filtered samples, its triplets):
what the manifest records under ``quality`` (written by the run and by refilter) and the card shows. One pass over the output, linear in its size
(near-duplicates by MinHash LSH, not all pairs).

M3T, per turn type: turns generated vs kept (and the share of the kept mix vs the requested one), words per
query and target, distinct-n of queries and targets, near-duplicate queries across the dataset, targets leaked
into their queries, and the distributions of the CLIP score, the self-retrieval probability and the judge's
score and verdicts, with the configured thresholds. CIR: categories, words per modification text, duplicate
texts, score distributions and verdicts.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Iterator

from m3t_gen.run.artefacts import NegativesStats, config_value
from m3t_gen.storage.store import Store, iter_tar

NEAR_DUPLICATE_JACCARD = 0.8  # MinHash LSH threshold on character 5-gram shingles of the normalised text
SHINGLE = 5
NUM_PERM = 64
EXAMPLES = 3
SCORE_BINS = 10
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def length_summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * len(s)))]

    return {"n": len(s), "mean": round(sum(s) / len(s), 2), "min": s[0], "p10": q(0.1), "p50": q(0.5),
            "p90": q(0.9), "max": s[-1]}


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the texts (Li et al. 2016): 1.0 when nothing repeats."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        w = words(text)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return round(len(seen) / total, 4) if total else None


def histogram(values: list[float], lo: float, hi: float, bins: int = SCORE_BINS) -> dict[str, Any]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return {"lo": lo, "hi": hi, "counts": counts, "n": len(values),
            "mean": round(sum(values) / len(values), 4) if values else None}


def near_duplicates(texts: list[tuple[str, str]]) -> dict[str, Any]:
    """Among (owner, text) pairs: the share of texts with an exact (normalised) or near duplicate (MinHash
    Jaccard >= NEAR_DUPLICATE_JACCARD) under ANOTHER owner, and a few examples."""
    from datasketch import MinHash, MinHashLSH

    exact: dict[str, set[str]] = {}
    for owner, text in texts:
        exact.setdefault(normalise(text), set()).add(owner)
    lsh = MinHashLSH(threshold=NEAR_DUPLICATE_JACCARD, num_perm=NUM_PERM)
    names = list(exact)
    shingles = ([f" {n} "[j:j + SHINGLE].encode() for j in range(max(1, len(n) + 3 - SHINGLE))] for n in names)
    hashes: dict[str, Any] = {}
    # generator(): one set of permutations for all (building them per MinHash was a third of the report's time)
    for i, (norm, m) in enumerate(zip(names, MinHash.generator(shingles, num_perm=NUM_PERM, seed=1))):
        hashes[norm] = m
        lsh.insert(str(i), m)
    duplicated: set[str] = set()
    examples: list[list[str]] = []
    for norm, owners in exact.items():
        similar = [names[int(k)] for k in lsh.query(hashes[norm]) if names[int(k)] != norm]
        if len(owners) > 1 or any(exact[s] - owners or owners - exact[s] for s in similar):
            duplicated.add(norm)
            if len(examples) < EXAMPLES:
                examples.append([norm, similar[0] if similar else norm])
    hits = sum(1 for _, text in texts if normalise(text) in duplicated)
    return {"share": round(hits / len(texts), 4) if texts else None, "texts": len(texts), "examples": examples}


def leaked(query: str, target: str) -> bool:
    """The target's words appear, in order and whole, in its query (a question that gives its answer away)."""
    t = normalise(target)
    return bool(t) and f" {t} " in f" {normalise(query)} "


def _samples(store: Store, folder: str) -> Iterator[dict[str, Any]]:
    for rel in store.files(folder, ".tar"):
        with store.open(rel) as fh:
            for _key, _image, meta in iter_tar(fh):
                yield meta


def _thresholds(config: dict[str, Any], section: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The configured thresholds of ``section`` (those set)."""
    values = {n: config_value(config, f"{section}.{n}") for n in names}
    return {n: v for n, v in values.items() if v is not None}


def m3t_report(store: Store, config: dict[str, Any]) -> dict[str, Any] | None:
    from m3t_gen.turns import TURN_TYPES

    mix = config_value(config, "dialogue.mix") or {}
    generated: Counter[str] = Counter()
    per_type: dict[str, dict[str, list]] = {}
    samples = 0

    def bucket(t: str) -> dict[str, list]:
        return per_type.setdefault(t, {"kept": 0, "queries": [], "targets": [], "q_words": [], "t_words": [], "scores": [],
                                       "probs": [], "judge": [], "verdicts": [], "agreement": [], "leaked": []})

    for folder in ("shards", "filtered"):
        for meta in _samples(store, folder):
            kept_sample = folder == "shards"
            samples += kept_sample
            for turn in meta.get("turns", []) + meta.get("dropped_turns", []):
                generated[turn["type"]] += 1
            if not kept_sample:
                continue
            for turn in meta.get("turns", []):
                b = bucket(turn["type"])
                kind = TURN_TYPES.get(turn["type"])  # a sample written by another tool may have other types
                writes = not (kind and kind.target_is_caption)
                b["queries"].append((meta["key"], turn["query"]))
                b["q_words"].append(len(words(turn["query"])))
                if writes:
                    b["targets"].append(turn["target"])
                    b["t_words"].append(len(words(turn["target"])))
                    if leaked(turn["query"], turn["target"]):
                        b["leaked"].append([turn["query"], turn["target"]])
                b["kept"] += 1
                if turn.get("score") is not None:
                    b["scores"].append(turn["score"])
                for field, out in (("prob", "probs"), ("judge_score", "judge"), ("verdict", "verdicts"),
                                   ("agreement", "agreement")):
                    if turn.get(field) is not None:
                        b[out].append(turn[field])
    if not generated:
        return None
    kept_total = sum(b["kept"] for b in per_type.values())
    requested_total = sum(mix.values()) or 1
    types: dict[str, Any] = {}
    all_queries = [q for b in per_type.values() for q in b["queries"]]
    for t in [*mix, *sorted(set(generated) - set(mix))]:  # in the mix's order
        b = bucket(t)
        kept = b["kept"]
        entry: dict[str, Any] = {
            "requested_share": round(mix.get(t, 0) / requested_total, 4),
            "kept_share": round(kept / kept_total, 4) if kept_total else None,
            "generated": generated[t], "kept": kept,
            "query_words": length_summary(b["q_words"]),
            "distinct_1_queries": distinct_n((q for _, q in b["queries"]), 1),
            "distinct_2_queries": distinct_n((q for _, q in b["queries"]), 2),
            "clip_score": histogram(b["scores"], -1.0, 1.0) if b["scores"] else None,
        }
        if b["targets"]:
            entry.update(target_words=length_summary(b["t_words"]),
                         distinct_1_targets=distinct_n(b["targets"], 1), distinct_2_targets=distinct_n(b["targets"], 2),
                         leaked_targets={"share": round(len(b["leaked"]) / len(b["targets"]), 4),
                                         "examples": b["leaked"][:EXAMPLES]})
        if b["probs"]:
            entry["self_retrieval_prob"] = histogram(b["probs"], 0.0, 1.0)
        if b["judge"]:
            entry["judge_score"] = {str(s): b["judge"].count(s) for s in range(1, 6)}
        if b["verdicts"]:
            entry["verdicts"] = dict(sorted(Counter(b["verdicts"]).items()))
        if b["agreement"]:
            entry["answer_agreement"] = histogram(b["agreement"], 0.0, 1.0)
        types[t] = entry
    return {
        "samples": samples, "turns_generated": sum(generated.values()), "turns_kept": kept_total,
        "types": types,
        "near_duplicate_queries": near_duplicates(all_queries),
        "thresholds": _thresholds(config, "filter", ("min_turn_score", "max_turn_rank", "min_turn_prob", "min_judge_score",
                                         "min_answer_agreement", "drop_contradicted", "drop_unanswerable")),
    }


def _triplets(store: Store) -> Iterator[dict[str, Any]]:
    import json

    for rel in store.files("triplets", ".jsonl"):
        with store.open(rel, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def cir_report(store: Store, config: dict[str, Any]) -> dict[str, Any] | None:
    categories: Counter[str] = Counter()
    lengths: list[int] = []
    texts: list[tuple[str, str]] = []
    scores: list[float] = []
    directional: list[float] = []
    judge: list[int] = []
    verdicts: Counter[str] = Counter()
    triplets = dropped = 0
    for t in _triplets(store):
        triplets += 1
        dropped += len(t.get("dropped_modifications", []))
        # Triplet lines written by other tools (the card reads any) may lack scores or categories.
        if (t.get("scores") or {}).get("directional") is not None:
            directional.append(t["scores"]["directional"])
        for m in t["modifications"]:
            categories[m.get("category") or "(none)"] += 1
            lengths.append(len(words(m["text"])))
            texts.append((t["id"], m["text"]))
            if m.get("score") is not None:
                scores.append(m["score"])
            if m.get("judge_score") is not None:
                judge.append(m["judge_score"])
                verdicts[m["verdict"]] += 1
    if not triplets:
        return None
    out: dict[str, Any] = {
        "triplets": triplets, "modifications_kept": len(texts), "modifications_dropped": dropped,
        "categories": dict(sorted(categories.items())), "modification_words": length_summary(lengths),
        "distinct_1": distinct_n((x for _, x in texts), 1), "distinct_2": distinct_n((x for _, x in texts), 2),
        "duplicate_texts": near_duplicates(texts),
        "modification_score": histogram(scores, -1.0, 1.0) if scores else None,
        "directional": histogram(directional, -1.0, 1.0) if directional else None,
        "thresholds": _thresholds(config, "cir.filter", ("min_modification_score", "min_directional", "min_target_caption_score",
                                         "min_judge_score", "drop_contradicted")),
    }
    if judge:
        out["judge_score"] = {str(s): judge.count(s) for s in range(1, 6)}
        out["verdicts"] = dict(sorted(verdicts.items()))
    return out


def negatives_report(store: Store, config: dict[str, Any]) -> dict[str, Any] | None:
    """Per turn type (and ``image``): candidates mined, kept, per kept turn, the share dropped by each guard with
    examples, and the distributions of the kept negatives' similarity to their positive and of their score against
    the query beside the positives' own scores (a guard that works shows the two apart)."""
    import io

    import pyarrow.parquet as pq

    markers = store.files("negatives_stats", ".json") if config_value(config, "negatives") else []
    rels = store.files("negatives", ".parquet") if markers else []
    if not rels:
        return None
    stats = [NegativesStats.loads(store.read_text(rel)) for rel in markers]
    types: dict[str, dict[str, Any]] = {}
    for rel in rels:
        table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        for c in table.to_pylist():
            r = types.setdefault(c["type"], {"candidates": 0, "kept": 0, "dropped": Counter(), "examples": {},
                                             "similarity": [], "score": [], "positive": {}})
            r["candidates"] += 1
            if c["kept"]:
                r["kept"] += 1
                r["similarity"].append(c["similarity"])
                r["score"].append(c["score"])
            else:
                r["dropped"][c["reason"]] += 1
                found = r["examples"].setdefault(c["reason"], [])
                if len(found) < EXAMPLES and c["reason"] != "over_limit":
                    found.append({"key": c["key"], "i": c["i"], "text": c["text"], "source": c["source"],
                                  "similarity": round(c["similarity"], 4), "score": round(c["score"], 4),
                                  "positive": round(c["positive"], 4)})
            r["positive"][(c["key"], c["i"])] = c["positive"]
    out_types = {}
    for t, r in sorted(types.items()):
        n = r["candidates"]
        out_types[t] = {
            "candidates": n, "kept": r["kept"],
            "dropped": {why: {"count": k, "share": round(k / n, 4)} for why, k in sorted(r["dropped"].items())},
            "examples": r["examples"],
            "similarity": histogram(r["similarity"], -1.0, 1.0),
            "score": histogram(r["score"], -1.0, 1.0),
            "positive_score": histogram(list(r["positive"].values()), -1.0, 1.0),
        }
    turns = sum(s.turns for s in stats)
    kept_text = sum(r["kept"] for t, r in types.items() if t != "image")
    return {"turns": turns, "turns_with_negatives": sum(s.turns_with_negatives for s in stats),
            "per_turn": round(kept_text / turns, 3) if turns else None,
            "guard": config_value(config, "negatives.guard"), "types": out_types}


def quality_report(store: Store, config: dict[str, Any]) -> dict[str, Any]:
    """The report of a finished output (``config``: the manifest's, as JSON)."""
    report: dict[str, Any] = {}
    m3t = m3t_report(store, config)
    if m3t:
        report["m3t"] = m3t
    cir = cir_report(store, config)
    if cir:
        report["cir"] = cir
    negatives = negatives_report(store, config)
    if negatives:
        report["negatives"] = negatives
    return report
