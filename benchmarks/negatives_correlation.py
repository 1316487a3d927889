"""How far `grape train --negatives K` moves the rank reward from the exact one.

    python benchmarks/negatives_correlation.py                       # synthetic corpus
    python benchmarks/negatives_correlation.py --index DIR --pairs FILE... \\
        [--rewriter DIR] [--samples 8] [--rewrites-cache FILE]        # a real index

With `--negatives K` the training reward ranks the target among K rows drawn at random
(with replacement, one draw per reward call, shared by the whole batch) instead of among
all N images. For many (rewrite, target) pairs this script computes both rewards with
grape's own code (`grape_cli.ranking.score_targets`, `grape_cli.reward.rank_reward`, as
`RetrievalReward` calls them) and prints, for each K:

* Spearman's rank correlation between the exact and the sampled reward over all pairs;
* the same within each GRPO group (the rewrites of one query; GRPO only compares a
  rewrite with the others of its group), averaged over groups whose exact rewards differ;
* the mean absolute difference of the two rewards (the reward runs from 0 to 1);
* of the pairs of rewrites in a group whose exact rewards differ, the share the sampled
  reward orders the other way round (a wrong signal for GRPO) and the share it ties
  (a lost one).

Each figure is the mean over `--repeats` draws of the negatives. The sampled reward
estimates the share p of the corpus ranked above the target from K draws, so its noise
(about sqrt(p (1 - p) / K)) depends on K and on where the targets land, not on N: a
measurement on a corpus of a few thousand images tells what the same K does on millions.

Rewrites: with `--index`, the queries of `--pairs` (JSONL or CSV, as `grape eval` reads)
become GRPO-like groups: the query itself plus `--samples` rewrites sampled (temperature
1) from `--rewriter` (the rewriter a run would start from), encoded by the index's own
text encoder; `--rewrites-cache` keeps the sampled rewrites for the next run. Without
`--index`: a synthetic clustered corpus (`--n` unit vectors of dimension 64) and groups
of 8 "rewrites" per target, the target's vector plus noise of 8 strengths, so that exact
ranks span the whole corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

KS = (64, 256, 1024)
BATCH_GROUPS = 8  # groups per reward call (a training step's queries), one draw each


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged (as scipy.stats.rankdata).

    >>> rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
    [3.5, 1.0, 3.5, 2.0]
    """
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (nan when either side is constant).

    >>> round(spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 25])), 3)
    0.8
    """
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rewards(queries, corpus, targets, negatives: int | None, seed: int, groups) -> np.ndarray:
    """The rank reward of each query vector, one `score_targets` call per batch of groups
    (the generator advancing between calls, as in training)."""
    import torch

    from grape_cli.ranking import score_targets
    from grape_cli.reward import rank_reward

    generator = torch.Generator().manual_seed(seed)
    q, c = torch.from_numpy(np.array(queries)), torch.from_numpy(np.array(corpus))  # writable
    out = np.zeros(len(queries))
    for first in range(0, len(groups), BATCH_GROUPS):
        rows = np.concatenate(groups[first : first + BATCH_GROUPS])
        scores = score_targets(
            q[rows], c, [targets[i] for i in rows], negatives=negatives, generator=generator
        )
        out[rows] = rank_reward(scores.ranks, scores.n).numpy()
    return out


def compare(exact: np.ndarray, sampled: np.ndarray, groups) -> dict:
    within, reversed_, tied, pairs = [], 0, 0, 0
    for g in groups:
        e, s = exact[g], sampled[g]
        if np.ptp(e) > 0:
            rho = spearman(e, s)
            if not np.isnan(rho):
                within.append(rho)
            i, j = np.triu_indices(len(g), 1)
            differ = e[i] != e[j]
            ds = np.sign(s[i] - s[j])[differ]
            reversed_ += int((ds == -np.sign(e[i] - e[j])[differ]).sum())
            tied += int((ds == 0).sum())
            pairs += int(differ.sum())
    return {
        "spearman_all": spearman(exact, sampled),
        "spearman_within_group": float(np.mean(within)) if within else float("nan"),
        "mean_abs_diff": float(np.abs(exact - sampled).mean()),
        "reversed": reversed_ / pairs if pairs else float("nan"),
        "tied": tied / pairs if pairs else float("nan"),
    }


# --------------------------------------------------------------------------- inputs


def synthetic(n: int, dim: int = 64, targets: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim))
    corpus = centres[rng.integers(0, 200, n)] + 0.7 * rng.standard_normal((n, dim))
    corpus = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).astype(np.float32)
    chosen = rng.choice(n, targets, replace=False)
    strengths = np.geomspace(1.0, 12.0, 8)  # noise norm / target norm: ranks 1 to ~N/2
    queries, target_rows, groups = [], [], []
    for row in chosen:
        noise = rng.standard_normal((len(strengths), dim)) / np.sqrt(dim)
        vecs = corpus[row] + strengths[:, None] * noise
        groups.append(np.arange(len(queries), len(queries) + len(vecs)))
        queries += list(vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
        target_rows += [[int(row)]] * len(vecs)
    what = (
        f"synthetic: {n:,} clustered unit vectors (dim {dim}), {targets} targets x 8 noisy copies"
    )
    return corpus, np.asarray(queries, np.float32), target_rows, groups, what


def from_index(args):
    from grape_cli.models import load_clip
    from grape_cli.pairs import load_pairs, match_targets
    from grape_cli.store import Store

    store = Store.open(args.index)
    meta, corpus = store.load_matrix(("path",))
    pairs = [p for f in args.pairs for p in load_pairs(f)]
    matched, missing = match_targets(pairs, meta["path"])
    texts = sample_rewrites(args, [p.query.text for p, _ in matched], store.model)
    clip = load_clip(store.model, "cpu")
    queries, target_rows, groups = [], [], []
    for (_, rows), group in zip(matched, texts, strict=True):
        groups.append(np.arange(len(queries), len(queries) + len(group)))
        queries += group
        target_rows += [rows] * len(group)
    vectors = np.concatenate(
        [clip.encode_texts(queries[i : i + 256]).numpy() for i in range(0, len(queries), 256)]
    )
    what = (
        f"index {args.index}: {len(meta['path']):,} images; {len(matched)} queries from "
        f"{', '.join(Path(f).name for f in args.pairs)} ({len(missing)} targets missing), each "
        f"with {args.samples} sampled rewrites of {args.rewriter or 'none'} plus the query"
    )
    return corpus, vectors.astype(np.float32), target_rows, groups, what


def sample_rewrites(args, queries: list[str], retriever: str) -> list[list[str]]:
    """[query, rewrite 1..samples] for each query; cached in --rewrites-cache."""
    cache = Path(args.rewrites_cache) if args.rewrites_cache else None
    if cache and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("queries") == queries and stored.get("rewriter") == args.rewriter:
            return stored["groups"]
    groups = [[q] for q in queries]
    if args.rewriter and args.samples:
        import torch

        from grape_cli.rewrite import load_rewriter

        torch.manual_seed(0)
        rewriter = load_rewriter(args.rewriter, device="cpu", retriever=retriever)
        t = time.perf_counter()
        sampled = rewriter.rewrite(queries, n=args.samples, temperature=1.0)
        print(f"sampled {args.samples} rewrites of {len(queries)} queries in "
              f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
        groups = [[q, *s] for q, s in zip(queries, sampled, strict=True)]
    if cache:
        cache.write_text(
            json.dumps({"rewriter": args.rewriter, "queries": queries, "groups": groups})
        )
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, help="an index (default: a synthetic corpus)")
    ap.add_argument("--pairs", nargs="+", default=[], help="pairs files (with --index)")
    ap.add_argument("--rewriter", help="rewriter to sample rewrites from (with --index)")
    ap.add_argument("--samples", type=int, default=8, help="rewrites per query (a GRPO group)")
    ap.add_argument("--rewrites-cache", help="JSON file keeping the sampled rewrites")
    ap.add_argument("--n", type=int, default=100_000, help="synthetic corpus size")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--repeats", type=int, default=5, help="draws of the negatives per K")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    if args.index and not args.pairs:
        ap.error("--index needs --pairs")
    corpus, queries, targets, groups, what = from_index(args) if args.index else synthetic(args.n)
    load = os.getloadavg()[0]
    exact = rewards(queries, corpus, targets, None, 0, groups)
    print(what)
    print(
        f"{len(queries):,} (rewrite, target) pairs in {len(groups)} groups; exact rank reward: "
        f"mean {exact.mean():.3f}, quartiles {np.percentile(exact, [25, 50, 75]).round(3).tolist()}"
    )
    print(
        f"{'K':>6} {'Spearman':>9} {'within group':>13} {'mean |diff|':>12} "
        f"{'reversed':>9} {'tied':>6}"
    )
    report = {"what": what, "pairs": len(queries), "groups": len(groups), "ks": {}}
    for k in (int(x) for x in args.ks.split(",")):
        runs = [
            compare(exact, rewards(queries, corpus, targets, k, seed, groups), groups)
            for seed in range(1, args.repeats + 1)
        ]
        mean = {key: float(np.nanmean([r[key] for r in runs])) for key in runs[0]}
        report["ks"][k] = mean
        print(
            f"{k:>6} {mean['spearman_all']:>9.3f} {mean['spearman_within_group']:>13.3f} "
            f"{mean['mean_abs_diff']:>12.4f} {mean['reversed']:>9.3f} {mean['tied']:>6.3f}"
        )
    print(f"means over {args.repeats} draws each; {os.cpu_count()} CPUs, load average {load:.1f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
