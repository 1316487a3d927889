"""What `grape train` is told: `TrainConfig`, validated on creation, and what it returns.

Every default lives here; the CLI reads them from this class. Messages name the config
field in backticks (`steps`); the CLI turns those into its flags.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

from grape_cli.errors import UsageError
from grape_cli.models import DEFAULT_LM
from grape_cli.prompt import DEFAULT_MAX_NEW_TOKENS, PromptTemplate
from grape_cli.ranking import DEFAULT_CHUNK
from grape_cli.reward import DEFAULT_REWARD, FORMAT_WEIGHT, get_reward

# Settings a resumed run takes from its state rather than from the caller.
NOT_SETTINGS = {"pairs", "eval_pairs", "out", "resume", "device", "prompt", "index"}


@dataclass
class TrainConfig:
    """Everything `grape train` needs; checked on creation (messages name the fix)."""

    pairs: str | Path
    index: str | Path | None = None
    base_model: str = DEFAULT_LM
    reward: str = DEFAULT_REWARD
    steps: int = 300
    group_size: int = 8  # completions sampled per query (GRPO's group)
    queries_per_step: int = 8
    beta: float = 0.0  # KL coefficient; 0 skips the reference model
    learning_rate: float | None = None  # None: chosen from model size, see `auto_lr`
    temperature: float = 1.0
    max_completion_length: int = DEFAULT_MAX_NEW_TOKENS  # also the rewriter's max_new_tokens
    loss_type: str = "dapo"  # TRL validates its own loss types
    lora: bool = False
    lora_rank: int = 16
    eval_split: float = 0.1
    eval_pairs: str | Path | None = None
    eval_every: int = 50  # steps between held-out evaluations (and checkpoints)
    out: str | Path | None = None  # None: <index>/rewriters/<date-time>
    resume: bool = False
    strict: bool = False
    negatives: int | None = None
    format_weight: float = FORMAT_WEIGHT
    max_words: int = 32
    prompt: PromptTemplate | None = None
    device: str | None = None
    use_vllm: bool = False
    vllm_mode: str = "colocate"  # or "server": `trl vllm-serve` on GPUs of its own
    vllm_server: str | None = None  # the server's base URL (server mode)
    trust_remote_code: bool = False
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK
    # Run each prompt once in GRPO's loss pass, not once per completion (same gradients;
    # `grape_cli.train.prefix`). Off only to reproduce a run made before it existed.
    share_prompt: bool = True

    def __post_init__(self):
        get_reward(self.reward)  # unknown: a UsageError listing the registered rewards
        for ok, what, fix in self._checks():
            if not ok:
                raise UsageError(what, fix)

    def _checks(self):
        yield self.steps >= 1, f"`steps` {self.steps}", "train for at least 1 step"
        yield (
            self.group_size >= 2,
            f"`group_size` {self.group_size}: GRPO compares completions within a group",
            "use 2 or more (8 is a good default)",
        )
        yield self.queries_per_step >= 1, f"`queries_per_step` {self.queries_per_step}", "use 1+"
        yield (
            self.beta >= 0,
            f"`beta` {self.beta} is negative",
            "use 0 (no KL term) or a small positive value such as 0.02",
        )
        yield (
            self.learning_rate is None or 0 < self.learning_rate < 1,
            f"`learning_rate` {self.learning_rate}",
            "use a small positive value such as 1e-5; leave it out to choose by model size",
        )
        yield (
            self.temperature > 0,
            f"`temperature` {self.temperature}: GRPO needs sampled, varied completions",
            "use a temperature above 0, such as 1.0",
        )
        yield (
            4 <= self.max_completion_length <= 512,
            f"`max_completion_length` {self.max_completion_length}",
            f"use 4 to 512 tokens ({DEFAULT_MAX_NEW_TOKENS} fits a caption)",
        )
        yield self.lora_rank >= 1, f"`lora_rank` {self.lora_rank}", "use 1 or more (16 is typical)"
        yield (
            self.eval_pairs is not None or 0 < self.eval_split <= 0.5,
            f"`eval_split` {self.eval_split}",
            "hold out a fraction above 0 and at most 0.5, or pass held-out `eval_pairs`",
        )
        yield self.eval_every >= 1, f"`eval_every` {self.eval_every}", "evaluate every 1+ steps"
        yield (
            self.negatives is None or self.negatives >= 1,
            f"`negatives` {self.negatives}",
            "sample 1 or more negatives, or leave it out to rank among the whole index",
        )
        yield (
            self.format_weight >= 0,
            f"`format_weight` {self.format_weight} is negative",
            "use 0 (no format term) or more",
        )
        yield self.max_words >= 1, f"`max_words` {self.max_words}", "allow at least 1 word"
        yield self.chunk_size >= 1, f"`chunk_size` {self.chunk_size}", "use 1 or more rows"
        yield (
            self.vllm_mode in ("colocate", "server"),
            f"`vllm_mode` {self.vllm_mode!r}",
            "use colocate (vLLM inside training) or server (`trl vllm-serve`)",
        )

    def settings(self) -> dict:
        """The settings recorded in the run's state (paths as strings)."""
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in fields(self)
            if f.name != "prompt"
            for v in [getattr(self, f.name)]
        }

    def resumed(self, saved: dict) -> tuple[TrainConfig, list[str]]:
        """This config with an unfinished run's saved settings, and the names of values
        given now that differ from them (reported, not used)."""
        defaults = defaults_of(TrainConfig)
        ignored = [
            k
            for k, v in self.settings().items()
            if k not in NOT_SETTINGS and k in saved and v != saved[k] and v != defaults.get(k)
        ]
        keep = {k: v for k, v in saved.items() if k not in NOT_SETTINGS and k in defaults}
        return TrainConfig(**{**asdict(self), **keep, "prompt": None}), ignored


def defaults_of(cls) -> dict:
    """{field: default} of a dataclass (fields without a default are left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def auto_lr(n_params: int, lora: bool) -> float:
    """Learning rate when none is given: 1e-4 for tiny rewriters (the bundled example's
    GRPO runs are stable there and drift into junk at 5e-4); the usual 1e-5 for LoRA and
    TRL's 1e-6 for full fine-tuning of real models.

    >>> auto_lr(2_000_000, lora=False), auto_lr(500_000_000, lora=True), auto_lr(500_000_000, lora=False)
    (0.0001, 1e-05, 1e-06)
    """
    if n_params < 50_000_000:
        return 1e-4
    return 1e-5 if lora else 1e-6


@dataclass
class TrainResult:
    out: str
    reward: str
    steps: int
    best_step: int | None
    train_pairs: int
    heldout_pairs: int
    learning_rate: float
    none: dict  # held-out metrics of the query as is
    before: dict  # of the base rewriter (zero-shot)
    after: dict  # of the tuned rewriter (the best checkpoint)
    seconds_per_step: float
    reward_seconds_per_step: float
    inflation: dict = field(default_factory=dict)  # {"first": {...}, "last": {...}}
    seconds: float = 0.0
    base_model: str = ""
    default: bool = False  # it became the index's default rewriter
    main_process: bool = True  # False in the other processes of a multi-process run

    def to_dict(self) -> dict:
        return asdict(self)


class TrainProgress(Protocol):
    """What training reports while it runs; the CLI renders it."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def update(self, fields: dict) -> None: ...


class NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def update(self, fields: dict) -> None:
        pass
