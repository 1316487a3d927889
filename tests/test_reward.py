"""Rewards: hand-computed ranks, ties, several targets, chunking, negatives, inflation, format."""

from __future__ import annotations

import math

import pytest
import torch

from grape_cli.errors import UsageError
from grape_cli.ranking import Scores
from grape_cli.ranking import score_targets as score_rewrites
from grape_cli.reward import (
    REWARDS,
    FormatReward,
    RetrievalReward,
    format_penalty,
    format_problems,
    inflation,
    rank_reward,
    rank_top_reward,
    reward_from_scores,
)


def unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# 5 images in 2-D, at known angles from the x axis: 0, 30, 60, 90 and 180 degrees.
ANGLES = [0, 30, 60, 90, 180]
CORPUS = unit([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES])


def test_hand_computed_ranks():
    # Query along 40 degrees: cosines to the images, by angular distance 40, 10, 20, 50,
    # 140, so the order is image 1, 2, 0, 3, 4.
    q = unit([[math.cos(math.radians(40)), math.sin(math.radians(40))]])
    ranks = [score_rewrites(q, CORPUS, [[t]]).ranks.item() for t in range(5)]
    assert ranks == [3, 1, 2, 4, 5]
    s = score_rewrites(q, CORPUS, [[0]])
    assert s.n == 5
    assert s.target_sim.item() == pytest.approx(math.cos(math.radians(40)), abs=1e-6)


def test_several_targets_use_the_best_ranked():
    q = unit([[math.cos(math.radians(40)), math.sin(math.radians(40))]])
    assert score_rewrites(q, CORPUS, [[4, 0]]).ranks.item() == 3
    assert score_rewrites(q, CORPUS, [[3, 2, 4]]).ranks.item() == 2
    # Two queries with different numbers of targets in one batch.
    s = score_rewrites(torch.cat([q, q]), CORPUS, [[4], [3, 1]])
    assert s.ranks.tolist() == [5, 1]


def test_ties_count_against_the_target():
    # Images 0 and 1 are identical (a duplicate photo): whichever is the target, the
    # other one ties with it and is ranked above.
    corpus = unit([[1, 0], [1, 0], [0, 1]])
    q = unit([[1, 0]])
    assert score_rewrites(q, corpus, [[0]]).ranks.item() == 2
    assert score_rewrites(q, corpus, [[1]]).ranks.item() == 2
    # Both duplicates as targets: no other image ties, rank 1.
    assert score_rewrites(q, corpus, [[0, 1]]).ranks.item() == 1
    # A zero embedding scores every image alike: worst rank, not first.
    zero = torch.zeros(1, 2)
    assert score_rewrites(zero, corpus, [[2]]).ranks.item() == 3


def test_chunking_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(1000, 32, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(24, 32, generator=g), dim=1)
    targets = [[int(i) * 37 % 1000, (int(i) * 91 + 5) % 1000][: 1 + i % 2] for i in range(24)]
    whole = score_rewrites(queries, corpus, targets, chunk_size=10_000)
    assert whole.ranks.min() >= 1 and whole.ranks.max() <= 1000
    assert len(set(whole.ranks.tolist())) > 10  # a real spread, not a constant
    for chunk in (1, 7, 128, 999):
        part = score_rewrites(queries, corpus, targets, chunk_size=chunk)
        assert torch.equal(part.ranks, whole.ranks)
        assert torch.allclose(part.top_sim, whole.top_sim)
    # The same ranks by brute force with Python sorting.
    sims = (queries @ corpus.T).tolist()
    for i, t in enumerate(targets):
        best = max(sims[i][j] for j in t)
        expected = 1 + sum(1 for j, s in enumerate(sims[i]) if j not in t and s >= best - 1e-6)
        assert whole.ranks[i].item() == expected


def test_top_nontarget_similarity_skips_targets():
    q = unit([[1, 0]])
    # target 0 is the nearest image; the top-2 non-targets are images 1 and 2 (60, 90 deg)
    corpus = unit([[1, 0], [0.5, math.sqrt(3) / 2], [0, 1], [-1, 0]])
    s = score_rewrites(q, corpus, [[0]], top_k=2)
    assert s.top_sim.item() == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)
    # Fewer non-targets than k: the mean of those there are.
    s = score_rewrites(q, corpus[:2], [[0]], top_k=10)
    assert s.top_sim.item() == pytest.approx(0.5, abs=1e-6)


def test_negatives_rank_among_a_sample():
    g = torch.Generator().manual_seed(1)
    corpus = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    queries = corpus[:8] + 0.3 * torch.randn(8, 16, generator=g)
    queries = torch.nn.functional.normalize(queries, dim=1)
    targets = [[i] for i in range(8)]
    exact = score_rewrites(queries, corpus, targets)
    approx = score_rewrites(
        queries, corpus, targets, negatives=500, generator=torch.Generator().manual_seed(2)
    )
    assert approx.n == 501
    assert approx.ranks.max() <= 501
    # About a tenth of the corpus was sampled, so ranks shrink about tenfold.
    ratio = (exact.ranks.float() - 1).sum() / (approx.ranks.float() - 1).sum().clamp(min=1)
    assert 5 < ratio < 20


def test_rewards_from_ranks():
    ranks = torch.tensor([1, 2, 10])
    assert rank_reward(ranks, 10).tolist() == pytest.approx([1.0, 8 / 9, 0.0])
    assert rank_reward(torch.tensor([1]), 1).tolist() == [1.0]
    top = rank_top_reward(ranks).tolist()
    assert top == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11)])
    s = Scores(ranks, torch.tensor([0.3, 0.2, 0.1]), torch.zeros(3), 10)
    assert reward_from_scores("similarity", s).tolist() == pytest.approx([0.3, 0.2, 0.1])
    assert reward_from_scores("rank", s).tolist() == pytest.approx([1.0, 8 / 9, 0.0])
    with pytest.raises(UsageError, match="unknown reward"):
        reward_from_scores("ndcg", s)


def test_rank_reward_ignores_score_scale_but_similarity_does_not():
    """The inflation argument in one test: pushing every image toward the query raises the
    similarity reward while the target's rank, and so the rank reward, stays put."""
    q = unit([[1, 0, 0]])
    raw = [[0.9, 0.1, 0.4], [0.8, 0.6, 0.0], [0.1, 0.9, 0.4]]
    corpus = unit(raw)
    inflated = unit([[x + 2.0, y, z] for x, y, z in raw])
    before = score_rewrites(q, corpus, [[1]])
    after = score_rewrites(q, inflated, [[1]])
    assert after.ranks.tolist() == before.ranks.tolist() == [2]
    assert reward_from_scores("rank", after) == reward_from_scores("rank", before)
    assert reward_from_scores("similarity", after) > reward_from_scores("similarity", before)
    was, now = inflation(before, q, corpus), inflation(after, q, inflated)
    assert now["random_cos"] > was["random_cos"]
    assert now["top_nontarget_cos"] > was["top_nontarget_cos"]


def test_inflation_measure_hand_computed():
    q = unit([[1, 0], [0, 1]])
    corpus = unit([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]])
    s = score_rewrites(q, corpus, [[0], [2]], top_k=2)
    # query 0: non-targets score 0.6, 0, -1 -> top-2 mean 0.3; query 1: 0.8, 0, 0 -> 0.4
    assert s.top_sim.tolist() == pytest.approx([0.3, 0.4], abs=1e-6)
    stats = inflation(s, q, corpus[[1, 3]])
    # random images 1 and 3: query 0 -> 0.6, -1; query 1 -> 0.8, 0 => mean 0.1
    assert stats == pytest.approx({"target_cos": 1.0, "top_nontarget_cos": 0.35, "random_cos": 0.1})


@pytest.mark.parametrize(
    "text, ended, problems",
    [
        ("a blue square at the top", True, []),
        ("a blue square", False, ["never ended"]),
        ("  \n ", True, ["empty"]),
        ('"  "', True, ["empty"]),
        ("a blue square\nSure, anything else?", True, ["multi-line"]),
        ("square square", True, ["repeated words"]),
        ("blue square, blue circle, blue sky", True, ["repeated words"]),
        ("a cat and a dog and a bird", True, []),  # short words may recur
        (" ".join(f"w{i}" for i in range(33)), True, ["over-long"]),
        ("红色的圆形在左边", True, []),
    ],
)
def test_format_problems(text, ended, problems):
    assert format_problems(text, ended, max_words=32) == problems


def test_format_penalty_levels():
    assert format_penalty("a red circle", True) == 0.0
    assert format_penalty("", True) == -1.0
    assert format_penalty("a red circle", False) == -1.0
    assert format_penalty("red red\nx", True) == pytest.approx(-2 / 3)


class FakeEncoder:
    """Maps known texts to fixed vectors and counts how many texts it encoded."""

    def __init__(self, table):
        self.table, self.seen = table, 0

    def __call__(self, texts):
        self.seen += len(texts)
        return unit([self.table[t] for t in texts])


def test_retrieval_reward_adapter_in_trl_signature():
    eos = 99
    enc = FakeEncoder({"left": [1, 0], "up": [0, 1], "": [1, 1]})
    corpus = unit([[1, 0], [0, 1], [-0.8, -0.6]])
    fn = RetrievalReward("rank", enc, corpus, eos_ids=[eos], reference_size=3)
    logged = {}
    completions = ["left", "up", "left", "left\n", "", "left"]
    ids = [[5, eos], [6, eos], [5, eos], [5, 7, eos], [eos], [5, 5]]  # last never ended
    targets = [[0], [0], [1], [0], [0], [0]]
    out = fn(
        prompts=["p"] * 6,
        completions=completions,
        completion_ids=ids,
        targets=targets,
        log_metric=lambda k, v: logged.setdefault(k, v),
        trainer_state=None,
    )
    # ranks: left->0 1st (1.0); up->0 2nd (0.5); left->1 2nd (0.5); "left\n" is cleaned to
    # "left" (1.0; the format term penalises it); empty and never-ended ones get the floor.
    assert out == pytest.approx([1.0, 0.5, 0.5, 1.0, 0.0, 0.0])
    assert fn.__name__ == "rank"
    assert enc.seen == 3  # distinct texts only: "left", "up", ""
    assert logged["grape/rank_mean"] == pytest.approx((1 + 2 + 2 + 1 + 2 + 1) / 6)
    assert logged["grape/recall@10"] == 1.0
    assert set(logged) >= {"grape/rank_median", "grape/top_nontarget_cos", "grape/random_cos"}
    sim = RetrievalReward("similarity", enc, corpus, eos_ids=[eos])
    out = sim(["p"] * 2, ["up", "up"], [[1, eos], [1]], targets=[[1], [1]])
    assert out == pytest.approx([1.0, REWARDS["similarity"].floor])


def test_format_reward_adapter():
    fn = FormatReward(eos_ids=[2], max_words=4)
    out = fn(["p"] * 3, ["a red circle", "one two three four five", "x"], [[1, 2], [1, 2], [1]])
    assert out == pytest.approx([0.0, -1 / 3, -1.0])
    assert fn.__name__ == "format"


def test_bad_targets_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        score_rewrites(unit([[1, 0]]), CORPUS, [[5]])
    with pytest.raises(ValueError, match="at least one target"):
        score_rewrites(unit([[1, 0]]), CORPUS, [[]])
