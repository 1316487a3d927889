"""Training data: pairs matched to the index, the train / held-out split, and the held-out
score that picks the checkpoint (computed exactly as `grape eval` computes it)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from grape_cli.errors import InputError
from grape_cli.query import Query

logger = logging.getLogger("grape")

MIN_TRAIN = 4  # fewer training queries than this cannot form a useful GRPO batch


@dataclass
class Example:
    query: Query
    targets: list[str]  # absolute paths, re-matched to rows on every start

    @property
    def key(self) -> tuple:
        return (self.query.text, self.query.image, tuple(sorted(self.targets)))

    def to_json(self) -> dict:
        return {**self.query.to_dict(), "targets": self.targets}

    @classmethod
    def from_json(cls, d: dict) -> Example:
        query = Query(d["query"], d.get("image"), d.get("image_weight", 1.0))
        return cls(query, list(d["targets"]))


def matched_examples(path, index_paths: list[str], strict: bool) -> list[Example]:
    """The distinct pairs of `path` whose targets are in the index."""
    from grape_cli.pairs import describe_missing, load_pairs, match_targets

    matched, missing = match_targets(load_pairs(path), index_paths, strict=strict)
    if missing:
        logger.warning(
            "%s: %d target(s) are not in the index and were skipped: %s",
            path,
            len(missing),
            describe_missing(missing),
        )
    if not matched:
        raise InputError(
            f"none of the pairs in {path} has a target in the index",
            "index those photos with `grape index`, or fix the target paths",
        )
    return [Example(p.query, [index_paths[r] for r in rows]) for p, rows in matched]


def split_examples(train: list[Example], held: list[Example] | None, eval_split: float, seed: int):
    """(train, held-out). With a separate held-out list, training drops any pair that is
    also held out, so the score that picks the checkpoint is never of a trained pair."""
    if held is None:
        return split_pairs(train, eval_split, seed)
    held_keys = {e.key for e in held}
    shared = [e for e in train if e.key in held_keys]
    if shared:
        logger.warning(
            "%d pair(s) are in both the training and the held-out pairs; they are held out only",
            len(shared),
        )
        train = [e for e in train if e.key not in held_keys]
    if len(train) < MIN_TRAIN:
        raise InputError(
            f"{len(train)} usable training pair(s); training needs at least {MIN_TRAIN}",
            "add pairs whose targets are in the index",
        )
    return train, held


def split_pairs(examples: list, eval_split: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, round(F * n) held out (at least 1).

    >>> train, held = split_pairs(list(range(20)), 0.1, seed=0)
    >>> len(train), len(held), sorted(train + held) == list(range(20))
    (18, 2, True)
    """
    n = len(examples)
    n_eval = _n_eval(n, eval_split)
    if n - n_eval < MIN_TRAIN:
        need = next(
            m for m in range(MIN_TRAIN + 1, 10_000) if m - _n_eval(m, eval_split) >= MIN_TRAIN
        )
        raise InputError(
            f"{n} usable pair(s); an `eval_split` of {eval_split} needs at least {need} "
            f"({need - _n_eval(need, eval_split)} to train, {_n_eval(need, eval_split)} held out)",
            "add pairs, or pass the held-out pairs separately (`eval_pairs`)",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


def _n_eval(n: int, fraction: float) -> int:
    return max(1, round(fraction * n))


class Heldout:
    """Held-out queries scored the way `grape eval` scores them: greedy rewrites (the
    query itself when a rewrite is empty), the retriever's text tower, a text rewriter's
    reference image blended in, exact ranks from `grape_cli.ranking`."""

    def __init__(self, examples: list[Example], rows, clip, corpus, template, max_new_tokens):
        self.queries = [e.query for e in examples]
        self.rows, self.clip, self.corpus = rows, clip, corpus
        self.template, self.max_new_tokens = template, max_new_tokens

    def metrics_of(self, texts: list[str], sees_images: bool = False) -> dict:
        import numpy as np

        from grape_cli.query import embed_rewrites
        from grape_cli.ranking import retrieval_metrics, target_ranks

        groups = embed_rewrites(self.clip, self.queries, [[t] for t in texts], sees_images)
        return retrieval_metrics(target_ranks(np.concatenate(groups), self.corpus, self.rows))

    def as_is(self) -> dict:
        """The metrics of the queries as they are (the `none` rewriter)."""
        return self.metrics_of([q.text for q in self.queries])

    def rewrites(self, model, processing_class, batch_size: int = 32) -> list[str]:
        from grape_cli.rewrite import rewriter_for

        rewriter = rewriter_for(model, processing_class, self.template, self.max_new_tokens)
        was_training = model.training
        model.eval()
        try:
            out = []
            for i in range(0, len(self.queries), batch_size):
                out += rewriter.generate(self.queries[i : i + batch_size])
        finally:
            if was_training:
                model.train()
        return [g[0] or q.text for g, q in zip(out, self.queries, strict=True)]

    def evaluate(self, model, processing_class) -> dict:
        texts = self.rewrites(model, processing_class)
        return self.metrics_of(texts, hasattr(processing_class, "image_processor"))
