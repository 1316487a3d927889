"""`grape eval`: does a rewriter help on your own photos? Recall@k side by side.

Every metric comes from the exact rank of the target among all indexed images (not from
a truncated top-k list), computed by `grape_cli.ranking` like every rank grape reports
(ties count against the target; with several correct images the best-ranked one
counts). The plain query (`none`) is always evaluated first, as the baseline that the
other rewriters are compared with.

Composed pairs (a reference image plus an edit) get two more baselines first, the ones a
user has without grape: the reference image alone (`image-only`) and the edit text alone
(`text-only`); `none` is then their blend (the text's embedding plus the image's). Only a
rewriter that reads images (a vision-language model) is evaluated on them: a text-only
rewriter would never see what the edit applies to.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from grape_cli.errors import InputError
from grape_cli.pairs import Pair, describe_missing, match_targets, read_pairs
from grape_cli.query import Query
from grape_cli.ranking import fused_target_ranks, retrieval_metrics, target_ranks
from grape_cli.store import Store, default_index_dir

if TYPE_CHECKING:
    import numpy as np

    from grape_cli.index import Progress
    from grape_cli.models import ClipModel
    from grape_cli.prompt import PromptTemplate
    from grape_cli.rewrite import Rewriter

BASELINE = "none"
IMAGE_ONLY, TEXT_ONLY = "image-only", "text-only"


class _TextOnly:
    """A composed query's text as it is, its reference image left out."""

    name = TEXT_ONLY
    sees_images = True  # so the image is not blended in: the text is searched alone

    def rewrite(self, queries, n: int = 1, temperature=None) -> list[list[str]]:
        return [[q.text] for q in queries]


class _ImageOnly:
    """A composed query's reference image alone: no text to embed."""

    name = IMAGE_ONLY
    sees_images = False

    def rewrite(self, queries, n: int = 1, temperature=None) -> list[list[str]]:
        return [[] for _ in queries]


# --------------------------------------------------------------------------- report


@dataclass
class EvalRow:
    rewriter: str
    metrics: dict
    rewrite_ms_per_query: float  # wall time of rewriting, batched, divided by queries
    rewrites_per_query: int = 1
    fallbacks: int = 0  # empty rewrites replaced by the query itself


@dataclass
class EvalReport:
    pairs: str
    index: str
    model: str
    n_pairs: int
    n_evaluated: int
    missing: list[str] = field(default_factory=list)  # target paths not in the index
    duplicate_lines: list[int] = field(default_factory=list)  # repeats, counted once
    skipped_lines: list[int] = field(default_factory=list)  # pairs with no indexed target
    rows: list[EvalRow] = field(default_factory=list)
    per_query: str | None = None
    seconds: float = 0.0

    def baseline(self) -> EvalRow | None:
        return next((r for r in self.rows if r.rewriter == BASELINE), None)

    def deltas(self, row: EvalRow) -> dict:
        """row's metrics minus the baseline's (empty when there is no baseline)."""
        base = self.baseline()
        if base is None:
            return {}
        return {
            key: value - base.metrics[key]
            for key, value in row.metrics.items()
            if key != "n" and value is not None and base.metrics.get(key) is not None
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, out in zip(self.rows, d["rows"], strict=True):
            out["delta_vs_none"] = self.deltas(row)
        return d


# --------------------------------------------------------------------------- running


def evaluate_rewriter(
    rewriter: Rewriter,
    clip: ClipModel,
    queries: list[Query],
    corpus: np.ndarray,
    targets: Sequence[Sequence[int]],
    *,
    rewrites: int = 1,
    temperature: float | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> tuple[EvalRow, list[list[str]], np.ndarray]:
    """(metrics row, rewrites of each query, rank of each query's target) for one rewriter.

    The building block of `evaluate`, for callers that hold a loaded rewriter and CLIP
    model already (held-out evaluation during training).
    """
    import numpy as np

    texts: list[list[str]] = []
    if progress is not None:
        progress.start(len(queries), f"rewrite {_short(rewriter.name)}")
    start = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        batch = queries[i : i + batch_size]
        texts += rewriter.rewrite(batch, n=rewrites, temperature=temperature)
        if progress is not None:
            progress.advance(len(batch))
    seconds = time.perf_counter() - start

    from grape_cli.query import embed_rewrites

    groups = embed_rewrites(clip, queries, texts, getattr(rewriter, "sees_images", False))
    if all(len(g) == 1 for g in groups):
        ranks = target_ranks(np.concatenate(groups), corpus, targets)
    else:
        ranks = fused_target_ranks(groups, corpus, targets)
    row = EvalRow(
        rewriter=rewriter.name,
        metrics=retrieval_metrics(ranks),
        rewrite_ms_per_query=1000 * seconds / max(1, len(queries)),
        rewrites_per_query=max((len(g) for g in texts), default=1),
        fallbacks=getattr(rewriter, "fallbacks", 0),
    )
    return row, texts, ranks


def evaluate(
    pairs_path: str | Path,
    index_dir: str | Path | None = None,
    rewriters: Sequence[str] = (),  # none given: the index's default rewriter, if any
    *,
    device: str | None = None,
    strict: bool = False,
    per_query_path: str | Path | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    prompt: PromptTemplate | None = None,
    trust_remote_code: bool = False,
    rewrites: int = 1,
    temperature: float | None = None,
    seed: int | None = 0,
) -> EvalReport:
    """Evaluate `rewriters` (the baseline `none` is added first) on a pairs file."""
    started = time.perf_counter()
    pairs_file = read_pairs(pairs_path)  # bad input fails before any model is loaded
    store = Store.open(index_dir or default_index_dir())
    specs = _specs(store, rewriters)
    report, matched, corpus = _prepare(pairs_path, pairs_file, store, strict)

    from grape_cli.models import load_clip, pick_device
    from grape_cli.rewrite import load_rewriter
    from grape_cli.search import cpu_threads

    device = pick_device(device)
    clip = load_clip(store.model, device)
    queries = [p.query for p, _ in matched]
    targets = [rows for _, rows in matched]
    if any(q.composed for q in queries):
        specs = [IMAGE_ONLY, TEXT_ONLY, *check_reads_images(specs, pairs_path, bool(rewriters))]
    outputs: dict[str, tuple[list[list[str]], np.ndarray]] = {}
    # The idle cores only: a thread sharing a busy core slows all of them (see search.py).
    with cpu_threads():
        for spec in specs:
            rewriter = {IMAGE_ONLY: _ImageOnly, TEXT_ONLY: _TextOnly}.get(spec)
            rewriter = rewriter() if rewriter else load_rewriter(
                spec,
                device=device,
                prompt=prompt,
                trust_remote_code=trust_remote_code,
                retriever=store.model,
            )  # fmt: skip
            if seed is not None:
                import torch

                torch.manual_seed(seed)  # sampled rewrites repeat from run to run
            row, texts, ranks = evaluate_rewriter(
                rewriter, clip, queries, corpus, targets, rewrites=rewrites,
                temperature=temperature, batch_size=batch_size, progress=progress,
            )  # fmt: skip
            report.rows.append(row)
            outputs[spec] = (texts, ranks)
            del rewriter
            _free_memory(device)

    if per_query_path is not None:
        report.per_query = str(Path(per_query_path).expanduser().resolve())
        write_per_query(report.per_query, pairs_file.pairs, matched, specs, outputs)
    report.seconds = time.perf_counter() - started
    return report


def check_reads_images(specs: Sequence[str], pairs_path, explicit: bool = True) -> list[str]:
    """The specs, having refused before any model loads a text-only rewriter for composed
    pairs. The index's default rewriter (`explicit` False) is left out with a warning."""
    import logging

    from grape_cli.errors import UsageError
    from grape_cli.rewrite import is_none, reads_images

    blind = [s for s in specs if not is_none(s) and not reads_images(s)]
    if blind and not explicit:
        logging.getLogger("grape").warning(
            "the index's default rewriter reads text only; composed pairs are evaluated "
            "with the baselines alone (give a vision-language --rewriter to compare one)"
        )
        return [s for s in specs if s not in blind]
    if blind:
        raise UsageError(
            f"{pairs_path} has composed queries (a reference image plus text), and rewriter "
            f"{blind[0]} reads text only",
            "give a vision-language rewriter (e.g. --rewriter Qwen/Qwen2.5-VL-3B-Instruct), "
            "or --rewriter none for the image, text and blended baselines",
        )
    return list(specs)


def _specs(store: Store, rewriters: Sequence[str]) -> list[str]:
    """`none` first, then each rewriter asked for, or else the index's default one."""
    if not rewriters:
        from grape_cli.rewriters import resolve

        rewriters = [resolve(store.root, None, store.model)[0]]
    return list(dict.fromkeys([BASELINE, *(r or BASELINE for r in rewriters)]))


def _prepare(pairs_path, pairs_file, store: Store, strict: bool):
    """(the report's header, the pairs matched to index rows, the corpus matrix)."""
    pairs = pairs_file.pairs
    meta, corpus = store.load_matrix(("path",))
    if len(corpus) == 0:
        raise InputError(
            f"index {store.root} has no images yet", "add some with `grape index PHOTOS_DIR`"
        )
    matched, missing = match_targets(pairs, meta["path"], strict=strict)
    if not matched:
        raise InputError(
            f"none of the {len(pairs)} pairs has a target in index {store.root} "
            f"(missing: {describe_missing(missing)})",
            "index the photos first, or check that the paths in the pairs file are right "
            "(relative paths are relative to the pairs file)",
        )
    matched_lines = {p.line for p, _ in matched}
    report = EvalReport(
        pairs=str(Path(pairs_path).expanduser().resolve()),
        index=str(store.root),
        model=store.model,
        n_pairs=len(pairs),
        n_evaluated=len(matched),
        missing=missing,
        duplicate_lines=sorted(pairs_file.duplicates),
        skipped_lines=[p.line for p in pairs if p.line not in matched_lines],
    )
    return report, matched, corpus


def write_per_query(
    path: str | Path,
    pairs: list[Pair],
    matched: list[tuple[Pair, list[int]]],
    specs: list[str],
    outputs: dict[str, tuple[list[list[str]], np.ndarray]],
) -> None:
    """JSON Lines, one per pair in file order: query, targets, each rewriter's rewrites and
    target rank; pairs whose targets are not indexed are written too, with a reason."""
    position = {p.line: i for i, (p, _) in enumerate(matched)}
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            rec: dict = {"line": pair.line, **pair.query.to_dict(), "targets": list(pair.targets)}
            i = position.get(pair.line)
            if i is None:
                rec["skipped"] = "no target in the index"
            else:
                rec["rewrites"] = {s: outputs[s][0][i] for s in specs}
                rec["rank"] = {s: int(outputs[s][1][i]) for s in specs}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _free_memory(device: str) -> None:
    gc.collect()  # the next rewriter must not share memory with this one
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
