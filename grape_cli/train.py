"""`grape train`: GRPO fine-tuning of the query rewriter against the frozen retriever.

Pairs -> their target rows in the index -> a train / held-out split -> TRL's
`GRPOTrainer` with a reward from `grape_cli.reward` -> the checkpoint with the best
held-out Recall@10 -> a run folder that `--rewriter runs/NAME` loads.

The run is built in a hidden sibling folder `.NAME.partial/` (TRL checkpoints,
`metrics.jsonl`, `state.json`, `best-STEP/`) and the finished folder is renamed into
place in one step: `runs/NAME` either does not exist or is complete. `--resume`
continues the partial folder from TRL's last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import grape_cli
from grape_cli.errors import IndexMismatch, InputError, ModelError, TrainingError, UsageError
from grape_cli.prompt import PromptTemplate, render_prompt
from grape_cli.reward import DEFAULT_CHUNK, FORMAT_WEIGHT, REWARDS

logger = logging.getLogger("grape")

DEFAULT_BASE = "Qwen/Qwen2.5-0.5B-Instruct"
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
MIN_TRAIN = 4  # fewer training queries than this cannot form a useful GRPO batch
STATE = "state.json"
METRICS = "metrics.jsonl"
PLOT = "training.png"
HELDOUT = "heldout.jsonl"
# Settings a resumed run takes from its state rather than from the command line.
_NOT_SETTINGS = {"pairs", "eval_pairs", "out", "resume", "device", "prompt", "index"}


class TrainingInterrupted(TrainingError):
    exit_code = 130


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything `grape train` needs; checked on creation (messages name the fix)."""

    pairs: str | Path
    index: str | Path | None = None
    base_model: str = DEFAULT_BASE
    reward: str = "rank"
    steps: int = 300
    group_size: int = 8  # completions sampled per query (GRPO's group)
    queries_per_step: int = 8
    beta: float = 0.0  # KL coefficient; 0 skips the reference model
    learning_rate: float | None = None  # None: chosen from model size, see `auto_lr`
    temperature: float = 1.0
    max_completion_length: int = 48  # tokens; also the rewriter's max_new_tokens
    loss_type: str = "dapo"
    lora: bool = False
    lora_rank: int = 16
    eval_split: float = 0.1
    eval_pairs: str | Path | None = None
    eval_every: int = 50  # steps between held-out evaluations (and checkpoints)
    out: str | Path | None = None
    resume: bool = False
    strict: bool = False
    negatives: int | None = None
    format_weight: float = FORMAT_WEIGHT
    max_words: int = 32
    prompt: PromptTemplate | None = None
    device: str | None = None
    use_vllm: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK

    def __post_init__(self):
        def need(ok: bool, what: str, fix: str) -> None:
            if not ok:
                raise UsageError(what, fix)

        need(
            self.reward in REWARDS,
            f"unknown reward {self.reward!r}",
            f"use one of {', '.join(REWARDS)}",
        )
        need(
            self.loss_type in LOSS_TYPES,
            f"unknown loss type {self.loss_type!r}",
            f"use one of {', '.join(LOSS_TYPES)}",
        )
        need(self.steps >= 1, f"--steps {self.steps}", "train for at least 1 step")
        need(
            self.group_size >= 2,
            f"--group-size {self.group_size}: GRPO compares completions within a group",
            "use 2 or more (8 is a good default)",
        )
        need(
            self.queries_per_step >= 1,
            f"--queries-per-step {self.queries_per_step}",
            "use 1 or more",
        )
        need(
            self.beta >= 0,
            f"--beta {self.beta} is negative",
            "use 0 (no KL term) or a small positive value such as 0.02",
        )
        need(
            self.learning_rate is None or 0 < self.learning_rate < 1,
            f"--learning-rate {self.learning_rate}",
            "use a small positive value such as 1e-5; leave it out to choose by model size",
        )
        need(
            self.temperature > 0,
            f"--temperature {self.temperature}: GRPO needs sampled, varied completions",
            "use a temperature above 0, such as 1.0",
        )
        need(
            4 <= self.max_completion_length <= 512,
            f"--max-new-tokens {self.max_completion_length}",
            "use 4 to 512 tokens (48 fits a caption)",
        )
        need(self.lora_rank >= 1, f"--lora-rank {self.lora_rank}", "use 1 or more (16 is typical)")
        need(
            self.eval_pairs is not None or 0 < self.eval_split <= 0.5,
            f"--eval-split {self.eval_split}",
            "hold out a fraction above 0 and at most 0.5, or pass --eval PAIRS",
        )
        need(
            self.eval_every >= 1,
            f"--eval-every {self.eval_every}",
            "evaluate every 1 or more steps",
        )
        need(
            self.negatives is None or self.negatives >= 1,
            f"--negatives {self.negatives}",
            "sample 1 or more negatives, or leave it out to rank among the whole index",
        )
        need(
            self.format_weight >= 0,
            f"--format-weight {self.format_weight} is negative",
            "use 0 (no format term) or more",
        )
        need(self.max_words >= 1, f"max_words {self.max_words}", "allow at least 1 word")
        need(self.chunk_size >= 1, f"chunk_size {self.chunk_size}", "use 1 or more rows per chunk")

    def settings(self) -> dict:
        """The settings recorded in state.json and grape.json (paths as strings)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt":
                continue
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def auto_lr(n_params: int, lora: bool) -> float:
    """Learning rate when none is given: measured 1e-4 for tiny rewriters (stack notes);
    the usual 1e-5 for LoRA and TRL's 1e-6 for full fine-tuning of real models.

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

    def to_dict(self) -> dict:
        return asdict(self)


class TrainProgress(Protocol):
    """What training reports while it runs; the CLI renders it with Rich."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def update(self, fields: dict) -> None: ...


class _NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def update(self, fields: dict) -> None:
        pass


# ----------------------------------------------------------------------------- data


@dataclass
class _Example:
    query: str
    targets: list[str]  # absolute paths, re-matched to rows on every start

    def to_json(self) -> dict:
        return {"query": self.query, "targets": self.targets}


def _matched(path, index_paths: list[str], strict: bool) -> list[_Example]:
    from grape_cli.pairs import describe_missing, load_pairs, match_targets

    matched, missing = match_targets(load_pairs(path), index_paths, strict=strict)
    if missing:
        logger.warning(
            "%s: %d target(s) are not in the index and were skipped: %s",
            path,
            len(missing),
            describe_missing(missing),
        )
    if not matched:
        raise InputError(
            f"none of the pairs in {path} has a target in the index",
            "index those photos with `grape index`, or fix the target paths",
        )
    return [_Example(p.query, [index_paths[r] for r in rows]) for p, rows in matched]


def split_pairs(examples: list, eval_split: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, round(F * n) held out (at least 1).

    >>> train, held = split_pairs(list(range(20)), 0.1, seed=0)
    >>> len(train), len(held), sorted(train + held) == list(range(20))
    (18, 2, True)
    """
    n = len(examples)
    n_eval = _n_eval(n, eval_split)
    if n - n_eval < MIN_TRAIN:
        need = next(
            m for m in range(MIN_TRAIN + 1, 10_000) if m - _n_eval(m, eval_split) >= MIN_TRAIN
        )
        raise InputError(
            f"{n} usable pair(s); --eval-split {eval_split} needs at least {need} "
            f"({need - _n_eval(need, eval_split)} to train, {_n_eval(need, eval_split)} held out)",
            "add pairs, or pass the held-out pairs separately with --eval PAIRS",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


def _n_eval(n: int, fraction: float) -> int:
    return max(1, round(fraction * n))


# ----------------------------------------------------------------------------- run folder


@dataclass
class _RunDirs:
    out: Path  # the finished folder (renamed into place at the end)
    work: Path  # the partial folder everything is built in

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"


def _run_dirs(config: TrainConfig) -> _RunDirs:
    if config.out is None and config.resume:
        runs = Path("runs")
        partials = sorted(runs.glob(".*.partial"), key=lambda p: p.stat().st_mtime)
        if not partials:
            raise UsageError("--resume: no unfinished run under runs/", "pass the run's --out")
        name = partials[-1].name[1 : -len(".partial")]
        out = runs / name
    else:
        out = Path(config.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out = out.expanduser().resolve()
    work = out.parent / f".{out.name}.partial"
    if out.exists():
        raise UsageError(
            f"run folder {out} already exists" + (" (that run finished)" if config.resume else ""),
            "pass another --out, or delete it",
        )
    if config.resume and not (work / STATE).is_file():
        raise UsageError(f"--resume: no unfinished run for {out}", "leave out --resume to start it")
    if not config.resume and work.exists() and not (work / STATE).is_file():
        shutil.rmtree(work)  # a start that failed before its state was written: nothing to keep
    if not config.resume and work.exists():
        raise UsageError(
            f"an unfinished run for {out} is in {work}",
            "continue it with --resume, or delete that folder to start over",
        )
    return _RunDirs(out, work)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)  # readers never see half a file


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that finished saving (TRL writes trainer_state.json last)."""
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.glob("checkpoint-*")
        if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def _read_rows(path: Path, upto: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r.get("step", 0) <= upto]


# ----------------------------------------------------------------------------- evaluation


class _Heldout:
    """Held-out queries scored the way `grape eval` scores them: greedy rewrites (the
    query itself when a rewrite is empty), the retriever's text tower, exact ranks."""

    def __init__(
        self,
        examples: list[_Example],
        rows: list[list[int]],
        clip,
        corpus,
        template,
        max_new_tokens: int,
    ):
        self.queries = [e.query for e in examples]
        self.rows, self.clip, self.corpus = rows, clip, corpus
        self.template, self.max_new_tokens = template, max_new_tokens

    def metrics_of(self, texts: list[str]) -> dict:
        from grape_cli.evaluate import retrieval_metrics, target_ranks

        vecs = self.clip.encode_texts(texts).numpy()
        return retrieval_metrics(target_ranks(vecs, self.corpus, self.rows))

    def rewrites(self, model, tokenizer, batch_size: int = 32) -> list[str]:
        from grape_cli.rewrite import generate_rewrites

        prompts = [render_prompt(tokenizer, self.template, q) for q in self.queries]
        was_training = model.training
        model.eval()
        try:
            out = []
            for i in range(0, len(prompts), batch_size):
                out += generate_rewrites(
                    model, tokenizer, prompts[i : i + batch_size], 1, None, self.max_new_tokens
                )
        finally:
            if was_training:
                model.train()
        return [g[0] or q for g, q in zip(out, self.queries, strict=True)]

    def evaluate(self, model, tokenizer) -> dict:
        return self.metrics_of(self.rewrites(model, tokenizer))


def _better(m: dict, best: dict | None) -> bool:
    """Held-out Recall@10 decides; MRR breaks ties; an equal score keeps the earlier step."""
    if best is None:
        return True
    return (m["recall@10"], m["mrr"]) > (best["recall@10"], best["mrr"])


# ----------------------------------------------------------------------------- callback


def _grape_callback_class():
    from transformers import TrainerCallback

    class GrapeCallback(TrainerCallback):
        """Step logs to metrics.jsonl, held-out evaluation, best checkpoint, progress, and a
        stop on a non-finite loss (raised in on_log, before the step could be saved)."""

        def __init__(
            self,
            run: _RunDirs,
            heldout: _Heldout,
            reward_fn,
            config: TrainConfig,
            progress,
            best: dict | None,
        ):
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
            loss, grad = logs.get("loss"), logs.get("grad_norm")
            if any(v is not None and not math.isfinite(v) for v in (loss, grad)):
                last = _last_checkpoint(self.run.checkpoints)
                raise TrainingError(
                    f"the loss became non-finite at step {state.global_step}"
                    + (f"; the last good checkpoint is {last.name}" if last else ""),
                    "start over with a lower --learning-rate or a --beta above 0, "
                    "or --resume to retry from the last checkpoint",
                )
            if "reward" not in logs:
                return
            row = _step_row(state.global_step, logs, self.config.reward)
            if self.step_seconds:
                row["step_seconds"] = round(self.step_seconds[-1], 4)
                row["reward_seconds"] = round(self.reward_seconds[-1], 4)
            step = state.global_step
            due = step % self.config.eval_every == 0 or step >= state.max_steps
            if due and state.is_world_process_zero:
                m = self.heldout.evaluate(model, processing_class)
                row["heldout"] = m
                if _better(m, (self.best or {}).get("metrics")):
                    self._save_best(model, processing_class, step, m)
            if state.is_world_process_zero:
                with open(self.run.work / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            self.progress.update(
                {
                    "reward": row.get("reward"),
                    "rank": row.get("rank_mean"),
                    "heldout_r10": (self.best or {}).get("metrics", {}).get("recall@10"),
                }
            )

        def _save_best(self, model, tokenizer, step: int, m: dict) -> None:
            tmp = self.run.work / f"best-{step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            final = self.run.work / f"best-{step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.best = {"step": step, "dir": final.name, "metrics": m}
            _write_json(self.run.work / "best.json", self.best)  # the switch is this one write
            for old in self.run.work.glob("best-*"):
                if old.name != final.name:
                    shutil.rmtree(old, ignore_errors=True)

    return GrapeCallback


_ROW_KEYS = {
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


def _step_row(step: int, logs: dict, reward: str) -> dict:
    row: dict[str, Any] = {"step": step}
    keys = {**_ROW_KEYS, f"rewards/{reward}/mean": "retrieval_reward"}
    for src, dst in keys.items():
        value = logs.get(src)
        if isinstance(value, (int, float)):
            row[dst] = round(float(value), 6)
    return row


# ----------------------------------------------------------------------------- training


def train_rewriter(config: TrainConfig, progress: TrainProgress | None = None) -> TrainResult:
    """Fine-tune a rewriter with GRPO; see the module docstring. Returns before/after."""
    with warnings.catch_warnings():
        # TRL 1.16 calls a name transformers 5 deprecates, every step; users cannot act on it.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return _train(config, progress)


def _train(config: TrainConfig, progress: TrainProgress | None) -> TrainResult:
    started = time.perf_counter()
    progress = progress or _NoProgress()
    run = _run_dirs(config)
    state = json.loads((run.work / STATE).read_text()) if config.resume else None
    if state:
        config = _resumed_config(config, state)
    prompt = (
        PromptTemplate.from_dict(state["prompt"]) if state else (config.prompt or PromptTemplate())
    )

    import torch

    from grape_cli.models import load_causal_lm, load_clip
    from grape_cli.store import Store, default_index_dir

    index_dir = Path(state["index"] if state else (config.index or default_index_dir()))
    store = Store.open(index_dir)
    meta, matrix = store.load_matrix(("path",))
    paths: list[str] = meta["path"]
    if not paths:
        raise InputError(f"index {store.root} has no images", "index some with `grape index`")
    fingerprint = store.fingerprint()
    if state and state["fingerprint"] != fingerprint:
        raise IndexMismatch(
            f"index {store.root} changed since this run started",
            "train against the index as it was, or start a new run (leave out --resume)",
        )

    if state:
        train_ex = [_Example(**e) for e in state["train"]]
        held_ex = [_Example(**e) for e in state["heldout"]]
    else:
        examples = _matched(config.pairs, paths, config.strict)
        if config.eval_pairs:
            held_ex = _matched(config.eval_pairs, paths, config.strict)
            train_ex = examples
            shared = {e.query for e in train_ex} & {e.query for e in held_ex}
            if shared:
                logger.warning(
                    "%d held-out quer(ies) also appear in %s: held-out scores will flatter",
                    len(shared),
                    config.pairs,
                )
            if len(train_ex) < MIN_TRAIN:
                raise InputError(
                    f"{len(train_ex)} usable training pair(s); training needs at least {MIN_TRAIN}",
                    "add pairs whose targets are in the index",
                )
        else:
            train_ex, held_ex = split_pairs(examples, config.eval_split, config.seed)
    row_of = {p: i for i, p in enumerate(paths)}
    train_rows, held_rows = (
        [[row_of[t] for t in e.targets] for e in ex] for ex in (train_ex, held_ex)
    )

    from grape_cli.models import pick_device

    args = _grpo_args(
        config, run, min(config.queries_per_step, len(train_ex)), pick_device(config.device)
    )
    device = str(args.device)
    model, tokenizer = load_causal_lm(
        config.base_model, "cpu", torch.float32, config.trust_remote_code
    )
    n_params = sum(p.numel() for p in model.parameters())
    lr = (
        config.learning_rate or (state or {}).get("learning_rate") or auto_lr(n_params, config.lora)
    )
    args.learning_rate = lr
    clip = load_clip(store.model, device)
    matrix = matrix.copy()  # writable, and shared with the CPU tensor below
    corpus = torch.from_numpy(matrix).to(device)

    from grape_cli.reward import FormatReward, RetrievalReward

    eos_ids = _eos_ids(model, tokenizer)
    reward_fn = RetrievalReward(
        config.reward,
        clip.encode_texts,
        corpus,
        eos_ids=eos_ids,
        chunk_size=config.chunk_size,
        negatives=config.negatives,
        seed=config.seed,
    )
    reward_funcs: list = [reward_fn]
    if config.format_weight > 0:
        reward_funcs.append(FormatReward(eos_ids, config.max_words))
        args.reward_weights = [1.0, config.format_weight]

    from datasets import Dataset

    dataset = Dataset.from_list(
        [
            {"prompt": render_prompt(tokenizer, prompt, e.query), "targets": r}
            for e, r in zip(train_ex, train_rows, strict=True)
        ]
    )
    heldout = _Heldout(held_ex, held_rows, clip, matrix, prompt, config.max_completion_length)
    best = (
        json.loads((run.work / "best.json").read_text())
        if (run.work / "best.json").is_file()
        else None
    )
    trainer = _make_trainer(config, model, tokenizer, reward_funcs, args, dataset)
    callback = _grape_callback_class()(run, heldout, reward_fn, config, progress, best)
    trainer.add_callback(callback)

    # Every check that can fail has passed: only now does the run folder appear.
    if not state:
        none_m = heldout.metrics_of(heldout.queries)
        base_m = heldout.evaluate(trainer.model, tokenizer)
        state = {
            "settings": config.settings(),
            "prompt": prompt.to_dict(),
            "index": str(store.root),
            "fingerprint": fingerprint,
            "learning_rate": lr,
            "train": [e.to_json() for e in train_ex],
            "heldout": [e.to_json() for e in held_ex],
            "none": none_m,
            "before": base_m,
        }
        if trainer.accelerator.is_main_process:
            run.work.mkdir(parents=True, exist_ok=True)
            _write_json(run.work / STATE, state)
            with open(run.work / METRICS, "w", encoding="utf-8") as f:
                f.write(json.dumps({"step": 0, "heldout": base_m, "heldout_none": none_m}) + "\n")
    checkpoint = _last_checkpoint(run.checkpoints)
    if checkpoint is not None:
        done = int(checkpoint.name[11:])
        rows = _read_rows(run.work / METRICS, upto=done)  # steps after it are redone
        (run.work / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))

    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        last = _last_checkpoint(run.checkpoints)
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}; "
            + (f"the run resumes from step {last.name[11:]}" if last else "no checkpoint yet"),
            f"continue with the same command plus --resume --out {run.out}",
        ) from None

    if not trainer.accelerator.is_main_process:
        return _result(config, run, state, callback, lr, started)
    _finish(config, run, state, store, callback.best, prompt)
    return _result(config, run, state, callback, lr, started)


def _resumed_config(config: TrainConfig, state: dict) -> TrainConfig:
    """The unfinished run's settings; values given now that differ are reported, not used."""
    saved = state["settings"]
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    ignored = [
        k
        for k, v in config.settings().items()
        if k not in _NOT_SETTINGS and k in saved and v != saved[k] and v != defaults.get(k)
    ]
    if ignored:
        logger.warning(
            "--resume keeps the unfinished run's settings; ignored: %s", ", ".join(ignored)
        )
    keep = {k: v for k, v in saved.items() if k not in _NOT_SETTINGS and k in defaults}
    return TrainConfig(**{**asdict(config), **keep, "prompt": None})


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's and the generation config's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids} - {None})


def _grpo_args(config: TrainConfig, run: _RunDirs, queries: int, device: str):
    from trl import GRPOConfig

    cuda = device.startswith("cuda")
    if config.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UsageError("--use-vllm needs vLLM", "pip install vllm, or leave out --use-vllm")
    import torch

    return GRPOConfig(
        output_dir=str(run.checkpoints),
        max_steps=config.steps,
        per_device_train_batch_size=queries * config.group_size,
        num_generations=config.group_size,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        loss_type=config.loss_type,
        learning_rate=config.learning_rate or 1e-6,  # replaced once the model size is known
        use_cpu=device == "cpu",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        # Checkpointing trades ~20% speed for memory; rewriters are small.
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.eval_every,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        use_vllm=config.use_vllm,
        vllm_mode="colocate",
        dataloader_num_workers=0,
    )


def _make_trainer(config: TrainConfig, model, tokenizer, reward_funcs, args, dataset):
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    try:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        if config.lora:
            raise ModelError(
                f"LoRA cannot be applied to {config.base_model}: {first}",
                "leave out --lora to train the full model",
            ) from e
        raise TrainingError(f"could not set up GRPO training: {first}", "check the settings") from e
    trainer.remove_callback(PrinterCallback)  # progress is ours; logs go to metrics.jsonl
    return trainer


# ----------------------------------------------------------------------------- output


def _finish(
    config: TrainConfig, run: _RunDirs, state: dict, store, best: dict | None, prompt
) -> None:
    """Assemble the run folder next to the partial one, then rename it into place."""
    from grape_cli.plot import plot_training

    if best is None:
        raise TrainingError("no held-out evaluation was recorded", "re-run with --resume")
    final = run.work / "final.tmp"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(run.work / best["dir"], final)
    rows = _read_rows(run.work / METRICS)
    shutil.copy(run.work / METRICS, final / METRICS)
    plot_training(rows, final / PLOT, reward=config.reward)
    with open(final / HELDOUT, "w", encoding="utf-8") as f:
        for e in state["heldout"]:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    steps = [r["step_seconds"] for r in rows if "step_seconds" in r]
    settings = {**state["settings"], "learning_rate": state["learning_rate"]}
    base = config.base_model
    if Path(base).expanduser().is_dir():  # a local base must still be found from elsewhere
        base = str(Path(base).expanduser().resolve())
    meta = {
        "format": "grape-rewriter",
        "format_version": 1,
        "grape_version": grape_cli.__version__,
        "base_model": base,
        "adapter": config.lora,
        "retriever": store.model,
        "index_fingerprint": state["fingerprint"],
        "reward": config.reward,
        "prompt": prompt.to_dict(),
        "generation": {"max_new_tokens": config.max_completion_length},
        "settings": settings,
        "metrics": {
            "before": {"none": state["none"], base: state["before"]},
            "after": {str(run.out): best["metrics"]},
            "best_step": best["step"],
            "heldout_pairs": len(state["heldout"]),
            "train_pairs": len(state["train"]),
            "seconds_per_step": round(statistics.mean(steps), 4) if steps else None,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(final / "grape.json", meta)
    run.out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(final, run.out)  # the one step that makes the run folder appear
    shutil.rmtree(run.work, ignore_errors=True)


def _inflation_summary(rows: list[dict]) -> dict:
    """Mean inflation measures over the first and last tenth of the steps."""
    steps = [r for r in rows if "target_cos" in r]
    if not steps:
        return {}
    k = max(1, len(steps) // 10)
    keys = ("target_cos", "top_nontarget_cos", "random_cos", "rank_mean")

    def mean(part):
        return {key: round(statistics.mean(r[key] for r in part if key in r), 4) for key in keys}

    return {"first": mean(steps[:k]), "last": mean(steps[-k:])}


def _result(config, run, state, callback, lr: float, started: float) -> TrainResult:
    rows = _read_rows(run.out / METRICS) or _read_rows(run.work / METRICS)
    best = callback.best or {}
    # Whole-run figures from metrics.jsonl, so a resumed run counts its earlier steps too.
    steps = [r["step_seconds"] for r in rows if "step_seconds" in r]
    rewards = [r["reward_seconds"] for r in rows if "reward_seconds" in r]
    return TrainResult(
        out=str(run.out),
        reward=config.reward,
        steps=config.steps,
        best_step=best.get("step"),
        train_pairs=len(state["train"]),
        heldout_pairs=len(state["heldout"]),
        learning_rate=lr,
        none=state["none"],
        before=state["before"],
        after=best.get("metrics", {}),
        seconds_per_step=round(statistics.mean(steps), 4) if steps else 0.0,
        reward_seconds_per_step=round(statistics.mean(rewards), 4) if rewards else 0.0,
        inflation=_inflation_summary(rows),
        seconds=round(time.perf_counter() - started, 2),
    )
