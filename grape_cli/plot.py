"""training.png: reward, target rank, held-out Recall@10 and score inflation over steps."""

from __future__ import annotations

import os
from pathlib import Path


def plot_training(rows: list[dict], path: str | Path, reward: str = "rank") -> Path:
    """Draw the four panels from metrics.jsonl rows; written atomically to `path`."""
    # The object API with the Agg canvas: no pyplot state, no GUI toolkit, a faster import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    path = Path(path)
    steps = [r for r in rows if "reward" in r]

    def series(key: str, source: list[dict] = steps):
        pts = [(r["step"], r[key]) for r in source if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    ax = axes[0][0]
    ax.plot(*series("reward"), label="total (with format term)")
    ax.plot(*series("retrieval_reward"), label=f"{reward} reward")
    ax.set_title("reward")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ax.plot(*series("rank_mean"), label="mean")
    ax.plot(*series("rank_median"), label="median")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "125" else "")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_title("target rank of sampled rewrites (lower is better)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    evals = [
        {"step": r["step"], "r10": r["heldout"]["recall@10"]}
        for r in rows
        if isinstance(r.get("heldout"), dict)
    ]
    ax.plot(*series("r10", evals), marker="o", label="held-out (greedy)")
    ax.plot(*series("recall@10"), alpha=0.4, label="training batch (sampled)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Recall@10")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    ax.plot(*series("target_cos"), label="to target")
    ax.plot(*series("top_nontarget_cos"), label="to top-10 non-targets")
    ax.plot(*series("random_cos"), label="to random images")
    ax.set_title("score inflation: mean cosine of rewrites")
    ax.legend(fontsize=8)

    for ax in axes[1]:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.08, hspace=0.25, wspace=0.18)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
