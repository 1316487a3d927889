"""`grape train`: GRPO fine-tuning of a query rewriter against the frozen retriever.

One module per concern: `config` (what it is told and returns), `data` (pairs, split,
held-out score), `rundir` (the partial run folder, checkpoints, metrics log),
`callback` (the TRL callback), `trainer` (the run itself). The names below are the API.
"""

from grape_cli.train.config import TrainConfig, TrainProgress, TrainResult, auto_lr
from grape_cli.train.data import MIN_TRAIN, split_pairs
from grape_cli.train.trainer import TrainingInterrupted, train_rewriter

__all__ = [
    "MIN_TRAIN",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TrainingInterrupted",
    "auto_lr",
    "split_pairs",
    "train_rewriter",
]
