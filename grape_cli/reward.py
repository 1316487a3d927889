"""GRPO rewards: how well the frozen retriever ranks the target image under a rewrite.

The core is `score_rewrites`: exact ranks of each query's best target among the whole
corpus (or among K sampled negatives), one matmul per corpus chunk on whatever device
the vectors live on. The rewards are small pure functions of its output:

- `rank_reward` (GRAPE's corpus-relative reward, the default): 1 - (r - 1) / (N - 1).
  It depends only on the order of the scores, so a rewrite cannot earn it by inflating
  every similarity at once.
- `rank_top_reward`: 1 / log2(r + 1), for users who only care about the first page.
- `similarity_reward`: the cosine to the target, the naive reward (kept as an ablation;
  `inflation` measures what it does to the rest of the corpus).

`RetrievalReward` and `FormatReward` adapt them to TRL's reward signature
`fn(prompts, completions, completion_ids, **columns) -> list[float]`.

Conventions (the unit tests pin them down):
- Several correct targets: the best-ranked one counts.
- Ties count against the target: an image whose score is within `TIE_TOL` of the
  target's is ranked above it. Otherwise a degenerate rewrite that scores everything
  alike (a zero text embedding) would rank its target first.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grape_cli.prompt import clean_rewrite

if TYPE_CHECKING:
    import torch

REWARDS = ("rank", "rank-top", "similarity")
# Weight of the format term added to each reward. 0.5 keeps a clean rewrite ahead of a
# broken one that ranks its target up to half the corpus higher (rank reward scale).
FORMAT_WEIGHT = 0.5
# float32 dot products of unit vectors differ by ~1e-7 between matmul shapes; scores
# this close are treated as ties (which count against the target).
TIE_TOL = 1e-6
DEFAULT_CHUNK = 65_536
# Floor of each reward: what an empty rewrite or one that never ended scores.
REWARD_FLOOR = {"rank": 0.0, "rank-top": 0.0, "similarity": -1.0}


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
    width = max(len(t) for t in targets)
    out = torch.full((len(targets), width), -1, dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    if int(out.max()) >= n:
        raise ValueError(f"target row {int(out.max())} is outside a corpus of {n} images")
    return out.to(device)


def score_rewrites(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    targets: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    negatives: int | None = None,
    top_k: int = 10,
    generator: torch.Generator | None = None,
    tie_tol: float = TIE_TOL,
) -> Scores:
    """Exact rank of each query's best target among all rows of `corpus`.

    `queries` (B, d) and `corpus` (N, d) are L2-normalised; `targets[i]` lists the
    corpus rows that are correct for query i. With `negatives=K` each query is ranked
    among K rows drawn uniformly (with replacement, shared by the batch) plus its
    target: an approximation for very large corpora.

    >>> import torch
    >>> corpus = torch.eye(4)
    >>> q = torch.nn.functional.normalize(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), dim=1)
    >>> score_rewrites(q, corpus, [[2]]).ranks.tolist()
    [3]
    >>> score_rewrites(q, corpus, [[2, 1]]).ranks.tolist()  # several targets: the best
    [2]
    """
    import torch

    queries = queries.to(corpus.device, corpus.dtype)
    n_rows, batch = corpus.shape[0], queries.shape[0]
    tmat = _target_matrix(targets, n_rows, corpus.device)
    valid = tmat >= 0
    tvec = corpus[tmat.clamp(min=0)]  # (B, T, d)
    tsims = torch.einsum("bd,btd->bt", queries, tvec).masked_fill(~valid, -math.inf)
    target_sim = tsims.max(dim=1).values
    threshold = (target_sim - tie_tol).unsqueeze(1)

    if negatives:
        idx = torch.randint(n_rows, (negatives,), generator=generator).to(corpus.device)
        sims = queries @ corpus[idx].T
        hit = (idx.view(1, 1, -1) == tmat.unsqueeze(2)).any(dim=1)  # drew a target
        sims = sims.masked_fill(hit, -math.inf)
        chunks, n = [sims], negatives + 1
    else:
        rows, cols = valid.nonzero(as_tuple=True)
        cols = tmat[rows, cols]
        chunks = _masked_chunks(queries, corpus, rows, cols, chunk_size)
        n = n_rows

    above = torch.zeros(batch, dtype=torch.long, device=corpus.device)
    tops = []
    for sims in chunks:
        above += (sims >= threshold).sum(dim=1)
        if top_k:
            tops.append(sims.topk(min(top_k, sims.shape[1]), dim=1).values)
    if tops:
        best = torch.cat(tops, dim=1)
        best = best.topk(min(top_k, best.shape[1]), dim=1).values
        top_sim = torch.where(torch.isfinite(best), best, torch.nan).nanmean(dim=1)
    else:
        top_sim = torch.full((batch,), torch.nan, device=corpus.device)
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


def rank_reward(ranks: torch.Tensor, n: int) -> torch.Tensor:
    """GRAPE's corpus-relative reward: 1 for rank 1, 0 for last of `n`, linear between.

    >>> import torch
    >>> rank_reward(torch.tensor([1, 3, 5]), n=5).tolist()
    [1.0, 0.5, 0.0]
    """
    if n <= 1:
        return (ranks * 0 + 1).float()
    return 1.0 - (ranks.float() - 1.0) / (n - 1)


def rank_top_reward(ranks: torch.Tensor) -> torch.Tensor:
    """Top-weighted reward 1 / log2(r + 1) (the DCG discount): the first page counts most.

    >>> import torch
    >>> [round(x, 3) for x in rank_top_reward(torch.tensor([1, 3, 1000])).tolist()]
    [1.0, 0.5, 0.1]
    """
    import torch

    return 1.0 / torch.log2(ranks.float() + 1.0)


def similarity_reward(target_sim: torch.Tensor) -> torch.Tensor:
    """The naive reward: cosine between rewrite and target. Gameable by score inflation.

    >>> import torch
    >>> similarity_reward(torch.tensor([0.25, -0.5])).tolist()
    [0.25, -0.5]
    """
    return target_sim.float()


def reward_from_scores(kind: str, scores: Scores) -> torch.Tensor:
    """The reward named `kind` (one of REWARDS) for each query."""
    if kind == "rank":
        return rank_reward(scores.ranks, scores.n)
    if kind == "rank-top":
        return rank_top_reward(scores.ranks)
    if kind == "similarity":
        return similarity_reward(scores.target_sim)
    raise ValueError(f"unknown reward {kind!r}; use one of {', '.join(REWARDS)}")


def inflation(scores: Scores, queries: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Score inflation: mean cosine of the rewrites to their top-k non-target images and
    to `reference` images (a fixed random sample of the corpus), beside the target's.

    A reward that can be earned by making every image look similar drives all three up;
    the rank reward only moves the target relative to the rest.

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0]])
    >>> ref = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    >>> s = Scores(torch.tensor([2]), torch.tensor([0.5]), torch.tensor([0.9]), 10)
    >>> inflation(s, q, ref)
    {'target_cos': 0.5, 'top_nontarget_cos': 0.9, 'random_cos': 0.3}
    """
    random_cos = (
        (queries.to(reference) @ reference.T).mean() if len(reference) else queries.new_zeros(())
    )
    return {
        "target_cos": round(float(scores.target_sim.float().mean()), 6),
        "top_nontarget_cos": round(float(scores.top_sim.float().nanmean()), 6),
        "random_cos": round(float(random_cos), 6),
    }


# ----------------------------------------------------------------------------- format

_WORD = re.compile(r"\w+", re.UNICODE)


def format_problems(completion: str, ended: bool, max_words: int = 32) -> list[str]:
    """What is wrong with a raw completion as a one-line caption.

    >>> format_problems("a red circle", ended=True)
    []
    >>> format_problems("red red circle\\nmore", ended=True)
    ['multi-line', 'repeated words']
    >>> format_problems("", ended=True)
    ['empty']
    """
    text = completion.strip()
    if not ended:
        return ["never ended"]
    if not clean_rewrite(text):
        return ["empty"]
    problems = []
    if "\n" in text:
        problems.append("multi-line")
    words = [w.lower() for w in _WORD.findall(clean_rewrite(text))]
    if len(words) > max_words:
        problems.append("over-long")
    if _repeats(words):
        problems.append("repeated words")
    return problems


def _repeats(words: list[str]) -> bool:
    """A word right after itself, or any longer word three times: padding, not a caption."""
    if any(a == b for a, b in itertools.pairwise(words)):
        return True
    return any(c >= 3 for c in Counter(w for w in words if len(w) > 2).values())


def format_penalty(completion: str, ended: bool, max_words: int = 32) -> float:
    """0 for a clean caption; -1/3 per problem; -1 if empty or it never emitted EOS.

    >>> format_penalty("a red circle on the left", ended=True)
    0.0
    >>> format_penalty("a red circle", ended=False)
    -1.0
    >>> round(format_penalty("circle circle", ended=True), 3)
    -0.333
    """
    problems = format_problems(completion, ended, max_words)
    if problems and problems[0] in ("never ended", "empty"):
        return -1.0
    return -min(1.0, len(problems) / 3) if problems else 0.0


# ----------------------------------------------------------------------------- TRL adapters


def _ended(ids: Sequence[int], eos_ids: frozenset[int]) -> bool:
    return bool(ids) and int(ids[-1]) in eos_ids


class RetrievalReward:
    """TRL reward function for one of REWARDS, over a frozen retriever and corpus.

    `encode(texts) -> (B, d)` embeds rewrites with the retriever's text tower; `corpus`
    (N, d) holds the index's image vectors (never re-embedded). Rows of the dataset's
    `targets` column are corpus rows. Completions are cleaned with `clean_rewrite`; an
    empty one, or one that never emitted EOS, scores the reward's floor.

    Each call logs diagnostics through TRL's `log_metric`: target rank (mean, median),
    batch Recall@10, and the inflation measure. `seconds` accumulates time spent here.

    >>> import torch
    >>> corpus = torch.eye(3)  # three images; the text "image k" embeds as image k
    >>> fn = RetrievalReward("rank", lambda ts: corpus[[int(t[-1]) for t in ts]], corpus, eos_ids=[9])
    >>> fn(["q"] * 3, ["image 0", "image 2", "image 0"], [[5, 9], [5, 9], [5]], targets=[[0]] * 3)
    [1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        kind: str,
        encode: Callable[[list[str]], torch.Tensor],
        corpus: torch.Tensor,
        *,
        eos_ids: Sequence[int],
        chunk_size: int = DEFAULT_CHUNK,
        negatives: int | None = None,
        reference_size: int = 256,
        seed: int = 0,
    ):
        import torch

        if kind not in REWARDS:
            raise ValueError(f"unknown reward {kind!r}; use one of {', '.join(REWARDS)}")
        self.__name__ = kind  # TRL names the logged reward column after this
        self.kind, self.encode, self.corpus = kind, encode, corpus
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.chunk_size, self.negatives = chunk_size, negatives
        self.generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(corpus), generator=self.generator)[:reference_size]
        self.reference = corpus[pick.to(corpus.device)]
        self.seconds = 0.0
        self.calls = 0

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of `texts`, each distinct text encoded once (groups repeat a lot)."""
        unique = list(dict.fromkeys(texts))
        vecs = self.encode(unique).to(self.corpus.device, self.corpus.dtype)
        where = {t: i for i, t in enumerate(unique)}
        return vecs[[where[t] for t in texts]]

    def __call__(self, prompts, completions, completion_ids, targets, log_metric=None, **_):
        import torch

        started = time.perf_counter()
        texts = [clean_rewrite(c) for c in completions]
        ok = torch.tensor(
            [
                bool(t) and _ended(ids, self.eos_ids)
                for t, ids in zip(texts, completion_ids, strict=True)
            ],
            device=self.corpus.device,
        )
        queries = self.embed(texts)
        scores = score_rewrites(
            queries,
            self.corpus,
            targets,
            chunk_size=self.chunk_size,
            negatives=self.negatives,
            generator=self.generator,
        )
        reward = reward_from_scores(self.kind, scores)
        reward = torch.where(ok, reward, torch.full_like(reward, REWARD_FLOOR[self.kind]))
        if log_metric is not None:
            ranks = scores.ranks.float()
            log_metric("grape/rank_mean", float(ranks.mean()))
            log_metric("grape/rank_median", float(ranks.median()))
            log_metric("grape/recall@10", float((scores.ranks <= 10).float().mean()))
            for key, value in inflation(scores, queries, self.reference).items():
                log_metric(f"grape/{key}", value)
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return reward.tolist()


class FormatReward:
    """TRL reward function: `format_penalty` of each completion (add with FORMAT_WEIGHT).

    >>> FormatReward(eos_ids=[9])(["p", "p"], ["a red circle", "a red circle"], [[1, 9], [1]])
    [0.0, -1.0]
    """

    __name__ = "format"

    def __init__(self, eos_ids: Sequence[int], max_words: int = 32):
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_words = max_words

    def __call__(self, prompts, completions, completion_ids, **_):
        return [
            format_penalty(c, _ended(ids, self.eos_ids), self.max_words)
            for c, ids in zip(completions, completion_ids, strict=True)
        ]
