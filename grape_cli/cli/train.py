"""`grape train`."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from grape_cli.cli import app
from grape_cli.cli.progress import TRAIN_FIELDS, progress_for
from grape_cli.cli.render import console, err_console, plain, print_json
from grape_cli.cli.search import INDEX_HELP, PROMPT_HELP, _cell, _prompt
from grape_cli.errors import GrapeError
from grape_cli.reward import REWARDS
from grape_cli.train.config import TrainConfig, defaults_of

D = defaults_of(TrainConfig)  # every default has one owner: the library's config
# Config fields whose flag is not simply --field-name.
FLAGS = {"max_completion_length": "--max-new-tokens", "eval_pairs": "--eval", "pairs": "PAIRS"}


class TrainBar:
    """`grape_cli.train.TrainProgress` as a Rich bar: step, reward, rank, held-out R@10, ETA."""

    def __init__(self, enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not enabled,
        )
        self._task = None

    def __enter__(self) -> TrainBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, total: int, description: str) -> None:
        self._task = self._progress.add_task(description, total=total, stats="")

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def update(self, fields: dict) -> None:
        parts = [
            f"{label} {fields[key]:{fmt}}"
            for key, label, fmt in TRAIN_FIELDS
            if fields.get(key) is not None
        ]
        if self._task is not None:
            self._progress.update(self._task, stats="  ".join(parts))


def flag_of(field: str) -> str:
    """
    >>> flag_of("learning_rate"), flag_of("max_completion_length")
    ('--learning-rate', '--max-new-tokens')
    """
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def flagify(text: str | None) -> str | None:
    """A library message names config fields in backticks; on the command line, flags.

    >>> flagify("`steps` 0: use `eval_pairs`")
    '--steps 0: use --eval'
    """
    if not text:
        return text
    return re.sub(
        r"`([a-z_]+)`",
        lambda m: flag_of(m.group(1)) if m.group(1) in D or m.group(1) == "pairs" else m.group(0),
        text,
    )


@app.command("train")
def train_cmd(
    pairs: Path = typer.Argument(
        None,
        show_default="the pairs collected by `grape serve` for the index",
        help='Query/target pairs: JSON Lines {"query": ..., "target": PATH} (or "targets": '
        '[...], and "image" for a reference image), or CSV/TSV with query,target columns.',
    ),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    base_model: str = typer.Option(
        D["base_model"], "--base-model", help="Rewriter to tune: Hub id or folder."
    ),
    reward: str = typer.Option(
        D["reward"],
        "--reward",
        help="; ".join(f"{name}: {spec.description}" for name, spec in REWARDS.items()) + ".",
    ),
    steps: int = typer.Option(D["steps"], "--steps", help="GRPO steps."),
    group_size: int = typer.Option(
        D["group_size"], "--group-size", help="Rewrites sampled per query."
    ),
    queries_per_step: int = typer.Option(
        D["queries_per_step"], "--queries-per-step", help="Queries per step."
    ),
    beta: float = typer.Option(D["beta"], "--beta", help="KL coefficient (0: no reference model)."),
    learning_rate: float = typer.Option(
        D["learning_rate"],
        "--learning-rate",
        help="Default by model size: 1e-4 under 50M parameters, else 1e-5 with --lora, 1e-6 without.",
    ),
    temperature: float = typer.Option(
        D["temperature"], "--temperature", help="Sampling temperature."
    ),
    max_new_tokens: int = typer.Option(
        D["max_completion_length"], "--max-new-tokens", help="Longest rewrite, tokens."
    ),
    loss_type: str = typer.Option(
        D["loss_type"], "--loss-type", help="TRL's GRPO loss: dapo, grpo, dr_grpo, bnpo, ..."
    ),
    lora: bool = typer.Option(
        D["lora"], "--lora", help="Train a LoRA adapter, not the full model."
    ),
    lora_rank: int = typer.Option(
        D["lora_rank"], "--lora-rank", help="LoRA rank (alpha is twice it)."
    ),
    eval_split: float = typer.Option(
        D["eval_split"],
        "--eval-split",
        help="Fraction of PAIRS held out to pick the best checkpoint.",
    ),
    eval_pairs: Path = typer.Option(
        None, "--eval", help="Held-out pairs file (instead of --eval-split)."
    ),
    eval_every: int = typer.Option(
        D["eval_every"], "--eval-every", help="Steps between held-out evaluations and checkpoints."
    ),
    negatives: int = typer.Option(
        D["negatives"],
        "--negatives",
        help="Rank among K sampled images instead of the whole index (approximate; for "
        "very large indexes).",
    ),
    format_weight: float = typer.Option(
        D["format_weight"],
        "--format-weight",
        help="Weight of the penalty for empty, multi-line or long rewrites.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Run folder. Default: <index>/rewriters/<date-time>."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run in --out (default: the latest)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail when a target is not in the index (default: skip)."
    ),
    prompt_file: Path = typer.Option(None, "--prompt-file", help=PROMPT_HELP),
    device: str = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best)."),
    use_vllm: bool = typer.Option(False, "--use-vllm", help="Generate with vLLM (TRL's)."),
    vllm_mode: str = typer.Option(
        D["vllm_mode"],
        "--vllm-mode",
        help="colocate: vLLM inside the training processes; server: a `trl vllm-serve "
        "--model BASE` started first on GPUs of its own.",
    ),
    vllm_server: str = typer.Option(
        None, "--vllm-server", help="The vLLM server's URL (server mode; TRL's default else)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the base model's own Python code (trusted only)."
    ),
    seed: int = typer.Option(
        D["seed"], "--seed", help="Seed of the split, sampling and initialisation."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Tune a query rewriter with GRPO so that the index ranks your targets higher.

    The reward is where the frozen retriever ranks each pair's target image among the
    whole index under the rewritten query. The checkpoint with the best held-out
    Recall@10 is kept in the run folder with grape.json, metrics.jsonl and training.png;
    use it with `grape search --rewriter RUN_FOLDER`. Ctrl-C is safe: add --resume to
    continue. Several GPUs: `accelerate launch --num_processes N $(which grape) train ...`.
    """
    from transformers.utils import logging as hf_logging

    from grape_cli.train import train_rewriter

    hf_logging.disable_progress_bar()  # one bar here: ours (weights load and save often)
    pairs = pairs or _collected_pairs(index)
    try:
        config = TrainConfig(
            pairs=pairs,
            index=index,
            base_model=base_model,
            reward=reward,
            steps=steps,
            group_size=group_size,
            queries_per_step=queries_per_step,
            beta=beta,
            learning_rate=learning_rate,
            temperature=temperature,
            max_completion_length=max_new_tokens,
            loss_type=loss_type,
            lora=lora,
            lora_rank=lora_rank,
            eval_split=eval_split,
            eval_pairs=eval_pairs,
            eval_every=eval_every,
            out=out,
            resume=resume,
            strict=strict,
            negatives=negatives,
            format_weight=format_weight,
            prompt=_prompt(prompt_file),
            device=device,
            use_vllm=use_vllm,
            vllm_mode=vllm_mode,
            vllm_server=vllm_server,
            trust_remote_code=trust_remote_code,
            seed=seed,
        )
        with progress_for("step", enabled=not json_out, train=True) as progress:
            result = train_rewriter(config, progress)
    except GrapeError as e:
        e.message, e.hint = flagify(e.message), flagify(e.hint)
        raise
    if not result.main_process:
        return  # with `accelerate launch`, the main process reports for all
    if json_out:
        print_json(result.to_dict())
        return
    _render(result)


def _collected_pairs(index: Path | None) -> Path:
    """The pairs `grape serve` collected for the index ("this is the one" clicks)."""
    from grape_cli.errors import UsageError
    from grape_cli.feedback import pairs_file
    from grape_cli.store import default_index_dir

    path = pairs_file(Path(index or default_index_dir()).expanduser().resolve())
    if not path.is_file():
        raise UsageError(
            f"no PAIRS given, and the index has no collected pairs yet ({path})",
            'pass a pairs file, or collect pairs with `grape serve` ("this is the one")',
        )
    return path


def _render(result) -> None:
    table = Table(
        title=f"grape train: {result.heldout_pairs} held-out pairs "
        f"({result.train_pairs} trained on), reward {result.reward}",
        title_justify="left",
    )
    for name in ("rewriter", "R@1", "R@5", "R@10", "MRR", "median rank"):
        table.add_column(name, justify="left" if name == "rewriter" else "right")
    none = result.none
    for name, m in (
        ("none", result.none),
        (f"{result.base_model} (before)", result.before),
        (f"{result.out} (step {result.best_step})", result.after),
    ):
        d = (
            {k: m[k] - none[k] for k in m if isinstance(m[k], (int, float))}
            if m is not none
            else {}
        )
        table.add_row(
            plain(name),
            *(_cell(m[f"recall@{k}"], d.get(f"recall@{k}")) for k in (1, 5, 10)),
            _cell(m["mrr"], d.get("mrr")),
            _cell(m["median_rank"], d.get("median_rank"), lower_is_better=True, fmt="{:g}"),
        )
    console.print(table)
    _render_speed_and_inflation(result)
    if result.default:
        console.print(
            f"this rewriter is now the index's default (held-out R@10 "
            f"{result.after['recall@10']:.3f}): `grape search` uses it; "
            "`grape rewriters` lists the others",
            highlight=False,
        )


def _render_speed_and_inflation(result) -> None:
    share = (
        result.reward_seconds_per_step / result.seconds_per_step if result.seconds_per_step else 0
    )
    console.print(
        f"{result.seconds_per_step:.3f} s/step ({share:.0%} in the reward), "
        f"learning rate {result.learning_rate:g}",
        highlight=False,
    )
    if result.inflation:
        first, last = result.inflation["first"], result.inflation["last"]
        console.print(
            "score inflation (mean cosine of sampled rewrites, first -> last steps): "
            + ", ".join(
                f"{label} {first[k]:.3f} -> {last[k]:.3f}"
                for k, label in (
                    ("target_cos", "target"),
                    ("top_nontarget_cos", "top-10 non-targets"),
                    ("random_cos", "random images"),
                )
            ),
            highlight=False,
        )
    if result.after and result.after["recall@10"] < result.before["recall@10"]:
        err_console.print(
            "[yellow]held-out Recall@10 is lower than the base rewriter's[/]: try more pairs, "
            "more --steps or another --learning-rate",
            highlight=False,
        )
