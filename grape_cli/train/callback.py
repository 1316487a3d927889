"""The TRL/transformers callback that turns a GRPO run into grape's run folder: one
metrics row per step, held-out evaluation and the best checkpoint, progress, and a stop
on a non-finite loss (raised in `on_log`, before the step could be saved)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from transformers import TrainerCallback

from grape_cli.errors import TrainingError
from grape_cli.ranking import better
from grape_cli.train.rundir import RunDirs, last_checkpoint, save_best

# TRL's log keys -> metrics.jsonl's columns.
ROW_KEYS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "rewards/format/mean": "format_reward",
    "grape/rank_mean": "rank_mean",
    "grape/rank_median": "rank_median",
    "grape/recall@10": "recall@10",
    "grape/target_cos": "target_cos",
    "grape/top_nontarget_cos": "top_nontarget_cos",
    "grape/random_cos": "random_cos",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "entropy": "entropy",
    "kl": "kl",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "clipped_ratio",
    "frac_reward_zero_std": "frac_reward_zero_std",
}


def step_row(step: int, logs: dict, reward: str) -> dict:
    """One metrics.jsonl row from TRL's logs of a step.

    >>> step_row(3, {"reward": 0.5, "rewards/rank/mean": 0.75, "junk": "x"}, "rank")
    {'step': 3, 'reward': 0.5, 'retrieval_reward': 0.75}
    """
    row: dict[str, Any] = {"step": step}
    keys = {**ROW_KEYS, f"rewards/{reward}/mean": "retrieval_reward"}
    for src, dst in keys.items():
        value = logs.get(src)
        if isinstance(value, (int, float)):
            row[dst] = round(float(value), 6)
    return row


class GrapeCallback(TrainerCallback):
    def __init__(self, run: RunDirs, heldout, reward_fn, config, progress, best: dict | None):
        self.run, self.heldout, self.reward_fn = run, heldout, reward_fn
        self.config, self.progress, self.best = config, progress, best
        self.step_started = 0.0
        self.step_seconds: list[float] = []
        self.reward_seconds: list[float] = []
        self._reward_mark = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.progress.start(state.max_steps, "training")
        if state.global_step:
            self.progress.advance(state.global_step)

    def on_step_begin(self, args, state, control, **kw):
        self.step_started = time.perf_counter()
        self._reward_mark = self.reward_fn.seconds

    def on_step_end(self, args, state, control, **kw):
        self.step_seconds.append(time.perf_counter() - self.step_started)
        self.reward_seconds.append(self.reward_fn.seconds - self._reward_mark)
        self.progress.advance(1)

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kw):
        logs = logs or {}
        self._stop_if_not_finite(logs, state.global_step)
        if "reward" not in logs:
            return
        row = step_row(state.global_step, logs, self.config.reward)
        if self.step_seconds:
            row["step_seconds"] = round(self.step_seconds[-1], 4)
            row["reward_seconds"] = round(self.reward_seconds[-1], 4)
        step = state.global_step
        due = step % self.config.eval_every == 0 or step >= state.max_steps
        if due and state.is_world_process_zero:
            m = self.heldout.evaluate(model, processing_class)
            row["heldout"] = m
            if better(m, (self.best or {}).get("metrics")):
                self.best = save_best(self.run, model, processing_class, step, m, self.best)
        if state.is_world_process_zero:
            with open(self.run.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.progress.update(
            {
                "step": step,
                "reward": row.get("reward"),
                "rank": row.get("rank_mean"),
                "heldout_r10": (self.best or {}).get("metrics", {}).get("recall@10"),
            }
        )

    def _stop_if_not_finite(self, logs: dict, step: int) -> None:
        loss, grad = logs.get("loss"), logs.get("grad_norm")
        if any(v is not None and not math.isfinite(v) for v in (loss, grad)):
            last = last_checkpoint(self.run.checkpoints)
            raise TrainingError(
                f"the loss became non-finite at step {step}"
                + (f"; the last good checkpoint is {last.name}" if last else ""),
                "start over with a lower `learning_rate` or a `beta` above 0, "
                "or `resume` to retry from the last checkpoint",
            )
