"""Exact top-k inner-product search over a bank streamed in tiles: the kernel of distributed pair mining.

The cost of exact all-pairs search is one matrix product (2*N^2*d FLOP), so it runs as tiled matrix products
(torch: on a GPU when the task has one, else on the CPU's BLAS/AMX), keeping per query only its best k. Tiles can
be multiplied in bfloat16 (several times fp32's rate on GPUs and on CPUs with AMX) and still give exactly the
fp32 answer:

- every bf16 score is within ``bf16_bound(d)`` of the exact one (unit vectors; inputs rounded to 8 bits of
  mantissa: |q~.t~ - q.t| <= 2u + u^2 by Cauchy-Schwarz, the bf16 result rounded once more: + u; fp32
  accumulation adds d * 2^-24; u = 2^-8);
- per tile, the top ``k + margin`` by bf16 score are re-scored in fp32; an element outside them has a bf16 score
  <= the last one's, so an fp32 score <= that + the bound. When the query's k-th best fp32 score so far is above
  that, the tile cannot change its answer; otherwise (a tile dense with near-ties) that query's row of the tile is
  scored in fp32 in full. So the result never depends on the precision, only the speed does.

Order is (score descending, bank index ascending): ties go to the lower index, the same rule on every device
and tile size. The query's own index is excluded (an image is not its own neighbour).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

U_BF16 = 2.0 ** -8


def bf16_bound(dim: int) -> float:
    """Largest |bf16 score - fp32 score| for unit vectors of ``dim`` dimensions (see the module docstring)."""
    return 3 * U_BF16 + U_BF16 ** 2 + dim * 2.0 ** -24 + 2.0 ** -23


def fp32_bound(dim: int) -> float:
    """Largest |fp32 matrix-product score - exact score| for unit vectors (accumulation error)."""
    return dim * 2.0 ** -23 + 2.0 ** -23  # + the final rounding of the float64 score to float32


def device_for(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


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
    """The running best ``k`` (fp32 score, bank index) of each query, merged tile after tile."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int, *, device: str = "cpu",
                 bf16: bool = False, margin: int = 32) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.k = k
        self.margin = margin
        self.bf16 = bf16
        self.q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=device)
        self.q_low = self.q.to(torch.bfloat16) if bf16 else None
        self.q64 = self.q.double()
        self.ids = torch.as_tensor(np.asarray(query_ids, dtype=np.int64), device=device)
        n = len(queries)
        self.scores = torch.full((n, k), -float("inf"), dtype=torch.float32, device=device)
        self.index = torch.full((n, k), np.iinfo(np.int64).max, dtype=torch.int64, device=device)
        self.fp32_bound = fp32_bound(queries.shape[1])
        self.bound = bf16_bound(queries.shape[1]) if bf16 else self.fp32_bound
        self.fallback_rows = 0  # rows of a tile bf16 could not certify (redone with the fp32 product)

    def add(self, offset: int, tile: np.ndarray) -> None:
        """Merge bank rows ``offset .. offset + len(tile)`` (fp32, [t, d])."""
        torch = self.torch
        t = torch.as_tensor(np.ascontiguousarray(tile, dtype=np.float32), device=self.device)
        t_low = t.to(torch.bfloat16) if self.bf16 else None
        t64 = t.double()  # once per tile: the re-scores of every query chunk gather from it
        cols = torch.arange(offset, offset + len(t), device=self.device)
        for start in range(0, len(self.q), self.ROWS):
            rows = slice(start, start + self.ROWS)
            v, i = self._tile_rows(rows, t, t_low, t64, cols)
            self.scores[rows], self.index[rows] = v, i

    ROWS = 1024  # queries per step: bounds the [rows, k + margin, d] gather of the fp32 re-score

    def _tile_rows(self, rows, t, t_low, t64, cols):
        """The new best k of query rows ``rows`` after this tile: candidates by the fast product (bf16 when
        set), certified; rows it cannot certify go through the fp32 product, and only if that cannot either,
        through float64 in full."""
        q, ids = self.q[rows], self.ids[rows]
        cur_v, cur_i = self.scores[rows], self.index[rows]
        if t_low is None:
            return self._certified(q, self.q64[rows], ids, cur_v, cur_i, q @ t.T, self.fp32_bound, t, t64, cols)
        v, i, unsure = self._candidates(self.q64[rows], ids, cur_v, cur_i, self.q_low[rows] @ t_low.T, self.bound,
                                        t64, cols)
        if len(unsure):
            self.fallback_rows += len(unsure)
            v[unsure], i[unsure] = self._certified(q[unsure], self.q64[rows][unsure], ids[unsure], cur_v[unsure],
                                                   cur_i[unsure], q[unsure] @ t.T, self.fp32_bound, t, t64, cols)
        return v, i

    def _certified(self, q, q64, ids, cur_v, cur_i, fast, bound, t, t64, cols):
        v, i, unsure = self._candidates(q64, ids, cur_v, cur_i, fast, bound, t64, cols)
        if len(unsure):  # an fp32 product could not tell either: float64 for the whole row
            full = self._mask((q64[unsure] @ t64.T).float(), ids[unsure], cols)
            v[unsure], i[unsure] = self._merged(cur_v[unsure], cur_i[unsure], *self._top(full, cols))
        return v, i

    def _candidates(self, q64, ids, cur_v, cur_i, fast, bound, t64, cols):
        """Merge the top ``k + margin`` of a fast score block, re-scored exactly; and the rows whose answer they
        cannot certify."""
        torch = self.torch
        if ids[0] <= cols[-1] and cols[0] <= ids[-1]:  # the tile holds some of these queries: never their own match
            fast = self._mask(fast, ids, cols)
        c = min(self.k + self.margin, len(cols))
        f_vals, f_pos = torch.topk(fast, c, dim=1)
        f_vals = f_vals.float()
        # Re-score only candidates that can still enter: a fast score below the current k-th best minus the bound
        # means an exact one strictly below it (most of them, once the first tiles have set the bar).
        need = (f_vals >= (cur_v[:, -1:] - bound)) & torch.isfinite(f_vals)
        r, j = need.nonzero(as_tuple=True)
        exact = torch.full_like(f_vals, -float("inf"))
        exact[r, j] = self._exact(q64[r], t64[f_pos[r, j]])
        v, i = self._merged(cur_v, cur_i, exact, cols[f_pos])
        if c == len(cols):
            return v, i, r[:0]
        # Certified when nothing outside the c candidates can reach the k-th best: its score is at most the c-th
        # fast score + bound. An equal score would need the index rule, so only a strictly higher k-th is safe.
        return v, i, (~(v[:, -1] > f_vals[:, -1] + bound)).nonzero().squeeze(1)

    @staticmethod
    def _exact(q64, cand64):
        """Dot products of query rows with their candidate rows ([m, d] x [m, d] -> [m]) in float64, rounded to
        float32: the same value for the same two vectors wherever they meet (an fp32 matrix product rounds
        differently by tile position; float64 kernels differ only far below float32's last bit)."""
        return (q64 * cand64).sum(dim=1).float()

    @staticmethod
    def _mask(scores, ids, cols):
        return scores.masked_fill(ids[:, None] == cols[None, :], -float("inf"))

    def _top(self, scores, cols):
        """The best k of a [q, t] block of scores, with every element tied with the k-th (topk picks among
        ties arbitrarily; the index rule decides in _merged)."""
        torch = self.torch
        k = min(self.k, scores.shape[1])
        vals, pos = torch.topk(scores, k, dim=1)
        ties = int((scores == vals[:, -1:]).sum(dim=1).max().item())
        if ties > 1:
            vals, pos = torch.topk(scores, min(scores.shape[1], k + ties), dim=1)
        return vals, cols[pos]

    def _merged(self, cur_v, cur_i, vals, idx):
        """Best k of the running list and a tile's candidates: score descending, index ascending on ties."""
        torch = self.torch
        both_v, both_i = torch.cat([cur_v, vals], dim=1), torch.cat([cur_i, idx], dim=1)
        by_idx = torch.argsort(both_i, dim=1)
        both_v, both_i = torch.gather(both_v, 1, by_idx), torch.gather(both_i, 1, by_idx)
        by_score = torch.argsort(-both_v, dim=1, stable=True)
        return (torch.gather(both_v, 1, by_score)[:, :self.k].contiguous(),
                torch.gather(both_i, 1, by_score)[:, :self.k].contiguous())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """([q, k] fp32 scores, [q, k] int64 bank indices); -inf / -1 where the bank had fewer than k others."""
        scores = self.scores.cpu().numpy()
        index = self.index.cpu().numpy()
        index[~np.isfinite(scores)] = -1
        return scores, index


def exact_topk(queries: np.ndarray, query_ids: np.ndarray, tiles: Iterable[tuple[int, np.ndarray]], k: int,
               **options) -> tuple[np.ndarray, np.ndarray]:
    """Exact best ``k`` bank rows per query (self excluded) over ``(offset, rows)`` tiles of the bank."""
    top = TopK(queries, query_ids, k, **options)
    for offset, tile in tiles:
        top.add(offset, tile)
    return top.result()


def tiles_of(bank: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(bank), rows):
        yield start, bank[start:start + rows]
