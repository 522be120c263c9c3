"""dedupe: reject exact (same bytes) and near (perceptual hash within a Hamming distance) duplicates seen
earlier in the run. One actor holds the run's hash index (hashes are computed in parallel by `read`); on resume
it is seeded from the index parquet of the shards already done, so a duplicate across a restart is still caught.

Near-duplicates use multi-index hashing: with distance d the 64-bit hash splits into d+1 chunks, and any two
hashes within distance d agree exactly on at least one chunk (pigeonhole), so only hashes sharing a chunk are
compared. Memory is about 200 bytes per kept image (5M images: ~1 GB in this actor).
Which copy of a duplicate pair survives is the one that reached this actor first.
"""

from __future__ import annotations

from typing import Any

from m3t_gen.config import DedupeSpec, PipelineConfig, Resources
from m3t_gen.rows import reject
from m3t_gen.storage.store import Store
from m3t_gen.stages.base import RunContext, Stage


class HashIndex:
    def __init__(self, spec: DedupeSpec) -> None:
        self.spec = spec
        self.exact: dict[str, str] = {}
        chunks = spec.max_distance + 1
        bounds = [round(i * 64 / chunks) for i in range(chunks + 1)]
        self.slices = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(bounds, bounds[1:])]
        self.buckets: dict[tuple[int, int], list[int]] = {}
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def find(self, sha: str | None, phash: str | None) -> tuple[str, str, int] | None:
        """(kind, key it duplicates, distance) or None."""
        if self.spec.exact and sha and sha in self.exact:
            return "exact", self.exact[sha], 0
        if self.spec.perceptual and phash:
            h = int(phash, 16)
            best: tuple[int, int] | None = None
            for i, (shift, mask) in enumerate(self.slices):
                for j in self.buckets.get((i, (h >> shift) & mask), ()):
                    d = (h ^ self.hashes[j]).bit_count()
                    if d <= self.spec.max_distance and (best is None or d < best[0]):
                        best = (d, j)
            if best is not None:
                return "perceptual", self.keys[best[1]], best[0]
        return None

    def add(self, key: str, sha: str | None, phash: str | None) -> None:
        if sha:
            self.exact.setdefault(sha, key)
        if phash and self.spec.perceptual:
            h = int(phash, 16)
            j = len(self.hashes)
            self.hashes.append(h)
            self.keys.append(key)
            for i, (shift, mask) in enumerate(self.slices):
                self.buckets.setdefault((i, (h >> shift) & mask), []).append(j)


class DedupeStage(Stage):
    name = "dedupe"
    section = "read.dedupe"

    @classmethod
    def resources(cls, config: PipelineConfig) -> Resources:
        # One actor: the index is the run's. Hash lookups are cheap next to decoding, done in `read`.
        return Resources(batch_size=256, concurrency=1, num_gpus=0, num_cpus=0.25)

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.read.dedupe.exact or config.read.dedupe.perceptual

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.index = HashIndex(ctx.config.read.dedupe)
        self._seed_from_finished_shards(Store(ctx.config.output.dir))

    def _seed_from_finished_shards(self, store: Store) -> None:
        """Everything that passed dedupe in finished shards: kept samples and those rejected after this stage
        (a clean run had indexed them too), in key order as a clean run would have met them."""
        import io

        import pyarrow.parquet as pq

        def table(rel: str, **kw: Any) -> list[dict[str, Any]]:
            return pq.read_table(io.BytesIO(store.read_bytes(rel)), **kw).to_pylist()

        seen = []
        for rel in store.files("stats", ".json"):  # local folder or object storage alike
            shard = rel[len("stats/"):-len(".json")]
            seen += table(f"index/{shard}.parquet", columns=["key", "source_sha256", "phash"])
            rejects = table(f"rejects/{shard}.parquet")
            seen += [r for r in rejects if r["stage"] not in ("read", self.name)]
        for rec in sorted(seen, key=lambda r: r["key"]):
            self.index.add(rec["key"], rec["source_sha256"], rec["phash"])

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row in sorted(rows, key=lambda r: r["key"]):  # deterministic within a batch
            hit = self.index.find(row["source_sha256"], row["phash"])
            if hit:
                kind, of, distance = hit
                reject(row, self.name, "duplicate", kind=kind, duplicate_of=of, distance=distance)
            else:
                self.index.add(row["key"], row["source_sha256"], row["phash"])
