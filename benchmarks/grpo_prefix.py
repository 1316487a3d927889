"""GRPO's loss pass with each prompt run once (`grape_cli.train.prefix`) against TRL's
own, on long queries: are the log-probabilities and gradients the same, and how much
faster are the pass and a whole `grape train` step?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_prefix.py [--steps 12] [--threads 2]

The model is the bundled example's base rewriter architecture (`examples.shapes.rewriter.
ARCH`, random weights), its tokenizer trained on the example's long-form queries; the
prompts are those queries under grape's default system message, as `grape train`
renders them. Part 1 runs one batch (8 prompts x 8 completions) through both passes,
forward and backward. Part 2 runs `grape train` (`train_rewriter`) for the same steps
and seed with `share_prompt` off, then on, and compares seconds per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_world


def long_queries(n: int, seed: int = 0) -> list[str]:
    from examples.shapes.world import make_scenes, query_long

    rng = random.Random(seed)
    return [query_long(s, rng) for s in make_scenes(n, seed)]


def one_pass(lm: Path, queries: list[str], group: int, completion: int, reps: int) -> dict:
    """TRL's pass and the shared-prefix pass on one batch: differences and seconds."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from grape_cli.prompt import PromptTemplate, render_prompt
    from grape_cli.train.prefix import shared_prefix_logps

    tok = PreTrainedTokenizerFast.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    prompts = [
        tok(render_prompt(tok, PromptTemplate(), q), add_special_tokens=False)["input_ids"]
        for q in queries
    ]
    width = max(map(len, prompts))
    rng = random.Random(0)
    rows, masks = [], []
    for p in prompts:  # left-padded prompts, right-padded completions, as TRL's batch
        for _ in range(group):
            n = rng.randint(completion // 3, completion)
            c = [rng.randrange(3, len(tok)) for _ in range(n)] + [tok.pad_token_id] * (
                completion - n
            )
            rows.append([tok.pad_token_id] * (width - len(p)) + p + c)
            masks.append([0] * (width - len(p)) + [1] * (len(p) + n) + [0] * (completion - n))
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    )
    passes = {
        "trl": lambda: GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model, ids, mask, completion, compute_entropy=True
        )[:2],
        "shared": lambda: shared_prefix_logps(model, ids, mask, completion, True),
    }
    out = {}
    for name, fn in passes.items():
        times = []
        for _ in range(reps):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            logps, entropy = fn()
            (logps * mask[:, -completion:]).sum().backward()
            times.append(time.perf_counter() - t)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[name] = (min(times), logps.detach(), entropy.detach(), grads)
    scored = mask[:, -completion:].bool()
    (t1, lp1, e1, g1), (t2, lp2, e2, g2) = out["trl"], out["shared"]
    return {
        "batch": f"{len(queries)} prompts x {group} completions",
        "prompt_tokens_mean": round(statistics.mean(map(len, prompts)), 1),
        "completion_tokens": completion,
        "max_abs_logp_difference": float((lp1 - lp2)[scored].abs().max()),
        "max_abs_entropy_difference": float((e1 - e2)[scored].abs().max()),
        "max_relative_grad_difference": max(
            float((g1[k] - g2[k]).norm() / (g1[k].norm() + 1e-12)) for k in g1
        ),
        "seconds_trl": round(t1, 4),
        "seconds_shared": round(t2, 4),
        "speedup": round(t1 / t2, 2),
    }


def train_steps(root: Path, index, lm, pairs, steps: int, share: bool, group: int) -> dict:
    from grape_cli.train import TrainConfig, train_rewriter

    out = root / f"run-{'shared' if share else 'trl'}"
    train_rewriter(
        TrainConfig(
            pairs=pairs, index=index, base_model=str(lm), steps=steps, eval_every=steps,
            group_size=group, queries_per_step=8, share_prompt=share, seed=0, out=out,
        )
    )  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][2:]  # the first two steps warm up
    return {
        "step_seconds": round(statistics.mean(r["step_seconds"] for r in rows), 3),
        "completion_tokens": round(statistics.mean(r["completion_length"] for r in rows), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="grape train steps per arm")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from examples.shapes.rewriter import ARCH

    queries = long_queries(200)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index, lm, pairs = build_world(root, 10_000, "resnet", ARCH, queries=queries)
        figures = {"pass": one_pass(lm, queries[:8], args.group_size, 24, reps=3)}
        arms = {
            name: train_steps(root, index, lm, pairs, args.steps, share, args.group_size)
            for name, share in (("trl", False), ("shared", True))
        }
    arms["speedup"] = round(arms["trl"]["step_seconds"] / arms["shared"]["step_seconds"], 2)
    figures["grape_train"] = arms
    figures["threads"] = args.threads
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    p = figures["pass"]
    print(f"loss pass, {p['batch']}, prompts ~{p['prompt_tokens_mean']} tokens:")
    print(f"  TRL {p['seconds_trl'] * 1000:.0f} ms, shared prefix {p['seconds_shared'] * 1000:.0f}"
          f" ms: {p['speedup']}x")  # fmt: skip
    print(f"  max |logp diff| {p['max_abs_logp_difference']:.2e}, max |entropy diff| "
          f"{p['max_abs_entropy_difference']:.2e}, max rel. grad diff "
          f"{p['max_relative_grad_difference']:.2e}")  # fmt: skip
    print(f"grape train, {args.steps - 2} steps measured per arm, {args.threads} threads:")
    for name in ("trl", "shared"):
        a = arms[name]
        print(f"  {name:<7} {a['step_seconds']:.3f} s/step (~{a['completion_tokens']} tokens)")
    print(f"  speedup {arms['speedup']}x")


if __name__ == "__main__":
    main()
