"""GRPO rewards: how well the frozen retriever ranks the target image under a rewrite.

Ranks come from `grape_cli.ranking` (the one tie rule grape uses). Each reward is a small
pure function of those `Scores`, registered once with its floor and a one-line
description (shown by `grape train --help` and on the model card):

- `rank` (GRAPE's corpus-relative reward, the default): 1 - (r - 1) / (N - 1).
  It depends only on the order of the scores, so a rewrite cannot earn it by inflating
  every similarity at once.
- `rank-top`: 1 / log2(r + 1), for users who only care about the first page.
- `similarity`: the cosine to the target, the naive reward (kept as an ablation;
  `inflation` measures what it does to the rest of the corpus).

Adding a reward is one function decorated with `@reward(...)`.

`RetrievalReward` and `FormatReward` adapt them to TRL's reward signature
`fn(prompts, completions, completion_ids, **columns) -> list[float]`.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grape_cli.errors import UsageError
from grape_cli.prompt import clean_rewrite
from grape_cli.ranking import DEFAULT_CHUNK, Scores, score_targets

if TYPE_CHECKING:
    import torch

# Weight of the format term added to each reward. 0.5 keeps a clean rewrite ahead of a
# broken one that ranks its target up to half the corpus higher (rank reward scale).
FORMAT_WEIGHT = 0.5
# rank-top: on the bundled example it beat the paper's linear rank reward at R@10 on
# every held-out set and at every checkpoint (README, "Which reward"). The linear reward gives
# ranks 1 and 10 rewards 0.0045 apart among 2,000 images, so once a target is on the
# first page it barely pays to lift it to the top; 1/log2(r+1) does.
DEFAULT_REWARD = "rank-top"


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: `fn(scores) -> (B,) tensor`, the value an empty or unfinished
    rewrite gets (`floor`), and one line saying what it pays for."""

    name: str
    fn: Callable[[Scores], torch.Tensor]
    floor: float
    description: str


REWARDS: dict[str, RewardSpec] = {}


def reward(name: str, *, floor: float, description: str):
    """Register the decorated `fn(scores) -> tensor` as reward `name`."""

    def register(fn):
        REWARDS[name] = RewardSpec(name, fn, floor, description)
        return fn

    return register


def get_reward(name: str) -> RewardSpec:
    """The registered reward `name`; a UsageError that lists the others if unknown."""
    try:
        return REWARDS[name]
    except KeyError:
        raise UsageError(f"unknown reward {name!r}", f"use one of {', '.join(REWARDS)}") from None


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


reward(
    "rank",
    floor=0.0,
    description="GRAPE's corpus-relative rank reward 1 - (r-1)/(N-1), r the target's rank "
    "among all N images; it pays for the ranking only, so inflating every score earns nothing",
)(lambda s: rank_reward(s.ranks, s.n))
reward(
    "rank-top",
    floor=0.0,
    description="top-weighted rank reward 1/log2(r+1), r the target's rank among all images; "
    "it pays most for the first page",
)(lambda s: rank_top_reward(s.ranks))
reward(
    "similarity",
    floor=-1.0,
    description="the naive reward, cosine between rewrite and target; prone to score "
    "inflation (kept as the ablation GRAPE argues against)",
)(lambda s: similarity_reward(s.target_sim))


def reward_from_scores(kind: str, scores: Scores) -> torch.Tensor:
    """The reward named `kind` for each query."""
    return get_reward(kind).fn(scores)


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


def completion_text(completion) -> str:
    """The text of a TRL completion: a string for text prompts, a list of messages for
    conversational ones (vision-language training).

    >>> completion_text([{"role": "assistant", "content": "a red cube"}])
    'a red cube'
    """
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):  # structured parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


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

        self.spec = get_reward(kind)
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

    def __call__(
        self,
        prompts,
        completions,
        completion_ids,
        targets,
        log_metric=None,
        **_,
    ):
        import torch

        started = time.perf_counter()
        texts = [clean_rewrite(completion_text(c)) for c in completions]
        ok = torch.tensor(
            [
                bool(t) and _ended(ids, self.eos_ids)
                for t, ids in zip(texts, completion_ids, strict=True)
            ],
            device=self.corpus.device,
        )
        queries = self.embed(texts)
        scores = score_targets(
            queries,
            self.corpus,
            targets,
            chunk_size=self.chunk_size,
            negatives=self.negatives,
            generator=self.generator,
        )
        values = self.spec.fn(scores)
        values = torch.where(ok, values, torch.full_like(values, self.spec.floor))
        if log_metric is not None:
            ranks = scores.ranks.float()
            log_metric("grape/rank_mean", float(ranks.mean()))
            log_metric("grape/rank_median", float(ranks.median()))
            log_metric("grape/recall@10", float((scores.ranks <= 10).float().mean()))
            for key, value in inflation(scores, queries, self.reference).items():
                log_metric(f"grape/{key}", value)
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return values.tolist()


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
            format_penalty(completion_text(c), _ended(ids, self.eos_ids), self.max_words)
            for c, ids in zip(completions, completion_ids, strict=True)
        ]
