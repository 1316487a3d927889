"""One rank, one tie rule: eval, the reward, the held-out score that picks a checkpoint,
and search all report the same rank for a target that has an exact duplicate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from grape_cli.evaluate import evaluate
from grape_cli.index import index_folders
from grape_cli.models import load_clip
from grape_cli.pairs import load_pairs
from grape_cli.ranking import better, rank_positions, score_targets, target_ranks
from grape_cli.reward import RetrievalReward
from grape_cli.search import Searcher
from grape_cli.store import Store
from grape_cli.train.data import Example, Heldout

from .conftest import write_images

QUERIES = ["a red circle", "a cat on a sofa", "photo of a sunset", "a dog"]


@pytest.fixture(scope="module")
def dup_world(tmp_path_factory, tiny_clip):
    """12 images, two of which (img_000 and its copy) are the same bytes."""
    root = tmp_path_factory.mktemp("ties")
    photos = write_images(root / "photos", 12)
    shutil.copy(photos[0], root / "photos" / "copy_of_000.png")
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    pairs = root / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"query": q, "target": str(photos[0])}) + "\n" for q in QUERIES)
    )
    return {"root": root, "index": root / "index", "pairs": pairs, "target": str(photos[0])}


def test_eval_reward_heldout_and_search_agree_on_ties(dup_world, tiny_clip, tmp_path):
    store = Store.open(dup_world["index"])
    meta, corpus = store.load_matrix(("path",))
    clip = load_clip(store.model, "cpu")
    row = meta["path"].index(dup_world["target"])
    copy = meta["path"].index(str(dup_world["root"] / "photos" / "copy_of_000.png"))
    assert np.allclose(corpus[row], corpus[copy], atol=1e-6), "the copy embeds the same"

    # grape eval
    per_query = tmp_path / "per-query.jsonl"
    evaluate(dup_world["pairs"], dup_world["index"], per_query_path=per_query)
    eval_ranks = [json.loads(x)["rank"]["none"] for x in per_query.read_text().splitlines()]
    assert min(eval_ranks) >= 2, "a tie with the copy counts against the target"

    # the GRPO reward (its logged ranks), through TRL's call signature
    logged = {}
    reward = RetrievalReward(
        "rank", clip.encode_texts, torch.from_numpy(corpus.copy()), eos_ids=[0]
    )
    for q, want in zip(QUERIES, eval_ranks, strict=True):
        reward([q], [q], [[5, 0]], targets=[[row]], log_metric=logged.__setitem__)
        assert logged["grape/rank_mean"] == want

    # the held-out score that picks the checkpoint
    examples = [Example(p.query, list(p.targets)) for p in load_pairs(dup_world["pairs"])]
    held = Heldout(examples, [[row]] * len(QUERIES), clip, corpus, None, 8)
    for i, q in enumerate(QUERIES):
        held.queries = [examples[i].query]
        held.rows = [[row]]
        assert held.metrics_of([q])["median_rank"] == eval_ranks[i]

    # grape search: the target's hit carries the same rank, shared with its copy
    searcher = Searcher(dup_world["index"], device="cpu")
    for q, want in zip(QUERIES, eval_ranks, strict=True):
        hits = {h.path: h.rank for h in searcher.search(q, k=len(meta["path"])).hits}
        assert hits[dup_world["target"]] == want == hits[meta["path"][copy]]


def test_tie_rule_in_one_place():
    corpus = torch.eye(3)[[0, 1, 1]]  # rows 1 and 2 are duplicates
    q = torch.tensor([[0.0, 1.0, 0.0]])
    assert score_targets(q, corpus, [[1]]).ranks.item() == 2
    assert score_targets(q, corpus, [[1, 2]]).ranks.item() == 1  # both right
    assert target_ranks(q.numpy(), corpus.numpy(), [[2]]).tolist() == [2]
    assert rank_positions([0.9, 0.9, 0.5]) == [2, 2, 3]
    a = {"recall@10": 0.5, "mrr": 0.3}
    assert better(a, None) and not better(dict(a), a), "an equal score keeps the earlier step"
