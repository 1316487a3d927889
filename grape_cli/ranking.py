"""Where a target lands in a ranking: the one definition every number in grape uses.

The reward, `grape eval`, the held-out score that picks a checkpoint, the ranks that
`grape search` prints and the bundled example all call this module, so a "rank 3" means
the same thing everywhere.

The tie rule is pessimistic: an image whose score is within `TIE_TOL` of the target's
counts as ranked above it. A rewrite that makes everything score alike (an empty text,
a zero embedding) therefore ranks its target last, not first: the rule a reward cannot
game. With several correct targets the best-ranked one counts, and the other targets
never count against it.

Ranks are exact over the whole corpus (one matmul per corpus chunk), or, with
`negatives=K`, among K sampled rows plus the target: the approximation for corpora too
large to score every step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# float32 dot products of unit vectors differ by ~1e-7 between matmul shapes (a batch of
# one and a batch of 64 do not agree to the last bit); closer scores are ties.
TIE_TOL = 1e-6
DEFAULT_CHUNK = 65_536
KS = (1, 5, 10)
RRF_K = 60  # the constant of Cormack et al. (2009); damps the weight of the very top ranks


@dataclass
class Scores:
    """Where each query's best target landed. All tensors have one entry per query."""

    ranks: torch.Tensor  # 1-based rank of the best target among the candidates (int64)
    target_sim: torch.Tensor  # cosine between the query and its best target
    top_sim: torch.Tensor  # mean cosine of the top-k non-target candidates (nan if none)
    n: int  # candidates per query: the corpus size, or K + 1 with sampled negatives


def _target_matrix(targets: Sequence[Sequence[int]], n: int, device) -> torch.Tensor:
    """Ragged target lists as a (B, T) long tensor padded with -1; checks the range."""
    import torch

    if any(len(t) == 0 or min(t) < 0 for t in targets):
        raise ValueError("every query needs at least one target, given as corpus rows >= 0")
    width = max((len(t) for t in targets), default=1)
    out = torch.full((len(targets), width), -1, dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    if len(targets) and int(out.max()) >= n:
        raise ValueError(f"target row {int(out.max())} is outside a corpus of {n} images")
    return out.to(device)


def score_targets(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    targets: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    negatives: int | None = None,
    top_k: int = 10,
    generator: torch.Generator | None = None,
) -> Scores:
    """Rank of each query's best target among the rows of `corpus` (see the module doc).

    `queries` (B, d) and `corpus` (N, d) are L2-normalised; `targets[i]` lists the
    corpus rows that are correct for query i.

    >>> import torch
    >>> corpus = torch.eye(4)
    >>> q = torch.nn.functional.normalize(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), dim=1)
    >>> score_targets(q, corpus, [[2]]).ranks.tolist()
    [3]
    >>> score_targets(q, corpus, [[2, 1]]).ranks.tolist()  # several targets: the best
    [2]
    >>> score_targets(torch.zeros(1, 4), corpus, [[0]]).ranks.tolist()  # all tied: last
    [4]
    """
    import torch

    queries = queries.to(corpus.device, corpus.dtype)
    n_rows, batch = corpus.shape[0], queries.shape[0]
    tmat = _target_matrix(targets, n_rows, corpus.device)
    valid = tmat >= 0
    tvec = corpus[tmat.clamp(min=0)]  # (B, T, d)
    tsims = torch.einsum("bd,btd->bt", queries, tvec).masked_fill(~valid, -math.inf)
    target_sim = tsims.max(dim=1).values
    threshold = (target_sim - TIE_TOL).unsqueeze(1)

    if negatives:
        idx = torch.randint(n_rows, (negatives,), generator=generator).to(corpus.device)
        sims = queries @ corpus[idx].T
        hit = (idx.view(1, 1, -1) == tmat.unsqueeze(2)).any(dim=1)  # drew a target
        chunks, n = [sims.masked_fill(hit, -math.inf)], negatives + 1
    else:
        rows, cols = valid.nonzero(as_tuple=True)
        chunks = _masked_chunks(queries, corpus, rows, tmat[rows, cols], chunk_size)
        n = n_rows

    above = torch.zeros(batch, dtype=torch.long, device=corpus.device)
    tops = []
    for sims in chunks:
        above += (sims >= threshold).sum(dim=1)
        if top_k:
            tops.append(sims.topk(min(top_k, sims.shape[1]), dim=1).values)
    top_sim = torch.full((batch,), torch.nan, device=corpus.device)
    if tops:
        best = torch.cat(tops, dim=1)
        best = best.topk(min(top_k, best.shape[1]), dim=1).values
        top_sim = torch.where(torch.isfinite(best), best, torch.nan).nanmean(dim=1)
    return Scores(ranks=above + 1, target_sim=target_sim, top_sim=top_sim, n=n)


def _masked_chunks(queries, corpus, rows, cols, chunk_size: int):
    """Score matrices of consecutive corpus chunks with every target entry set to -inf."""
    import torch

    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    for start in range(0, corpus.shape[0], chunk_size):
        sims = queries @ corpus[start : start + chunk_size].T
        inside = (cols >= start) & (cols < start + sims.shape[1])
        sims[rows[inside], cols[inside] - start] = -torch.inf
        yield sims


def target_ranks(
    query_vecs: np.ndarray, corpus: np.ndarray, targets: Sequence[Sequence[int]]
) -> np.ndarray:
    """`score_targets(...).ranks` for numpy arrays (what `grape eval` holds).

    >>> import numpy as np
    >>> corpus = np.eye(3, dtype=np.float32)[[0, 1, 1]]  # rows 1 and 2 are duplicates
    >>> target_ranks(np.array([[0.0, 1.0, 0.0]], dtype=np.float32), corpus, [[1]]).tolist()
    [2]
    """
    import numpy as np
    import torch

    if len(query_vecs) != len(targets):
        raise ValueError(f"{len(query_vecs)} query vectors but {len(targets)} target lists")
    if len(targets) == 0:
        return np.zeros(0, dtype=np.int64)
    with warnings.catch_warnings():  # a read-only array is fine: it is never written
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        scores = score_targets(
            torch.from_numpy(np.ascontiguousarray(query_vecs, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32)),
            targets,
            top_k=0,
        )
    return scores.ranks.numpy()


def rank_positions(scores: Sequence[float]) -> list[int]:
    """The rank of each entry of a best-first score list under the tie rule: an entry tied
    with later ones shares the last position of its tie group (what a target there gets).

    >>> rank_positions([0.9, 0.5, 0.5, 0.1])
    [1, 3, 3, 4]
    """
    out = [0] * len(scores)
    j = len(scores)  # scores are best first: walking up, the tie group's end only moves up
    for i in range(len(scores) - 1, -1, -1):
        while j > 0 and scores[j - 1] < scores[i] - TIE_TOL:
            j -= 1
        out[i] = j
    return out


# --------------------------------------------------------------------------- fusion


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list:
    """Fuse best-first lists of ids: score(id) = sum over lists of 1 / (k + position).

    Returns [(id, score)] best first; equal scores in id order (deterministic).

    >>> reciprocal_rank_fusion([[2, 1, 3], [1, 2, 4]], k=60)[:2]
    [(1, 0.03252247488101534), (2, 0.03252247488101534)]
    """
    fused: dict = {}
    for ranking in rankings:
        for position, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + position)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def fused_target_ranks(
    query_vecs: Sequence[np.ndarray],
    corpus: np.ndarray,
    targets: Sequence[Sequence[int]],
    k: int = RRF_K,
) -> np.ndarray:
    """Target ranks when each query has several vectors, fused by reciprocal rank fusion
    over full rankings (search fuses each ranking's top 100; a full fusion gives every
    target a defined rank). Ties in the fused score count against the target."""
    import numpy as np

    ranks = np.zeros(len(query_vecs), dtype=np.int64)
    positions = np.arange(1, len(corpus) + 1, dtype=np.float64)
    for i, (vecs, rows) in enumerate(zip(query_vecs, targets, strict=True)):
        fused = np.zeros(len(corpus))
        for scores in np.atleast_2d(vecs) @ corpus.T:
            rank_of = np.empty(len(corpus))
            # Within a run of equal scores the stable sort puts targets last (pessimistic).
            order = np.lexsort((np.isin(np.arange(len(corpus)), list(rows)), -scores))
            rank_of[order] = positions
            fused += 1.0 / (k + rank_of)
        others = np.delete(fused, list(rows))
        best = fused[list(rows)].max()
        ranks[i] = int((others >= best - 1e-12).sum()) + 1
    return ranks


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(ranks, ks: Sequence[int] = KS) -> dict:
    """Recall@k for each k, MRR, median rank and the number of queries.

    >>> retrieval_metrics([1, 2, 4, 8], ks=(1, 5))
    {'recall@1': 0.25, 'recall@5': 0.75, 'mrr': 0.46875, 'median_rank': 3.0, 'n': 4}
    """
    import numpy as np

    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {**{f"recall@{k}": None for k in ks}, "mrr": None, "median_rank": None, "n": 0}
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks).mean())
    out["median_rank"] = float(np.median(ranks))
    out["n"] = int(ranks.size)
    return out


def better(m: dict, best: dict | None) -> bool:
    """Checkpoint choice: held-out Recall@10 decides, MRR breaks ties, and an equal score
    keeps the earlier step."""
    if best is None:
        return True
    return (m["recall@10"], m["mrr"]) > (best["recall@10"], best["mrr"])
