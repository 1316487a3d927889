"""Composed-query GRPO with each prompt run once (`grape_cli.train.prefix`) against TRL's
own pass: seconds per `grape train` step on the bundled example's base VLM.

    make example   # once: the world, index and base VLM this reads
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_prefix_vlm.py [--steps 12] [--threads 1]

Both arms train the example's `rewriter-vlm-base` on `pairs/train-compose.jsonl` with its
settings (rank reward, 8 queries x 8 completions, seed 0), `share_prompt` off then on,
on one thread as the example's side-by-side runs do. The first three steps warm up.
Generation is TRL's in both arms (shared only in the loss pass for vision batches); the
per-step losses are printed side by side, which should agree to the last digits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import profile_blocks


def arm(work: Path, out: Path, steps: int, share: bool, blocks) -> dict:
    from grape_cli.prompt import PromptTemplate
    from grape_cli.train import TrainConfig, train_rewriter

    blocks.clear()  # both arms number their steps from 0
    train_rewriter(
        TrainConfig(
            pairs=work / "pairs" / "train-compose.jsonl", index=work / "index",
            base_model=str(work / "rewriter-vlm-base"), reward="rank",
            prompt=PromptTemplate.from_file(work / "prompt-vision.json"), steps=steps,
            group_size=8, queries_per_step=8, learning_rate=1e-4, beta=0.0,
            eval_every=steps, seed=0, out=out, share_prompt=share,
        )
    )  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r]
    timed = rows[3:]
    gen = [blocks.get(r["step"] - 1, {}).get("transformers.generate", 0.0) for r in timed]
    return {
        "step_seconds": round(statistics.mean(r["step_seconds"] for r in timed), 3),
        "generation_seconds": round(statistics.mean(gen), 3),
        "losses": [r.get("loss") for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("examples/shapes/work"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    if not (args.work / "rewriter-vlm-base").is_dir():
        sys.exit(f"no base VLM in {args.work}: run `make example` first (or pass --work)")

    import torch

    torch.set_num_threads(args.threads)
    blocks = profile_blocks()
    with tempfile.TemporaryDirectory() as tmp:
        arms = {
            name: arm(args.work, Path(tmp) / name, args.steps, share, blocks)
            for name, share in (("trl", False), ("shared", True))
        }
    print(f"grape train on composed pairs, {args.steps - 3} steps timed per arm, "
          f"{args.threads} thread(s):")  # fmt: skip
    for name, a in arms.items():
        print(
            f"  {name:<7} {a['step_seconds']:.3f} s/step (generation {a['generation_seconds']:.3f} s)"
        )
    print(f"  speedup {arms['trl']['step_seconds'] / arms['shared']['step_seconds']:.2f}x")
    diff = max(
        abs(a - b) for a, b in zip(arms["trl"]["losses"], arms["shared"]["losses"], strict=True)
    )
    print(f"  largest per-step loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
