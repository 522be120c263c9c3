"""The negatives pass: hard negatives for every kept turn, mined from the run's own output and guarded against
false negatives (after the sample pass and the CIR pass, when the config has a ``negatives`` section).

OUT/shards + OUT/filtered (every scored sample, every turn written: all are mined for and are candidates)
  -> embed:  per output shard, one call of a CLIP actor (the reward's model and placement): each sample's image
             and caption, each turn's target text                           -> object store (numpy only)
  -> mine:   per (shard, turn type), a Ray task: exact top-k of the shard's targets among every shard's targets
             of that type (run/knn.py: tiles streamed from the object store, the fp32 answer), candidates from
             other images inside the band and the rank window; per shard, its images among every image
  -> score:  the CLIP actor scores each text candidate the way the reward scored the positive (against this
             image, with this turn's query where the turn type scores query and target: turns.scored_text)
  -> decide: ``decide`` reads recorded scores only (same text, near-duplicate, positive-aware, per-turn limit)
  -> write:  negatives/<shard>.parquet (every candidate, its scores, its decision or reason), the shard's tars
             rewritten with each turn's kept ``negatives`` and the sample's ``negative_images`` (KEY.json), and
             negatives_stats/<shard>.json last (the marker).
For every shard: candidates = kept + dropped (each with its reason). The driver holds object references and one
shard's candidates at a time, never the embeddings. `m3t-gen refilter --set negatives.guard.x=...` re-decides
from negatives/*.parquet (``attach``) without mining again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3t_gen.config import NegativeGuardSpec, NegativesSpec, placement_exclude
from m3t_gen.run.artefacts import NegativesStats, NegativesSummary, ShardStats
from m3t_gen.scoring.measures import normalize_answer
from m3t_gen.storage.store import Store, iter_tar, stale_fingerprints
from m3t_gen.turns import TURN_TYPE_NAMES, scored_text

IMAGE = "image"  # the ``type`` of an image candidate (text candidates carry their turn's type)
OUTPUTS = ("negatives", "negatives_stats")
CANDIDATE_SCHEMA = pa.schema([
    ("key", pa.string()),            # the sample whose turn (or image) gets the negative
    ("i", pa.int32()),               # the turn's position in its dialogue; null for an image candidate
    ("type", pa.string()),           # turn type, or "image"
    ("text", pa.string()),           # the candidate target; null for an image
    ("source", pa.string()),         # the sample the candidate comes from
    ("source_i", pa.int32()),        # its turn there; null for an image
    ("similarity", pa.float32()),    # to the positive: target vs target (text), image vs image (image)
    ("rank", pa.int32()),            # among the positive's candidates from other images, 1 = nearest
    ("score", pa.float32()),         # the candidate against the query, as the reward scores the positive
    ("positive", pa.float32()),      # the positive's own score (the guard's reference)
    ("same_text", pa.bool_()),       # the candidate's text is the positive's (normalised)
    ("kept", pa.bool_()),
    ("reason", pa.string()),         # why it was dropped; null when kept
])


# ------------------------------------------------------------------------------------------ decisions


def same_answer(text: str, positive: str) -> bool:
    """The positive's own answer, as the judge's answer agreement compares them (SQuAD's normalisation: case,
    punctuation, articles)."""
    return normalize_answer(text) == normalize_answer(positive)


def threshold(positive: np.ndarray, ratio: float) -> np.ndarray:
    """The score a candidate must stay under: the positive's, less (1 - ratio) of its size (ratio x positive for
    a positive score, NV-Retriever's TopK-PercPos; still below the positive when CLIP scores it below zero)."""
    positive = np.asarray(positive, dtype=np.float64)
    return positive - (1.0 - ratio) * np.abs(positive)


def decide(table: pa.Table, guard: NegativeGuardSpec) -> pa.Table:
    """Every candidate's decision from its recorded scores: dropped as the positive's own text, as a
    near-duplicate, as a likely false negative (scores too close to the positive), or over the per-turn limit
    (the nearest that pass are kept). ``table``: CANDIDATE_SCHEMA, each turn's candidates in rank order."""
    n = table.num_rows
    is_image = np.asarray(table.column("type").to_pylist(), dtype=object) == IMAGE
    sim = table.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    positive = table.column("positive").to_numpy(zero_copy_only=False)
    same = table.column("same_text").to_numpy(zero_copy_only=False)
    reason = np.full(n, None, dtype=object)
    near = np.where(is_image, sim > guard.max_image_similarity, sim > guard.max_text_similarity)
    above = score >= threshold(positive, guard.max_positive_ratio)
    for mask, why in ((above, "above_positive"), (near, "near_duplicate"), (same & ~is_image, "same_text")):
        reason[mask] = why  # the last assignment wins: the most specific reason
    passed = np.equal(reason, None)
    keys = table.column("key").to_pylist()
    turns = table.column("i").to_pylist()
    seen: Counter = Counter()
    for row in np.flatnonzero(passed):
        group = (keys[row], turns[row])
        seen[group] += 1
        limit = guard.images_per_sample if is_image[row] else guard.per_turn
        if seen[group] > limit:
            reason[row] = "over_limit"
    kept = np.equal(reason, None)
    return (table.set_column(table.schema.get_field_index("kept"), "kept", pa.array(kept))
            .set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason.tolist(), pa.string())))


# ------------------------------------------------------------------------------------------ shard data


@dataclass
class Texts:
    """Strings as one UTF-8 buffer and offsets: numpy only, so the object store hands them over zero-copy."""

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64 [n + 1]

    @classmethod
    def of(cls, items: list[str]) -> "Texts":
        encoded = [s.encode() for s in items]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]]).decode()


@dataclass
class ShardTurns:
    """One output shard's kept samples and turns, embedded (what mining reads from the object store)."""

    keys: Texts               # per sample
    image_emb: np.ndarray     # [s, d]
    caption_emb: np.ndarray   # [s, d]
    sample: np.ndarray        # [t] int32: the turn's sample
    turn: np.ndarray          # [t] int32: its ``i`` in the dialogue
    kind: np.ndarray          # [t] int8: its type, as a position in TURN_TYPE_NAMES
    queries: Texts            # [t]
    targets: Texts            # [t]
    target_emb: np.ndarray    # [t, d]
    positive: np.ndarray      # [t] float32: the reward's score of the turn

    def of_kind(self, code: int) -> np.ndarray:
        return np.flatnonzero(self.kind == code)

    def span(self, code: int) -> slice | np.ndarray:
        """The rows of a type as a slice where they are contiguous (turns are stored by type: a tile is then a
        view, not a copy of the type's embeddings, once per task and pass)."""
        rows = self.of_kind(code)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            return slice(int(rows[0]), int(rows[-1]) + 1)
        return rows

    def by_kind(self) -> "ShardTurns":
        """The same turns, stored type by type (stable: dialogue order within a type)."""
        order = np.argsort(self.kind, kind="stable")
        texts = {f: Texts.of([getattr(self, f)[int(i)] for i in order]) for f in ("queries", "targets")}
        return ShardTurns(keys=self.keys, image_emb=self.image_emb, caption_emb=self.caption_emb,
                          sample=self.sample[order], turn=self.turn[order], kind=self.kind[order],
                          target_emb=self.target_emb[order] if len(order) else self.target_emb,
                          positive=self.positive[order], **texts)

    def counts(self) -> np.ndarray:
        """[types + 1]: turns of each type, then samples."""
        return np.append(np.bincount(self.kind, minlength=len(TURN_TYPE_NAMES)), len(self.keys))


class Embedder:
    """A Ray actor: the run's CLIP, loaded once, embeds whole output shards and scores candidates."""

    BATCH = 64

    def __init__(self, reward_cfg: Any) -> None:
        from m3t_gen.scoring.clip import ClipEmbedder

        self.clip = ClipEmbedder.for_run(reward_cfg)

    def _texts(self, texts: list[str]) -> np.ndarray:
        parts = [self.clip.embed_texts(texts[i:i + self.BATCH]) for i in range(0, len(texts), self.BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def shard(self, store: Store, tars: list[str], filtered: list[str]) -> tuple[ShardTurns, np.ndarray]:
        """Every scored sample of the shard (kept and filtered) and every turn written (kept and dropped): each is
        mined for, and each is a candidate (a wrong answer need not be a kept one). Which turns show their
        negatives is the filter's decision, made later (``attach``): so a refilter that keeps other turns
        finds theirs already mined, exactly as a fresh run would mine them."""
        from PIL import Image

        keys, images, image_emb, captions = [], [], [], []
        sample, turn, kind, queries, targets, positive = [], [], [], [], [], []
        for rel in [f"shards/{t}" for t in tars] + [f"filtered/{t}" for t in filtered]:
            with store.open(rel) as fh:
                for key, jpg, meta in iter_tar(fh):
                    s = len(keys)
                    keys.append(key)
                    images.append(Image.open(io.BytesIO(jpg)).convert("RGB"))
                    if len(images) == self.BATCH:  # embedded as they come: a shard's pixels are never all held
                        image_emb.append(self.clip.embed_images(images))
                        images = []
                    captions.append(meta["caption"])
                    for t in meta["turns"] + meta.get("dropped_turns", []):
                        sample.append(s), turn.append(t["i"]), kind.append(TURN_TYPE_NAMES.index(t["type"]))
                        queries.append(t["query"]), targets.append(t["target"]), positive.append(t["score"])
        if images:
            image_emb.append(self.clip.embed_images(images))
        turns = ShardTurns(
            keys=Texts.of(keys), image_emb=np.concatenate(image_emb) if image_emb else np.zeros((0, 0), np.float32), caption_emb=self._texts(captions),
            sample=np.asarray(sample, np.int32), turn=np.asarray(turn, np.int32), kind=np.asarray(kind, np.int8),
            queries=Texts.of(queries), targets=Texts.of(targets), target_emb=self._texts(targets),
            positive=np.asarray(positive, np.float32)).by_kind()
        return turns, turns.counts()

    def score(self, turns: ShardTurns, rows: np.ndarray, texts: list[str]) -> np.ndarray:
        """Each candidate text put in its turn's place (turn rows ``rows``) and scored against the image, as the
        reward scored the turn."""
        scored = [scored_text({"type": TURN_TYPE_NAMES[turns.kind[r]], "query": turns.queries[r], "target": t})
                  for r, t in zip(rows, texts)]
        if not scored:
            return np.zeros(0, np.float32)
        return np.einsum("nd,nd->n", self._texts(scored), turns.image_emb[turns.sample[rows]]).astype(np.float32)


# ------------------------------------------------------------------------------------------ mining


@dataclass
class Bank:
    """Every shard's ShardTurns in the object store, and per shard the rows of each type and of images before
    it (global rows: what exact search indexes)."""

    refs: list[Any]
    counts: np.ndarray  # [shards, types + 1]

    def offsets(self, column: int) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts[:, column])]).astype(np.int64)


def _window(sims: np.ndarray, valid: np.ndarray, band: Any, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ranks among the valid neighbours (1 = nearest), and the first ``limit`` inside band and window."""
    rank = np.cumsum(valid, axis=1)
    take = (valid & (rank >= band.min_rank) & (rank <= band.max_rank)
            & (sims >= band.min_similarity) & (sims <= band.max_similarity))
    take &= np.cumsum(take, axis=1) <= limit
    return rank, take


def _search(own: np.ndarray, ids: np.ndarray, bank: Bank, column: int, field: str, rows_of: Callable,
            k: int, spec: NegativesSpec, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import ray

    from m3t_gen.run.knn import device_for, exact_topk
    from m3t_gen.run.pairing import first_rung

    offsets = bank.offsets(column)
    tile_rows = spec.resources.tile_rows

    def tiles():
        """The bank in tiles of ``tile_rows`` global rows, once per pass: shards fetched one at a time from the
        object store (zero-copy), small shards' rows gathered into one tile (a tile's merge costs the same for
        a few rows as for many)."""
        pending, start, held = [], 0, 0
        for j, ref in enumerate(bank.refs):
            if not bank.counts[j, column]:
                continue
            emb = getattr(ray.get(ref), field)[rows_of(ray.get(ref))]
            at = 0
            while at < len(emb):
                if not pending:
                    start = int(offsets[j]) + at
                take = emb[at:at + tile_rows - held]
                pending.append(take)
                held += len(take)
                at += len(take)
                if held == tile_rows:
                    yield start, pending[0] if len(pending) == 1 else np.concatenate(pending)
                    pending, held = [], 0
        if pending:
            yield start, pending[0] if len(pending) == 1 else np.concatenate(pending)

    device = device_for(use_gpu)
    return exact_topk(own, ids, tiles, k, device=device, precision=first_rung(spec, device))


def _locate(bank: Bank, column: int, nbrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global rows -> (shard, row within that shard's rows of the column)."""
    offsets = bank.offsets(column)
    shard = np.searchsorted(offsets, nbrs, side="right") - 1
    return shard, nbrs - offsets[np.maximum(shard, 0)]


def mine_text(index: int, code: int, bank: Bank, spec: NegativesSpec, slack: int, use_gpu: bool) -> dict[str, Any]:
    """A Ray task: candidates for the turns of one type in one shard, among that type's targets in every shard."""
    import ray

    me = ray.get(bank.refs[index])
    rows = me.of_kind(code)
    ids = bank.offsets(code)[index] + np.arange(len(rows))
    k = spec.text.max_rank + slack  # a sample's own other turns of the type are found, then skipped
    sims, nbrs = _search(me.target_emb[rows], ids, bank, code, "target_emb", lambda s: s.span(code), k,
                         spec, use_gpu)
    shard, local = _locate(bank, code, nbrs)
    valid = nbrs >= 0
    valid &= ~((shard == index) & (me.sample[rows][:, None] == me.sample[rows[np.minimum(np.maximum(local, 0),
                                                                                         len(rows) - 1)]]))
    rank, take = _window(sims, valid, spec.text, spec.candidates)
    q, c = np.nonzero(take)
    out = {"row": rows[q], "similarity": sims[q, c], "rank": rank[q, c], "source": [], "source_i": [], "text": []}
    fetched: dict[int, Any] = {}  # the candidates' shards, each fetched once (zero-copy)
    for qq, cc in zip(q, c):
        j = int(shard[qq, cc])
        if j not in fetched:
            other = ray.get(bank.refs[j])
            fetched[j] = (other, other.of_kind(code))
        other, other_rows = fetched[j]
        r = int(other_rows[local[qq, cc]])
        out["source"].append(other.keys[int(other.sample[r])])
        out["source_i"].append(int(other.turn[r]))
        out["text"].append(other.targets[r])
    return out


def mine_images(index: int, bank: Bank, spec: NegativesSpec, use_gpu: bool) -> dict[str, Any]:
    """A Ray task: candidate images for the samples of one shard, among every shard's images, each scored
    against the sample's caption (text -> image, the retrieval direction) as the positive image is."""
    import ray

    column = len(TURN_TYPE_NAMES)
    me = ray.get(bank.refs[index])
    samples = np.arange(len(me.keys))
    ids = bank.offsets(column)[index] + samples
    sims, nbrs = _search(me.image_emb[samples], ids, bank, column, "image_emb", lambda s: slice(None),
                         spec.image.max_rank, spec, use_gpu)
    shard, local = _locate(bank, column, nbrs)
    rank, take = _window(sims, nbrs >= 0, spec.image, spec.candidates)
    q, c = np.nonzero(take)
    mine = samples[q]
    out = {"sample": mine, "similarity": sims[q, c], "rank": rank[q, c], "source": [], "score": [],
           "positive": np.einsum("nd,nd->n", me.caption_emb[mine], me.image_emb[mine]) if len(q) else np.zeros(0)}
    fetched: dict[int, Any] = {}
    for qq, cc, s in zip(q, c, mine):
        j = int(shard[qq, cc])
        other = fetched.setdefault(j, ray.get(bank.refs[j]))
        r = int(local[qq, cc])
        out["source"].append(other.keys[r])
        out["score"].append(float(me.caption_emb[s] @ other.image_emb[r]))
    return out


# ------------------------------------------------------------------------------------------ the pass


def fingerprint(store: Store, shards: list[str], spec: NegativesSpec) -> str:
    """What the candidates are mined from and how: each shard's scored samples (read, and the rejections before
    the filter: what the filter decides does not change what is mined, so a refilter keeps it) and the mining
    settings (not the guard: a decision, redone by refilter; not where it runs)."""
    h = hashlib.sha256()
    for shard in sorted(shards):
        stats = ShardStats.loads(store.read_bytes(f"stats/{shard}.json"))
        earlier = {k: v for k, v in stats.reasons.items() if not k.startswith("filter:")}
        h.update(json.dumps([shard, stats.read, earlier], sort_keys=True).encode())
    mining = spec.model_dump(mode="json", exclude={"guard": True, **placement_exclude(NegativesSpec)})
    h.update(json.dumps(mining, sort_keys=True).encode())
    return h.hexdigest()[:16]


def candidate_table(turns_of: ShardTurns, text: list[dict[str, Any]], scores: list[np.ndarray],
                    images: dict[str, Any]) -> pa.Table:
    """One shard's candidates (text ones turn by turn in rank order, then images sample by sample)."""
    keys = [turns_of.keys[i] for i in range(len(turns_of.keys))]
    cols: dict[str, list] = {f.name: [] for f in CANDIDATE_SCHEMA}
    for found, score in zip(text, scores):
        for r, sim, rank, src, src_i, t, sc in zip(found["row"], found["similarity"], found["rank"],
                                                   found["source"], found["source_i"], found["text"], score):
            positive = turns_of.targets[int(r)]
            cols["key"].append(keys[turns_of.sample[r]]), cols["i"].append(int(turns_of.turn[r]))
            cols["type"].append(TURN_TYPE_NAMES[turns_of.kind[r]]), cols["text"].append(t)
            cols["source"].append(src), cols["source_i"].append(src_i)
            cols["similarity"].append(float(sim)), cols["rank"].append(int(rank)), cols["score"].append(float(sc))
            cols["positive"].append(float(turns_of.positive[r]))
            cols["same_text"].append(same_answer(t, positive))
    for s, sim, rank, src, sc, pos in zip(images["sample"], images["similarity"], images["rank"],
                                          images["source"], images["score"], images["positive"]):
        cols["key"].append(keys[s]), cols["i"].append(None), cols["type"].append(IMAGE), cols["text"].append(None)
        cols["source"].append(src), cols["source_i"].append(None), cols["similarity"].append(float(sim))
        cols["rank"].append(int(rank)), cols["score"].append(float(sc)), cols["positive"].append(float(pos))
        cols["same_text"].append(False)
    cols["kept"] = [False] * len(cols["key"])
    cols["reason"] = [None] * len(cols["key"])
    table = pa.table(cols, schema=CANDIDATE_SCHEMA)
    order = sorted(range(table.num_rows), key=lambda n: (cols["key"][n], cols["type"][n] == IMAGE,
                                                          cols["i"][n] or 0, cols["rank"][n]))
    return table.take(pa.array(order, pa.int64()))


def run_negatives(cfg: Any, store: Store, shards: list[str], log: Callable[[str], None]) -> NegativesSummary:
    import ray

    from m3t_gen.run.recipe import init_ray

    spec: NegativesSpec = cfg.negatives
    init_ray(cfg)
    mark = fingerprint(store, shards, spec)
    _drop_stale(store, mark, log)
    done = {rel[len("negatives_stats/"):-len(".json")] for rel in store.files("negatives_stats", ".json")}
    todo = [s for s in sorted(shards) if s not in done]
    log(f"m3t-gen negatives: {len(shards)} shard(s), {len(todo)} to write (fingerprint {mark})")
    if todo:
        _mine_and_write(cfg, store, sorted(shards), todo, mark)
    return summary(store, shards)


def _mine_and_write(cfg: Any, store: Store, shards: list[str], todo: list[str], mark: str) -> None:
    """Every shard is embedded (all are candidates); the shards to write are mined, all tasks submitted at once,
    and written in order as their candidates arrive (one shard's on the driver at a time)."""
    import ray

    spec: NegativesSpec = cfg.negatives
    res = cfg.reward.resources
    actor = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus or None)(Embedder)
    embedders = [actor.remote(cfg.reward) for _ in range(max(1, res.concurrency))]
    stats = {s: ShardStats.loads(store.read_bytes(f"stats/{s}.json")) for s in shards}
    tars = {s: stats[s].tars for s in shards}
    made = [embedders[n % len(embedders)].shard.options(num_returns=2).remote(
        store, tars[s], stats[s].filtered_tars) for n, s in enumerate(shards)]
    bank = Bank([m[0] for m in made], np.stack(ray.get([m[1] for m in made])))
    index = {s: n for n, s in enumerate(shards)}
    submitted = submit_mining(bank, spec, _slack(cfg), [index[s] for s in todo])
    store.makedirs(*OUTPUTS)
    for shard in todo:
        n = index[shard]
        text_refs, image_ref = submitted.pop(n)
        text = ray.get(text_refs)
        images = ray.get(image_ref) if image_ref is not None else NO_IMAGES
        scorer = embedders[n % len(embedders)]
        scores = ray.get([scorer.score.remote(bank.refs[n], found["row"], found["text"]) for found in text])
        table = decide(candidate_table(ray.get(bank.refs[n]), text, scores, images), spec.guard)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(f"negatives/{shard}.parquet", buf.getvalue())
        attach_shard(store, shard, tars[shard], table, mark)
    for a in embedders:
        ray.kill(a)


def submit_mining(bank: Bank, spec: NegativesSpec, slack: int, shards: list[int]) -> dict[int, tuple[list, Any]]:
    """All the mining tasks of the given shards at once (Ray runs as many as the cluster has room for): per shard,
    one per turn type it has and one for its images (None without samples)."""
    import ray

    placed = dict(num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus or None)
    gpu = bool(spec.resources.num_gpus)
    text_task, image_task = ray.remote(**placed)(mine_text), ray.remote(**placed)(mine_images)
    return {n: ([text_task.remote(n, c, bank, spec, slack, gpu) for c in range(len(TURN_TYPE_NAMES))
                 if bank.counts[n, c]],
                image_task.remote(n, bank, spec, gpu) if bank.counts[n, -1] else None) for n in shards}


NO_IMAGES = {"sample": [], "similarity": [], "rank": [], "source": [], "score": [], "positive": []}


def _slack(cfg: Any) -> int:
    """How many of its own turns of one type a sample may have, beyond the one searched for."""
    return max(cfg.dialogue.mix.values(), default=1)


def _drop_stale(store: Store, mark: str, log: Callable[[str], None]) -> None:
    stale = stale_fingerprints(store, "negatives_stats", "fingerprint", mark)
    if stale:
        log(f"m3t-gen negatives: the samples or the mining changed since the negatives were written "
            f"({', '.join(sorted(stale))} -> {mark}): mined again")
        for sub in ("negatives_stats", "negatives"):  # the markers first
            store.remove(sub)


def negative_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {"text": row["text"], "source": row["source"], "source_i": row["source_i"], "kind": "mined",
           "similarity": round(row["similarity"], 6), "rank": row["rank"], "score": round(row["score"], 6)}
    return out if row["type"] != IMAGE else {k: out[k] for k in ("source", "kind", "similarity", "rank", "score")}


def attach_shard(store: Store, shard: str, tars: list[str], table: pa.Table, mark: str) -> NegativesStats:
    """Put the kept negatives into the shard's KEY.json (each tar rewritten whole, then committed), then the
    marker. Idempotent: a turn's ``negatives`` are replaced, never appended."""
    import webdataset as wds

    kept: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in table.filter(table.column("kept")).to_pylist():
        kept.setdefault((row["key"], row["i"]), []).append(negative_json(row))
    turns = with_negatives = 0
    for name in tars:
        rel = f"shards/{name}"
        with store.open(rel) as fh:
            samples = list(iter_tar(fh))
        with wds.TarWriter(str(store.staging(rel)), encoder=False, mtime=0) as sink:
            for key, jpg, meta in samples:
                for t in meta["turns"]:
                    t["negatives"] = kept.get((key, t["i"]), [])
                    turns += 1
                    with_negatives += bool(t["negatives"])
                meta["negative_images"] = kept.get((key, None), [])
                sink.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta, ensure_ascii=False).encode()})
        store.commit(rel)
    reasons = Counter(f"{t}:{r}" for t, r in zip(table.column("type").to_pylist(), table.column("reason").to_pylist())
                      if r is not None)
    types = table.column("type").to_pylist()
    kept_flags = table.column("kept").to_pylist()
    stats = NegativesStats(
        shard=shard, fingerprint=mark, candidates=table.num_rows,
        kept=sum(kept_flags), dropped=table.num_rows - sum(kept_flags),
        turns=turns, turns_with_negatives=with_negatives,
        kept_by_type=dict(sorted(Counter(t for t, k in zip(types, kept_flags) if k).items())),
        candidates_by_type=dict(sorted(Counter(types).items())), reasons=dict(sorted(reasons.items())))
    assert stats.candidates == stats.kept + stats.dropped, stats
    store.write_bytes(f"negatives_stats/{shard}.json", stats.dumps())  # marker, last
    return stats


def attach(source: Store, target: Store, guard: NegativeGuardSpec) -> NegativesSummary | None:
    """Re-decide every candidate recorded in ``source`` under ``guard`` and write the decisions, the shards' tars
    (those in ``target``) and the markers into ``target`` (refilter builds its new output there). None when the run
    mined no negatives. Every written turn was mined for, so the turns a new filter keeps find theirs."""
    shards = sorted(rel[len("negatives_stats/"):-len(".json")] for rel in source.files("negatives_stats", ".json"))
    if not shards:
        return None
    target.makedirs(*OUTPUTS)
    for shard in shards:
        old = NegativesStats.loads(source.read_text(f"negatives_stats/{shard}.json"))
        table = decide(pq.read_table(io.BytesIO(source.read_bytes(f"negatives/{shard}.parquet")),
                                     schema=CANDIDATE_SCHEMA), guard)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        target.write_bytes(f"negatives/{shard}.parquet", buf.getvalue())
        tars = ShardStats.loads(target.read_text(f"stats/{shard}.json")).tars
        attach_shard(target, shard, tars, table, old.fingerprint)
    return summary(target, shards)


def summary(store: Store, shards: list[str]) -> NegativesSummary:
    return NegativesSummary.of([NegativesStats.loads(store.read_text(f"negatives_stats/{s}.json")) for s in sorted(shards)
                                if store.exists(f"negatives_stats/{s}.json")])
