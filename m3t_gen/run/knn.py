"""Exact top-k inner-product search over a bank streamed in tiles: the kernel of distributed pair mining.

The cost of exact all-pairs search is one matrix product (2*N^2*d FLOP), so it runs as tiled matrix products
(torch: on a GPU when the task has one, else on the CPU's BLAS), keeping per query a short list of candidates.
Tiles can be multiplied in bfloat16 (several times fp32's rate on GPUs and on CPUs with AVX-512 bf16 or AMX) and
still give exactly the answer of an exact search:

- the "fast" score (the tile product) is within a bound of the exact one, computed per query from the actual
  rounding residuals of its vector and the bank's (Cauchy-Schwarz), the fp32 accumulation and the rounding of
  the product's output (``TopK.bound``): about 0.006 for unit vectors in bf16, 5e-5 in fp32;
- pass 1: each query keeps the best ``c = k + margin`` bank rows by fast score. A tile costs its product and
  one cheap pass: the maximum of each run of 128 scores, compared with the list's last fast score (``tau``);
  only the few runs above it are looked into and merged (a full top-c only on a query's first tile);
- pass 2 streams the bank again and re-scores the final candidates exactly (float64 dot products rounded to
  float32: the same value for the same two vectors wherever they meet), c per query, no matrix product;
- a query is certified when its k-th exact score among the candidates is above ``tau + bound``: every row outside
  the list has a fast score <= tau, so an exact one below the k-th, so the top k are all candidates. Rows that
  cannot be certified (dense near-ties) are searched again one rung up the ladder bf16 -> fp32 -> float64 (the
  last scores every pair exactly and needs no certificate), so the result never depends on the precision, only
  the speed does.

Order is (score descending, bank index ascending): ties go to the lower index, the same rule on every device
and tile size. The query's own index is excluded (an image is not its own neighbour).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0 ** -24
LADDER = ("bf16", "fp32", "float64")
NO_INDEX = np.iinfo(np.int64).max

Tiles = Callable[[], Iterable[tuple[int, np.ndarray]]]  # called once per pass: yields (bank offset, rows)


def default_margin(k: int) -> int:
    """Candidates kept beyond k: enough that bf16's bound certifies ~all rows of CLIP-like data (measured on
    synthetic CLIP-like embeddings at 100K, k=20: 96 candidates certified every row, 48 only 93 %)."""
    return max(64, 4 * k)


def device_for(use_gpu: bool) -> str:
    import torch

    if use_gpu and torch.cuda.is_available():
        # The bounds assume fp32 accumulation: no split-K reductions in bf16, no TF32 for fp32 products.
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return "cuda"
    return "cpu"


def reduced_precision_pays(device: str) -> bool:
    """bf16 tiles where they are fast: GPUs, and CPUs with AMX or AVX-512 bf16 (oneDNN's bf16 kernels); elsewhere
    bf16 is emulated and slower than fp32."""
    if device != "cpu":
        return True
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class TopK:
    """One pass of the search at one precision: the candidates of each query, merged tile after tile."""

    ROWS = 2048  # queries per product: [ROWS, tile] scores at once

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int, *, device: str = "cpu",
                 precision: str = "fp32", margin: int | None = None) -> None:
        import torch

        if precision not in LADDER:
            raise ValueError(f"precision must be one of {LADDER}, not {precision!r}")
        self.torch = torch
        self.device, self.k, self.precision = device, k, precision
        self.low = torch.bfloat16 if precision == "bf16" else torch.float32
        self.c = k if precision == "float64" else k + (default_margin(k) if margin is None else margin)
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=device)
        self.q64 = q.double()
        self.q_fast = q.to(self.low)
        self.ids = torch.as_tensor(np.asarray(query_ids, dtype=np.int64), device=device)
        n, self.dim = q.shape
        # The list, sorted by fast score (float64: the answer itself, sorted by score then index).
        self.fast = torch.full((n, self.c), -float("inf"), dtype=torch.float32, device=device)
        self.exact = torch.full((n, self.c), -float("inf"), dtype=torch.float32, device=device)
        self.index = torch.full((n, self.c), NO_INDEX, dtype=torch.int64, device=device)
        fast64 = self.q_fast.double()
        self.q_norm, self.q_fast_norm = self.q64.norm(dim=1), fast64.norm(dim=1)
        self.q_resid = (fast64 - self.q64).norm(dim=1)
        self.t_norm = self.t_fast_norm = self.t_resid = 0.0  # maxima over the bank rows seen
        self._gather = None
        self._out = None

    # ------------------------------------------------------------------------------------------ streaming

    def add(self, offset: int, tile: np.ndarray) -> None:
        """Pass 1: merge bank rows ``offset .. offset + len(tile)`` (fp32, [t, d]) into the lists by fast score."""
        torch = self.torch
        t = torch.as_tensor(np.ascontiguousarray(tile, dtype=np.float32), device=self.device)
        cols = torch.arange(offset, offset + len(t), device=self.device)
        if self.precision == "float64":
            t64 = t.double()
            for start in range(0, len(self.ids), self.ROWS):
                self._add_exact(slice(start, start + self.ROWS), t64, cols)
            return
        t_fast = t.to(self.low)
        self._note_bank(t, t_fast)
        for start in range(0, len(self.ids), self.ROWS):
            rows = slice(start, start + self.ROWS)
            scores = self._product(self.q_fast[rows], t_fast)
            ids = self.ids[rows]
            if ids[0] <= cols[-1] and cols[0] <= ids[-1]:  # the tile holds some of these queries
                scores = self._mask(scores, ids, cols)
            entered = self._entering(scores, self.fast[rows, -1])
            if entered is not None:
                self._merge(rows, *entered, cols)

    def _product(self, q, t):
        """q @ t.T into one reused buffer (a fresh [ROWS, tile] tensor per product costs page faults)."""
        torch = self.torch
        size = len(q) * len(t)
        if self._out is None or self._out.numel() < size:
            self._out = torch.empty(size, dtype=self.low, device=self.device)
        return torch.mm(q, t.T, out=self._out[:size].view(len(q), len(t)))

    def rescore(self, offset: int, tile: np.ndarray) -> None:
        """Pass 2: the exact scores of the candidates that lie in this tile (each candidate once, at the end:
        far fewer than the elements that entered a list on the way)."""
        if self.precision == "float64":
            return
        torch = self.torch
        t = torch.as_tensor(np.ascontiguousarray(tile, dtype=np.float32), device=self.device)
        inside = (self.index >= offset) & (self.index < offset + len(t))
        r, j = inside.nonzero(as_tuple=True)
        pos = self.index[r, j] - offset
        # Preallocated gathers, reused chunk after chunk: fresh [m, d] float64 temporaries cost more in page
        # faults than the arithmetic.
        if self._gather is None:
            self._gather = tuple(torch.empty((self.RESCORE, self.dim), dtype=dt, device=self.device)
                                 for dt in (torch.float32, torch.float64, torch.float64))
        rows32, rows64, q64 = self._gather
        for s in range(0, len(r), self.RESCORE):
            rr, pp = r[s:s + self.RESCORE], pos[s:s + self.RESCORE]
            m = len(rr)
            torch.index_select(t, 0, pp, out=rows32[:m])
            rows64[:m].copy_(rows32[:m])
            torch.index_select(self.q64, 0, rr, out=q64[:m])
            self.exact[rr, j[s:s + self.RESCORE]] = q64[:m].mul_(rows64[:m]).sum(dim=1).float()

    RESCORE = 8192  # candidates re-scored at once: bounds the [m, d] float64 gathers

    def _note_bank(self, t, t_fast) -> None:
        """The bank's largest norms and rounding residual, in fp32 (t~ - t is exact: Sterbenz), scaled up by
        far more than fp32's error in a d-term norm."""
        fast = t_fast.float()
        up = 1 + 4 * self.dim * U_FP32
        self.t_norm = max(self.t_norm, float(t.norm(dim=1).max()) * up)
        self.t_fast_norm = max(self.t_fast_norm, float(fast.norm(dim=1).max()) * up)
        self.t_resid = max(self.t_resid, float((fast - t).norm(dim=1).max()) * up)

    def _entering(self, scores, tau):
        """The tile's elements with a fast score above their query's ``tau`` (at most ``c`` per query, the best):
        ([rows, m] fast scores, [rows, m] positions in the tile), -inf where fewer; None when nothing enters.
        Queries whose list is not full yet (the first tile) take the tile's top c. For the others, one pass
        takes the maximum of each run of ``BLOCK`` scores, and only runs above tau are looked into: after the
        first tiles, a handful per query."""
        torch = self.torch
        n = len(scores)
        fresh = ~torch.isfinite(tau)
        if bool(fresh.all()):
            return self._best(scores, torch.arange(n, device=self.device), n)
        r, j = self._above(scores, tau, fresh)
        counts = torch.bincount(r, minlength=n)
        heavy = (counts > self.c) | fresh
        if bool(heavy.any()):
            out = self._best(scores, heavy.nonzero().squeeze(1), n)
            keep = ~heavy[r]
            r, j = r[keep], j[keep]
            counts[heavy] = 0
        else:
            if not len(r):
                return None
            m = int(counts.max())
            out = (torch.full((n, m), -float("inf"), dtype=torch.float32, device=self.device),
                   torch.zeros((n, m), dtype=torch.int64, device=self.device))
        slot = torch.arange(len(r), device=self.device) - (torch.cumsum(counts, 0) - counts)[r]
        out[0][r, slot] = scores[r, j].float()
        out[1][r, slot] = j
        return out

    BLOCK = 128  # scores per run in the block-maximum pre-pass

    def _above(self, scores, tau, fresh):
        """(query, position) of every score > its query's tau, grouped by query, ascending; fresh rows none."""
        torch = self.torch
        n, t = scores.shape
        runs = t // self.BLOCK
        width = runs * self.BLOCK
        blocks = scores[:, :width].reshape(n, runs, self.BLOCK)
        tau_s = tau.to(scores.dtype)
        if scores.dtype == torch.bfloat16 and bool((tau_s >= 0).all()):
            # Non-negative bf16 values order as their bits do as int16 (negative ones below all of them): the
            # maximum of each run over the int16 view is several times cheaper than over bf16 and, as tau >= 0,
            # says exactly whether the run holds a score above tau.
            hot = blocks.view(torch.int16).amax(dim=2) > tau_s.view(torch.int16)[:, None]
        else:
            hot = blocks.amax(dim=2) > tau_s[:, None]
        hot[fresh] = False
        hr, hb = hot.nonzero(as_tuple=True)
        h, o = (blocks[hr, hb] > tau_s[hr, None]).nonzero(as_tuple=True)
        r, j = hr[h], hb[h] * self.BLOCK + o
        if width < t:  # the tile's last, partial run
            tail = scores[:, width:] > tau_s[:, None]
            tail[fresh] = False
            tr, tj = tail.nonzero(as_tuple=True)
            r, j = torch.cat([r, tr]), torch.cat([j, tj + width])
            order = torch.argsort(r, stable=True)
            r, j = r[order], j[order]
        return r, j

    def _best(self, scores, rows, n):
        """[n, c] buffers holding the top c of ``rows`` (the rest -inf, for the comparison path to fill)."""
        torch = self.torch
        m = min(self.c, scores.shape[1])
        if len(rows) == n:  # the first tile: every query, no gather
            vals, pos = torch.topk(scores, m, dim=1)
            return vals.float(), pos
        vals = torch.full((n, m), -float("inf"), dtype=torch.float32, device=self.device)
        pos = torch.zeros((n, m), dtype=torch.int64, device=self.device)
        top_v, pos[rows] = torch.topk(scores[rows], m, dim=1)
        vals[rows] = top_v.float()
        return vals, pos

    def _merge(self, rows, vals, pos, cols) -> None:
        """Keep the best ``c`` of list + entering, by fast score."""
        torch = self.torch
        index = torch.where(torch.isfinite(vals), cols[pos], NO_INDEX)
        keep_fast, keep = torch.topk(torch.cat([self.fast[rows], vals], dim=1), self.c, dim=1)
        self.index[rows] = torch.gather(torch.cat([self.index[rows], index], dim=1), 1, keep)
        self.fast[rows] = keep_fast

    def _add_exact(self, rows, t64, cols) -> None:
        """float64 rung: every pair scored exactly, merged by (score desc, index asc); nothing to certify."""
        torch = self.torch
        full = self._mask((self.q64[rows] @ t64.T).float(), self.ids[rows], cols)
        vals, idx = self._top(full, cols)
        self.exact[rows], self.index[rows] = self._ordered(torch.cat([self.exact[rows], vals], dim=1),
                                                           torch.cat([self.index[rows], idx], dim=1), self.k)

    # ------------------------------------------------------------------------------------------ answers

    def bound(self, tau):
        """Per query: the most an exact score can exceed a fast score <= ``tau`` (all non-negative terms):
        the inputs' rounding |q~.t~ - q.t| <= |q~| |t~ - t| + |q~ - q| |t|, fp32 accumulation of d products,
        bf16 rounding of the product's output (|fast| u / (1 - u), largest at tau), and the exact score's own
        rounding to float32."""
        torch = self.torch
        gamma = (self.dim + 2) * U_FP32 * 1.01
        b = (self.q_fast_norm * self.t_resid + self.q_resid * self.t_norm
             + gamma * self.q_fast_norm * self.t_fast_norm + 2 * U_FP32 * self.q_norm * self.t_norm)
        if self.precision == "bf16":
            b = b + tau.double().abs() * (U_BF16 / (1 - U_BF16))
        return b.to(torch.float64)

    def _answer(self):
        return self._ordered(self.exact, self.index, self.k)

    def unsure(self) -> np.ndarray:
        """Positions of the queries whose top k the candidates cannot certify (redo them one rung up)."""
        if self.precision == "float64":
            return np.zeros(0, dtype=np.int64)
        torch = self.torch
        scores, _ = self._answer()
        tau = self.fast[:, -1]
        full = torch.isfinite(tau)  # the list holds fewer than c: nothing was left outside it
        kth = scores[:, -1].double()
        sure = ~full | (kth > tau.double() + self.bound(tau))
        return (~sure).nonzero().squeeze(1).cpu().numpy()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """([q, k] fp32 scores, [q, k] int64 bank indices); -inf / -1 where the bank had fewer than k others.
        Rows listed by ``unsure()`` are not answers."""
        scores, index = self._answer()
        scores, index = scores.cpu().numpy(), index.cpu().numpy()
        index[~np.isfinite(scores)] = -1
        return scores, index

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _exact(q64, cand64):
        """Dot products of query rows with their candidate rows ([m, d] x [m, d] -> [m]) in float64, rounded to
        float32: the same value for the same two vectors wherever they meet (an fp32 matrix product rounds
        differently by tile position; float64 kernels differ only far below float32's last bit)."""
        return (q64 * cand64).sum(dim=1).float()

    @staticmethod
    def _mask(scores, ids, cols):
        """-inf (in place) where a query meets itself: at most one element per row (``cols`` is a range)."""
        r = ((ids >= cols[0]) & (ids <= cols[-1])).nonzero().squeeze(1)
        scores[r, ids[r] - cols[0]] = -float("inf")
        return scores

    def _top(self, scores, cols):
        """The best k of a [q, t] block of scores, with every element tied with the k-th (topk picks among
        ties arbitrarily; the index rule decides in _ordered)."""
        torch = self.torch
        k = min(self.k, scores.shape[1])
        vals, pos = torch.topk(scores, k, dim=1)
        ties = int((scores == vals[:, -1:]).sum(dim=1).max().item())
        if ties > 1:
            vals, pos = torch.topk(scores, min(scores.shape[1], k + ties), dim=1)
        return vals, cols[pos]

    def _ordered(self, vals, idx, k):
        """The best k of each row: score descending, index ascending on ties."""
        torch = self.torch
        by_idx = torch.argsort(idx, dim=1)
        vals, idx = torch.gather(vals, 1, by_idx), torch.gather(idx, 1, by_idx)
        by_score = torch.argsort(-vals, dim=1, stable=True)
        return (torch.gather(vals, 1, by_score)[:, :k].contiguous(),
                torch.gather(idx, 1, by_score)[:, :k].contiguous())


def exact_topk(queries: np.ndarray, query_ids: np.ndarray, tiles: Tiles, k: int, *, device: str = "cpu",
               precision: str = "fp32", margin: int | None = None,
               passes: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact best ``k`` bank rows per query (self excluded): a pass at ``precision`` over ``tiles()``, then the
    rows it could not certify again one rung up the ladder. ``passes`` (if given) receives the queries each rung
    searched."""
    n = len(queries)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    index = np.full((n, k), -1, dtype=np.int64)
    todo = np.arange(n)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    for rung in LADDER[LADDER.index(precision):]:
        if passes is not None:
            passes[rung] = len(todo)
        top = TopK(queries[todo], query_ids[todo], k, device=device, precision=rung, margin=margin)
        for offset, tile in tiles():
            top.add(offset, tile)
        for offset, tile in tiles():
            top.rescore(offset, tile)
        got_v, got_i = top.result()
        unsure = top.unsure()
        sure = np.setdiff1d(np.arange(len(todo)), unsure)
        scores[todo[sure]], index[todo[sure]] = got_v[sure], got_i[sure]
        todo = todo[unsure]
        if not len(todo):
            break
    return scores, index


def tiles_of(bank: np.ndarray, rows: int) -> Tiles:
    """The bank in tiles of ``rows`` (views, no copies), as a re-iterable source for ``exact_topk``."""
    def tiles() -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(bank), rows):
            yield start, bank[start:start + rows]

    return tiles
