"""RESULTS.md for the shapes example: tables computed from grape's own JSON outputs."""

from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

import numpy as np

from examples.shapes.rewriter import hedges, one_colour_twice
from examples.shapes.world import ATTRIBUTES

ROWS = ("none", "base", "grpo-similarity", "grpo-rank", "grpo-rank-top")
REWARDS = ("rank", "rank-top", "similarity")
SHIFTS = ("zh", "long", "zh-unseen", "long-unseen")
COMPOSE_SHIFTS = ("compose", "compose-unseen")
COMPOSE_BASELINES = ("image only", "text only", "blend")
COMPOSE_ROWS = (*COMPOSE_BASELINES, "base VLM", "grpo-similarity", "grpo-rank")


def _fmt(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def clean_fraction(rewrites: list[str], clip) -> float:
    """Share of rewrites with no format problem (grape's own format check) that fit the
    retriever's context window."""
    from grape_cli.reward import format_problems

    ok = [
        not format_problems(t, ended=True) and clip.count_tokens(t) <= clip.context_length
        for t in rewrites
    ]
    return float(np.mean(ok)) if ok else 0.0


@functools.cache
def _index_vectors(index_dir: Path):
    """Row of each path and the image vectors, read once for all rewriters and shifts."""
    import torch

    from grape_cli.store import Store

    meta, matrix = Store.open(index_dir).load_matrix(("path",))
    return {p: i for i, p in enumerate(meta["path"])}, torch.from_numpy(matrix.copy())


@functools.cache
def _records(per_query: Path) -> list[dict]:
    """One shift's per-query records (the same file serves every rewriter)."""
    recs = [json.loads(line) for line in per_query.read_text(encoding="utf-8").splitlines()]
    return [r for r in recs if "rewrites" in r]


def heldout_inflation(per_query: Path, spec: str, index_dir: Path, clip) -> dict:
    """Score inflation of one rewriter's held-out rewrites, measured as in training."""
    import torch

    from grape_cli.ranking import score_targets
    from grape_cli.reward import inflation

    row, corpus = _index_vectors(index_dir)
    recs = _records(per_query)
    texts = [r["rewrites"][spec][0] for r in recs]
    targets = [[row[t] for t in r["targets"] if t in row] for r in recs]
    q = clip.encode_texts(texts)
    ref = corpus[torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0))[:256]]
    out = inflation(score_targets(q, corpus, targets), q, ref)
    out["clean"] = clean_fraction(texts, clip)
    for key, test in (("hedging", hedges), ("one_colour_twice", one_colour_twice)):
        out[key] = float(np.mean([test(t) for t in texts])) if texts else 0.0
    return out


def write_results(work: Path, results: dict, names: dict[str, str], clip) -> Path:
    """Render RESULTS.md from `results` (what run.py collected) into `work`."""
    lines = ["# grape shapes example: results", ""]
    lines += [
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Seed {results['seed']}"
        + (" (quick mode: a smoke run, numbers mean nothing)." if results["quick"] else "."),
        "",
        "Settings: `" + json.dumps(results["settings"]) + "`",
        "",
    ]

    ret = results["retriever"]
    lines += [
        "## Retriever (tiny CLIP trained on English captions only)",
        "",
        "| held-out queries | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
    ]
    for shift in ("en", "zh", "long"):
        m = ret[shift]
        lines.append(
            f"| {shift} | {_fmt(m['recall@1'])} | {_fmt(m['recall@5'])} | {_fmt(m['recall@10'])} |"
        )
    lines.append("")

    oracle = results["eval"]["en"]["rows"][0]["metrics"]
    infl: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for shift in SHIFTS:
        report = results["eval"][shift]
        rows = {names.get(r["rewriter"], r["rewriter"]): r for r in report["rows"]}
        none_r10 = rows["none"]["metrics"]["recall@10"]
        span = oracle["recall@10"] - none_r10
        per_query = work / "eval" / f"per-query-{shift}.jsonl"
        lines += [
            f"## Held-out `{shift}` queries ({report['n_evaluated']} pairs)",
            "",
            "| rewriter | R@1 | R@5 | R@10 | MRR | median rank | gap closure R@10 "
            "| R@1 - oracle | clean rewrites | hedging | one colour twice | rewrite ms/query |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ROWS:
            r = rows[name]
            m = r["metrics"]
            gap = (m["recall@10"] - none_r10) / span if span > 0 else None
            stats = heldout_inflation(per_query, r["rewriter"], work / "index", clip)
            infl.setdefault(name, {})[shift] = stats
            summary.setdefault(name, {})[shift] = {**m, "closure": gap, **stats}
            hedging = "-" if name == "none" else f"{stats['hedging']:.0%}"
            twice = "-" if name == "none" else f"{stats['one_colour_twice']:.0%}"
            lines.append(
                f"| {name} | {_fmt(m['recall@1'])} | {_fmt(m['recall@5'])} "
                f"| {_fmt(m['recall@10'])} | {_fmt(m['mrr'])} | {m['median_rank']:.0f} "
                f"| {_fmt(gap, 2)} | {m['recall@1'] - oracle['recall@1']:+.3f} "
                f"| {stats['clean']:.0%} | {hedging} | {twice} | {r['rewrite_ms_per_query']:.1f} |"
            )
        lines.append(
            f"| en (oracle) | {_fmt(oracle['recall@1'])} | {_fmt(oracle['recall@5'])} "
            f"| {_fmt(oracle['recall@10'])} | {_fmt(oracle['mrr'])} "
            f"| {oracle['median_rank']:.0f} | 1.00 | +0.000 | - | - | - | - |"
        )
        lines.append("")
    (work / "summary.json").write_text(json.dumps(summary, indent=1))

    lines += [
        "## Rewards side by side",
        "",
        "GRPO gap closure at R@10 and R@1 (held-out pairs; `-unseen`: phrasings no training "
        "data used). Hedging: share of rewrites naming more than one value for one attribute. "
        "One colour twice: share giving the object and the background the same colour, which "
        "no scene has (a hedge across the two).",
        "",
        "| reward | "
        + " | ".join(f"{s} closure / R@1" for s in SHIFTS)
        + " | hedging | one colour twice |",
        "|---|" + "---|" * (len(SHIFTS) + 2),
    ]
    for reward in REWARDS:
        row = summary[f"grpo-{reward}"]
        cells = [f"{_fmt(row[s]['closure'], 2)} / {_fmt(row[s]['recall@1'])}" for s in SHIFTS]
        hedge = np.mean([row[s]["hedging"] for s in SHIFTS])
        twice = np.mean([row[s]["one_colour_twice"] for s in SHIFTS])
        lines.append(f"| {reward} | " + " | ".join(cells) + f" | {hedge:.1%} | {twice:.1%} |")
    lines.append("")

    lines += [
        "## Score inflation",
        "",
        "Mean cosine of a rewrite to its target, to its 10 best-scoring non-target "
        "images, and to 256 random corpus images. Held-out rewrites:",
        "",
        "| rewriter | shift | target | top-10 non-target | random |",
        "|---|---|---|---|---|",
    ]
    for name in ROWS:
        for shift, s in infl[name].items():
            lines.append(
                f"| {name} | {shift} | {s['target_cos']:.3f} "
                f"| {s['top_nontarget_cos']:.3f} | {s['random_cos']:.3f} |"
            )
    lines += [
        "",
        "During training (mean over the first and the last tenth of the steps):",
        "",
        "| reward | when | target | top-10 non-target | random |",
        "|---|---|---|---|---|",
    ]
    for reward in REWARDS:
        for when, s in results[f"train_{reward}"].get("inflation", {}).items():
            lines.append(
                f"| {reward} | {when} | {_fmt(s.get('target_cos'))} "
                f"| {_fmt(s.get('top_nontarget_cos'))} | {_fmt(s.get('random_cos'))} |"
            )
    lines.append("")

    comp = results.get("comprehension", {})
    if comp:
        lines += [
            "## How the base rewriter reads held-out queries",
            "",
            "Greedy rewrites of held-out scenes' queries: the share where the object's "
            "and the background's colours are swapped, and where an attribute is dropped "
            "or given a wrong value.",
            "",
            "| queries | colour mix-ups | "
            + " | ".join(f"{a} dropped / wrong" for a in ATTRIBUTES)
            + " |",
            "|---|---|" + "---|" * len(ATTRIBUTES),
        ]
        for key, rep in comp.items():
            g = rep["greedy"]
            cells = [f"{g[a]['dropped']:.0%} / {g[a]['wrong']:.0%}" for a in ATTRIBUTES]
            lines.append(f"| {key} | {rep['colour_mixup']:.0%} | " + " | ".join(cells) + " |")
        lines.append("")

    if "compose" in results.get("eval", {}):
        lines += compose_lines(work, results, clip)

    lines += ["## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["stages_s"].items()]
    # After `--only compose` the stages come from two runs, maybe on two machines: the
    # sum is no run's wall time, so say so rather than let it pass for one.
    total = (
        "total (two runs: the composed stages rerun)" if results.get("compose_rerun") else "total"
    )
    lines.append(f"| {total} | {sum(results['stages_s'].values()):.1f} |")
    runs = [r for r in (*REWARDS, "compose-rank", "compose-similarity") if f"train_{r}" in results]
    for reward in runs:
        t = results[f"train_{reward}"]
        lines.append(
            f"\nGRPO `{reward}`: {t['steps']} steps, {t['seconds_per_step']:.2f} s/step "
            f"(reward {t['reward_seconds_per_step'] * 1000:.0f} ms/step), best "
            f"checkpoint at step {t['best_step']}."
        )
    lines += [
        "",
        f"## `grape search` in Chinese with the `{results['search_reward']}`-tuned rewriter",
        "",
        "```",
        results["search"].rstrip(),
        "```",
        "",
    ]
    if "compose_search" in results:
        cs = results["compose_search"]
        lines += [
            "## `grape search`: a composed query with the `compose-rank` rewriter",
            "",
            f'Reference image `{Path(cs["image"]).name}` plus the edit "{cs["query"]}":',
            "",
            "```",
            cs["output"].rstrip(),
            "```",
            "",
        ]
    path = work / "RESULTS.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _miss_lines(work: Path, results: dict) -> list[str]:
    """Why the composed rewriters' held-out rewrites miss the first page, by attribute."""
    from examples.shapes.vlm import compose_misses
    from examples.shapes.world import load_scenes

    names = results["compose_names"]
    specs = [s for s, n in names.items() if n not in COMPOSE_BASELINES]
    scenes = load_scenes(work / "corpus")
    lines = [
        "Why rewrites miss the first page: of the held-out queries whose target ranks past "
        "10, the share whose rewrite names a wrong value, for the attributes read off the "
        "reference image (and for any the edit names):",
        "",
        "| rewriter | shift | misses | " + " | ".join(ATTRIBUTES) + " | edited |",
        "|---|---|---|" + "---|" * (len(ATTRIBUTES) + 1),
    ]
    for shift in COMPOSE_SHIFTS:
        misses = compose_misses(_records(work / "eval" / f"per-query-{shift}.jsonl"), scenes, specs)
        for spec in specs:
            m = misses[spec]
            lines.append(
                f"| {names[spec]} | {shift} | {m['misses']}/{m['queries']} | "
                + " | ".join(f"{m.get(f'{a} read_off_image', 0):.0%}" for a in ATTRIBUTES)
                + f" | {m.get('any edited', 0):.0%} |"
            )
    return [*lines, ""]


def compose_lines(work: Path, results: dict, clip) -> list[str]:
    """The composed-query tables: the baselines a user has without grape, the base VLM,
    each GRPO reward and the oracle (the target's own English caption)."""
    names = results["compose_names"]
    oracle = results["eval"]["compose-oracle"]["rows"][0]["metrics"]
    summary = {}
    lines = []
    for shift in COMPOSE_SHIFTS:
        report = results["eval"][shift]
        rows = {names.get(r["rewriter"], r["rewriter"]): r for r in report["rows"]}
        best = max(rows[b]["metrics"]["recall@10"] for b in COMPOSE_BASELINES)
        span = oracle["recall@10"] - best
        per_query = work / "eval" / f"per-query-{shift}.jsonl"
        lines += [
            f"## Held-out `{shift}` queries ({report['n_evaluated']} pairs: a reference image "
            "plus an edit)",
            "",
            "Gap closure: R@10 between the best baseline (image, text or blend) and the oracle.",
            "",
            "| rewriter | R@1 | R@5 | R@10 | MRR | median rank | gap closure R@10 "
            "| clean rewrites | hedging | one colour twice | rewrite ms/query |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in COMPOSE_ROWS:
            r = rows[name]
            m = r["metrics"]
            gap = (m["recall@10"] - best) / span if span > 0 else None
            stats = {}
            if name not in COMPOSE_BASELINES:
                stats = heldout_inflation(per_query, r["rewriter"], work / "index", clip)
            summary.setdefault(name, {})[shift] = {**m, "closure": gap, **stats}
            clean = f"{stats['clean']:.0%}" if stats else "-"
            hedge = f"{stats['hedging']:.0%}" if stats else "-"
            twice = f"{stats['one_colour_twice']:.0%}" if stats else "-"
            lines.append(
                f"| {name} | {_fmt(m['recall@1'])} | {_fmt(m['recall@5'])} "
                f"| {_fmt(m['recall@10'])} | {_fmt(m['mrr'])} | {m['median_rank']:.0f} "
                f"| {_fmt(gap, 2)} | {clean} | {hedge} | {twice} "
                f"| {r['rewrite_ms_per_query']:.1f} |"
            )
        lines += [
            f"| oracle (target caption) | {_fmt(oracle['recall@1'])} "
            f"| {_fmt(oracle['recall@5'])} | {_fmt(oracle['recall@10'])} "
            f"| {_fmt(oracle['mrr'])} | {oracle['median_rank']:.0f} | 1.00 | - | - | - | - |",
            "",
        ]
    lines += [
        "Score inflation of the compose rewriters' held-out rewrites (mean cosine to the "
        "target, the 10 best non-targets, 256 random images):",
        "",
        "| rewriter | shift | target | top-10 non-target | random |",
        "|---|---|---|---|---|",
    ]
    for name in COMPOSE_ROWS[len(COMPOSE_BASELINES) :]:
        for shift, s in summary[name].items():
            lines.append(
                f"| {name} | {shift} | {s['target_cos']:.3f} "
                f"| {s['top_nontarget_cos']:.3f} | {s['random_cos']:.3f} |"
            )
    lines.append("")
    lines += _miss_lines(work, results)
    reading = results.get("compose_reading", {})
    if reading:
        lines += [
            "How the base VLM reads held-out composed queries (greedy): the target's "
            "attributes the edit names, and those it has to read off the reference image.",
            "",
            "| phrasings | attributes | exact word | synonym | wrong | dropped |",
            "|---|---|---|---|---|---|",
        ]
        for phrasing, rep in reading.items():
            for part in ("edited", "read_off_image"):
                u = rep[part]
                lines.append(
                    f"| {phrasing} | {part.replace('_', ' ')} | "
                    + " | ".join(
                        f"{u.get(k, 0):.0%}" for k in ("exact", "synonym", "wrong", "dropped")
                    )
                    + " |"
                )
        lines += ["", "Wrong values among the attributes read off the image, by attribute:", ""]
        lines += [
            "| phrasings | " + " | ".join(ATTRIBUTES) + " |",
            "|---|" + "---|" * len(ATTRIBUTES),
        ]
        for phrasing, rep in reading.items():
            wrong = rep["read_off_image_wrong"]
            lines.append(
                f"| {phrasing} | " + " | ".join(f"{wrong[a]:.0%}" for a in ATTRIBUTES) + " |"
            )
        lines.append("")
    (work / "summary-compose.json").write_text(json.dumps(summary, indent=1))
    return lines
