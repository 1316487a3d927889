"""Where a `grape train` step goes: generation, the reward, and the rest (the policy's
forward/backward pass and the optimiser), on tiny models and a 10,000-image index.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py [--images 10000] [--steps 20]

The index holds random unit vectors written straight into a grape Store (the reward
reads vectors, never images). Timings come from TRL's own profiling contexts (its
`transformers.generate` block and one block per reward function) and from grape's
per-step clock; the first steps are warm-up and left out. Target: reward < 10% of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPTIONS = [
    f"a {size} {color} {shape} {where}"
    for size in ("small", "large")
    for color in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for where in ("on the left", "at the top", "in the middle")
]


def build_world(
    root: Path,
    n_images: int,
    clip_preset: str,
    lm_preset: str | dict,
    seed: int = 0,
    queries: list[str] = CAPTIONS,
):
    """A random index of `n_images`, a tiny LM whose tokenizer saw `queries`, and 200
    pairs asking them (in turn) for images of the index."""
    import numpy as np

    from grape_cli.models import canonical_clip_spec
    from grape_cli.prompt import PromptTemplate
    from grape_cli.store import Store, path_id
    from grape_cli.tiny import CLIP_PRESETS, build_tiny_clip, build_tiny_lm

    clip = build_tiny_clip(root / "clip", clip_preset, seed=seed)
    # The tokenizer sees the system prompt, as the bundled example's does, so prompts are short.
    texts = [PromptTemplate().system] * 20 + CAPTIONS * 5 + queries
    lm = build_tiny_lm(root / "lm", texts, preset=lm_preset, vocab_size=2500, seed=seed)

    dim = CLIP_PRESETS[clip_preset]["embed_dim"]
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_images, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store.open_for_write(root / "index", canonical_clip_spec(str(clip)), dim)
    paths = [f"/bench/img_{i:06d}.jpg" for i in range(n_images)]
    store.upsert(
        [
            {
                "id": path_id(p), "path": p, "root": "/bench", "size": 1, "mtime_ns": i,
                "hash": f"{i:032x}", "width": 64, "height": 64, "vector": vectors[i].tolist(),
            }
            for i, p in enumerate(paths)
        ]
    )  # fmt: skip
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"query": queries[i % len(queries)], "target": paths[i * 37]}))
            f.write("\n")
    return root / "index", lm, root / "pairs.jsonl"


def profile_blocks() -> dict[int, dict[str, float]]:
    """Patch TRL's profiling contexts to record seconds per (step, block)."""
    from trl.extras import profiling

    seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def record(self, duration: float) -> None:
        seconds[self.step][self.name.split(".", 1)[-1]] += duration

    profiling.ProfilingContext._log_metrics = record
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--queries-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--clip-preset", default="resnet", help="grape_cli.tiny.CLIP_PRESETS")
    ap.add_argument("--lm-preset", default="small", help="grape_cli.tiny.LM_PRESETS")
    ap.add_argument("--reward", default="rank")
    ap.add_argument("--negatives", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from grape_cli.train import TrainConfig, train_rewriter

    with tempfile.TemporaryDirectory() as tmp:
        index, lm, pairs = build_world(Path(tmp), args.images, args.clip_preset, args.lm_preset)
        blocks = profile_blocks()
        config = TrainConfig(
            pairs=pairs,
            index=index,
            base_model=str(lm),
            reward=args.reward,
            steps=args.steps,
            eval_every=args.steps,
            group_size=args.group_size,
            queries_per_step=args.queries_per_step,
            max_completion_length=args.max_new_tokens,
            negatives=args.negatives,
            device=args.device,
            out=Path(tmp) / "run",
        )
        train_rewriter(config)
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]

    steps = [r for r in rows if "step_seconds" in r][args.warmup :]
    if not steps:
        sys.exit("no steps left after the warm-up; raise --steps")
    # TRL stamps a block with the global step at its start: step s's work is block s - 1.
    parts = defaultdict(list)
    for r in steps:
        b = blocks.get(r["step"] - 1, {})
        parts["step"].append(r["step_seconds"])
        parts["generation"].append(b.get("transformers.generate", 0.0))
        parts["reward"].append(b.get(args.reward, 0.0) + b.get("format", 0.0))
    parts["rest"] = [
        s - g - w
        for s, g, w in zip(parts["step"], parts["generation"], parts["reward"], strict=True)
    ]
    mean = {k: statistics.mean(v) for k, v in parts.items()}
    figures = {
        "images": args.images,
        "steps_measured": len(steps),
        "completions_per_step": args.group_size * args.queries_per_step,
        "mean_completion_tokens": round(statistics.mean(r["completion_length"] for r in steps), 1),
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 4) for k, v in mean.items()},
        "share": {k: round(mean[k] / mean["step"], 3) for k in ("generation", "reward", "rest")},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"{args.images:,} images, {figures['completions_per_step']} completions/step "
        f"(~{figures['mean_completion_tokens']} tokens), {len(steps)} steps after "
        f"{args.warmup} warm-up, {figures['threads']} threads"
    )
    for k in ("generation", "reward", "rest", "step"):
        share = f"{mean[k] / mean['step']:6.1%}" if k != "step" else ""
        print(f"  {k:<11} {mean[k] * 1000:8.1f} ms {share}")
    verdict = "met" if mean["reward"] < 0.1 * mean["step"] else "MISSED"
    print(f"target reward < 10% of the step: {verdict}")


if __name__ == "__main__":
    main()
