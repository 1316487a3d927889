"""`grape train`: GRPO fine-tuning of the query rewriter against the frozen retriever.

Pairs -> their target rows in the index -> a train / held-out split -> TRL's
`GRPOTrainer` with a registered reward from `grape_cli.reward` -> the checkpoint with
the best held-out Recall@10 -> a run folder (`grape_cli.runfolder`) that
`--rewriter PATH` loads. See `grape_cli.train.rundir` for how a run survives a kill.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from grape_cli.errors import IndexMismatch, InputError, ModelError, TrainingError, UsageError
from grape_cli.prompt import PromptTemplate, render_prompt
from grape_cli.train.config import NoProgress, TrainConfig, TrainProgress, TrainResult, auto_lr
from grape_cli.train.data import Example, Heldout, matched_examples, split_examples
from grape_cli.train.rundir import (
    METRICS,
    STATE,
    RunDirs,
    checkpoint_step,
    last_checkpoint,
    read_json,
    read_rows,
    rewind,
    run_dirs,
    write_json,
)

logger = logging.getLogger("grape")

PLOT = "training.png"
HELDOUT = "heldout.jsonl"


class TrainingInterrupted(TrainingError):
    exit_code = 130


def train_rewriter(config: TrainConfig, progress: TrainProgress | None = None) -> TrainResult:
    """Fine-tune a rewriter with GRPO; see the module docstring. Returns before/after."""
    with warnings.catch_warnings():
        # TRL 1.16 calls a name transformers 5 deprecates, every step; users cannot act on it.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return _train(config, progress or NoProgress())


@dataclass
class _Corpus:
    store: object
    paths: list[str]
    matrix: object  # (N, d) float32, writable
    fingerprint: str

    def rows(self, examples: list[Example]) -> list[list[int]]:
        row_of = {p: i for i, p in enumerate(self.paths)}
        return [[row_of[t] for t in e.targets] for e in examples]


def _train(config: TrainConfig, progress: TrainProgress) -> TrainResult:
    started = time.perf_counter()
    from grape_cli.store import default_index_dir

    index_root = Path(config.index or default_index_dir()).expanduser().resolve()
    rank, world = launch_rank()
    if world > 1 and config.out is None:  # each process would date its own folder
        raise UsageError(
            f"{world} training processes need one run folder named in advance",
            "name it with `out`",
        )
    run = run_dirs(config.out, config.resume, index_root, check=rank == 0)
    if rank != 0:
        progress = NoProgress()  # one progress display, the main process's
    state = read_json(run.work / STATE) if config.resume else None
    if state:
        config, ignored = config.resumed(state["settings"])
        if ignored:
            logger.warning("resuming keeps the run's settings; ignored: %s", ", ".join(ignored))
    prompt = PromptTemplate.from_dict(state["prompt"]) if state else config.prompt
    corpus = _open_corpus(Path(state["index"]) if state else index_root, state)
    train_ex, held_ex = _examples(config, state, corpus.paths)
    vision = _reads_images(config.base_model, train_ex + held_ex)
    prompt = prompt or PromptTemplate.default(vision)

    import torch

    from grape_cli.models import load_causal_lm, load_clip, load_vlm, pick_device

    args = _grpo_args(
        config, run, min(config.queries_per_step, len(train_ex)), pick_device(config.device)
    )
    # A vision-language model comes with its processor, which carries the tokenizer.
    model, processing = (load_vlm if vision else load_causal_lm)(
        config.base_model, "cpu", torch.float32, config.trust_remote_code
    )
    tokenizer = processing.tokenizer if vision else processing
    lr = (
        config.learning_rate
        or (state or {}).get("learning_rate")
        or auto_lr(sum(p.numel() for p in model.parameters()), config.lora)
    )
    args.learning_rate = lr
    clip = load_clip(corpus.store.model, str(args.device))
    reward_fn, reward_funcs = _rewards(config, args, clip, corpus, _eos_ids(model, tokenizer))
    limits = (config.max_completion_length, _context_limit(model, tokenizer))
    dataset = _dataset(processing, prompt, train_ex, corpus.rows(train_ex), limits)
    heldout = Heldout(
        held_ex, corpus.rows(held_ex), clip, corpus.matrix, prompt, config.max_completion_length
    )
    trainer = _make_trainer(config, model, processing, reward_funcs, args, dataset)

    # Every check that can fail has passed: only now does the run folder appear.
    if not state:
        state = _start(config, run, trainer, heldout, prompt, corpus, train_ex, held_ex, lr)
    checkpoint = last_checkpoint(run.checkpoints)
    best = rewind(run, checkpoint_step(checkpoint)) if trainer.accelerator.is_main_process else None
    from grape_cli.train.callback import GrapeCallback

    callback = GrapeCallback(run, heldout, reward_fn, config, progress, best)
    trainer.add_callback(callback)
    _run_trainer(trainer, run, checkpoint)
    if trainer.accelerator.is_main_process:
        _finish(config, run, state, corpus, callback.best, prompt, vision)
    result = _result(config, run, state, callback, lr, started)
    result.main_process = trainer.accelerator.is_main_process
    if trainer.accelerator.is_main_process and callback.best:
        from grape_cli.rewriters import promote_if_better

        result.default = promote_if_better(corpus.store.root, run.out, callback.best["metrics"])
    return result


def launch_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as `accelerate launch` or torchrun
    set them; (0, 1) for a plain `grape train`. Read before the trainer starts, so that
    only the main process checks and prepares the run folder."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _reads_images(base_model: str, examples: list[Example]) -> bool:
    """Whether the base model is a vision-language model; a text-only one given pairs
    with reference images is refused here, before it loads."""
    from grape_cli.models import is_vlm_folder, resolve_lm_folder

    vision = is_vlm_folder(resolve_lm_folder(base_model))
    composed = sum(1 for e in examples if e.query.image)
    if 0 < composed < len(examples):
        # TRL's GRPOTrainer (1.16) hands a batch that mixes rows with and without an image
        # to the processor with a None image, which it refuses: fail here, not mid-run.
        raise UsageError(
            f"{composed} of {len(examples)} pairs have a reference image: grape trains on "
            "pairs that all have one, or none",
            "train on the composed pairs and the text pairs separately",
        )
    if composed and not vision:
        raise UsageError(
            f"{composed} pair(s) have a reference image, and base model {base_model} reads "
            "text only",
            "train a vision-language model (e.g. --base-model Qwen/Qwen2.5-VL-3B-Instruct), "
            "or leave the 'image' field out of the pairs",
        )
    return vision


def _open_corpus(index_root: Path, state: dict | None) -> _Corpus:
    from grape_cli.store import Store

    store = Store.open(index_root)
    meta, matrix = store.load_matrix(("path",))
    if not meta["path"]:
        raise InputError(f"index {store.root} has no images", "index some with `grape index`")
    fingerprint = store.fingerprint()
    if state and state["fingerprint"] != fingerprint:
        raise IndexMismatch(
            f"index {store.root} changed since this run started",
            "train against the index as it was, or start a new run (without `resume`)",
        )
    return _Corpus(store, meta["path"], matrix.copy(), fingerprint)


def _examples(config: TrainConfig, state: dict | None, paths: list[str]):
    if state:
        return (
            [Example.from_json(e) for e in state["train"]],
            [Example.from_json(e) for e in state["heldout"]],
        )
    examples = matched_examples(config.pairs, paths, config.strict)
    held = matched_examples(config.eval_pairs, paths, config.strict) if config.eval_pairs else None
    return split_examples(examples, held, config.eval_split, config.seed)


def _rewards(config: TrainConfig, args, clip, corpus: _Corpus, eos_ids: list[int]):
    import torch

    from grape_cli.reward import FormatReward, RetrievalReward

    reward_fn = RetrievalReward(
        config.reward,
        clip.encode_texts,
        torch.from_numpy(corpus.matrix).to(str(args.device)),
        eos_ids=eos_ids,
        chunk_size=config.chunk_size,
        negatives=config.negatives,
        seed=config.seed,
    )
    funcs: list = [reward_fn]
    if config.format_weight > 0:
        funcs.append(FormatReward(eos_ids, config.max_words))
        args.reward_weights = [1.0, config.format_weight]
    return reward_fn, funcs


def _dataset(processing, prompt: PromptTemplate, examples: list[Example], rows, limits):
    """TRL's dataset: the prompt and the target rows. A text model gets the rendered
    prompt; a vision-language model gets the chat messages and the reference `image`
    (TRL places it in the messages and applies the processor's template itself)."""
    from datasets import Dataset

    if not hasattr(processing, "image_processor"):
        records = [
            {"prompt": render_prompt(processing, prompt, e.query.text), "targets": r}
            for e, r in zip(examples, rows, strict=True)
        ]
        _check_prompt_lengths(processing, [r["prompt"] for r in records], examples, *limits)
        return Dataset.from_list(records)

    from grape_cli.query import read_image
    from grape_cli.rewrite import REFERENCE_MAX_SIDE

    rendered = [  # to check lengths; the image's own tokens come on top
        processing.apply_chat_template(
            prompt.vision_messages(e.query.text, bool(e.query.image)),
            add_generation_prompt=True,
            tokenize=False,
        )
        for e in examples
    ]
    _check_prompt_lengths(processing.tokenizer, rendered, examples, *limits)
    records = [
        {"prompt": prompt.messages(e.query.text), "targets": r}
        for e, r in zip(examples, rows, strict=True)
    ]
    if examples[0].query.image:  # all of them have one (see _reads_images)
        for rec, e in zip(records, examples, strict=True):
            rec["image"] = read_image(e.query.image, max_side=REFERENCE_MAX_SIDE)
    return Dataset.from_list(records)


def _context_limit(model, tokenizer) -> int | None:
    """Tokens the rewriter reads: the smaller of its tokenizer's and its model's limits
    (a tokenizer without one reports a huge sentinel)."""
    limits = [
        getattr(tokenizer, "model_max_length", None),
        getattr(model.config.get_text_config(), "max_position_embeddings", None),
    ]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10_000_000]
    return min(limits, default=None)


def _check_prompt_lengths(tokenizer, prompts: list[str], examples, max_new: int, limit) -> None:
    """A query too long for the rewriter's context is named here, not left to a
    transformers warning and a silently truncated prompt."""
    if limit is None:
        return
    budget = limit - max_new
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    long = [(e, n) for e, n in zip(examples, lengths, strict=True) if n > budget]
    if long:
        e, n = max(long, key=lambda x: x[1])
        raise InputError(
            f"{len(long)} training quer(ies) are too long for the rewriter: the longest "
            f"({e.query.text[:60]!r}…) makes a {n}-token prompt, and the rewriter reads "
            f"{limit} tokens including {max_new} for the rewrite",
            "shorten or drop those pairs, or use a base model with a longer context",
        )


def _start(config, run, trainer, heldout, prompt, corpus, train_ex, held_ex, lr) -> dict:
    """The run's state (what a resume needs) and metrics row 0: the held-out baselines."""
    none_m = heldout.as_is()
    base_m = heldout.evaluate(trainer.model, trainer.processing_class)
    state = {
        "settings": config.settings(),
        "prompt": prompt.to_dict(),
        "index": str(corpus.store.root),
        "fingerprint": corpus.fingerprint,
        "learning_rate": lr,
        "train": [e.to_json() for e in train_ex],
        "heldout": [e.to_json() for e in held_ex],
        "none": none_m,
        "before": base_m,
    }
    if trainer.accelerator.is_main_process:
        run.work.mkdir(parents=True, exist_ok=True)
        write_json(run.work / STATE, state)
        row0 = {"step": 0, "heldout": base_m, "heldout_none": none_m}
        run.metrics.write_text(json.dumps(row0) + "\n", encoding="utf-8")
    return state


def _run_trainer(trainer, run: RunDirs, checkpoint: Path | None) -> None:
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except ValueError as e:  # what TRL validates itself (its loss types) it reports here
        raise TrainingError(
            f"training stopped: {e}".splitlines()[0],
            "check the settings against TRL's GRPOConfig (e.g. `loss_type`)",
        ) from e
    except KeyboardInterrupt:
        last = last_checkpoint(run.checkpoints)
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}; "
            + (f"the run resumes from step {last.name[11:]}" if last else "no checkpoint yet"),
            f"continue with `resume` and `out` {run.out}",
        ) from None


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's and the generation config's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids} - {None})


def _grpo_args(config: TrainConfig, run: RunDirs, queries: int, device: str):
    import torch
    from trl import GRPOConfig

    if config.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UsageError("`use_vllm` needs vLLM", "pip install vllm, or leave out `use_vllm`")
    try:
        return _grpo_config(GRPOConfig, config, run, queries, device, torch)
    except ValueError as e:  # TRL validates its own settings (loss types, batch shapes)
        raise UsageError(
            f"TRL refused the settings: {e}".splitlines()[0], "see `grape train --help`"
        ) from None


def checkpointing_off(GRPOConfig) -> dict:
    """The setting that turns activation checkpointing off, under this transformers' name.

    Checkpointing trades ~20% speed for memory, and rewriters are small. TRL turns it on by
    default. Recent transformers (5.24 and 5.25, measured) call it `activation_checkpointing`
    and warn on the old name; 5.17 (an H200 machine's) knows only `gradient_checkpointing`.
    """
    names = {f.name for f in fields(GRPOConfig)}
    new = "activation_checkpointing"
    return {new if new in names else "gradient_checkpointing": False}


def _grpo_config(GRPOConfig, config: TrainConfig, run: RunDirs, queries: int, device, torch):
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
        bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        **checkpointing_off(GRPOConfig),
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.eval_every,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        **({"vllm_server_base_url": config.vllm_server} if config.vllm_server else {}),
        dataloader_num_workers=0,
    )


def _make_trainer(config: TrainConfig, model, processing, reward_funcs, args, dataset):
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from grape_cli.train.prefix import grpo_trainer_class

    if config.share_prompt:
        GRPOTrainer = grpo_trainer_class()  # TRL's, or ours for text batches

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
            processing_class=processing,
            peft_config=peft_config,
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        if config.lora:
            raise ModelError(
                f"LoRA cannot be applied to {config.base_model}: {first}",
                "leave out `lora` to train the full model",
            ) from e
        raise TrainingError(f"could not set up GRPO training: {first}", "check the settings") from e
    trainer.remove_callback(PrinterCallback)  # progress is ours; logs go to metrics.jsonl
    return trainer


# ----------------------------------------------------------------------------- output


def _finish(config: TrainConfig, run: RunDirs, state: dict, corpus, best, prompt, vision) -> None:
    """Assemble the run folder next to the partial one, then rename it into place."""
    import os

    from grape_cli.plot import plot_training

    if best is None:
        raise TrainingError("no held-out evaluation was recorded", "run again with `resume`")
    final = run.work / "final.tmp"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(run.work / best["dir"], final)
    rows = read_rows(run.metrics)
    (final / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plot_training(rows, final / PLOT, reward=config.reward)
    with open(final / HELDOUT, "w", encoding="utf-8") as f:
        for e in state["heldout"]:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    _run_info(config, run, state, corpus, best, prompt, rows, vision).write(final)
    run.out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(final, run.out)  # the one step that makes the run folder appear
    shutil.rmtree(run.work, ignore_errors=True)


def _run_info(config, run, state, corpus, best, prompt, rows, vision: bool):
    from grape_cli.runfolder import PUBLIC_SETTINGS, LocalFacts, RunInfo

    steps = [r["step_seconds"] for r in rows if "step_seconds" in r]
    settings = {k: v for k, v in state["settings"].items() if k in PUBLIC_SETTINGS}
    settings["learning_rate"] = state["learning_rate"]
    return RunInfo.for_models(
        config.base_model,
        corpus.store.model,
        reward=config.reward,
        prompt=prompt,
        adapter=config.lora,
        vision=vision,
        max_new_tokens=config.max_completion_length,
        index_fingerprint=state["fingerprint"],
        settings=settings,
        metrics={
            "none": state["none"],
            "base": state["before"],
            "tuned": best["metrics"],
            "best_step": best["step"],
            "heldout_pairs": len(state["heldout"]),
            "train_pairs": len(state["train"]),
            "seconds_per_step": round(statistics.mean(steps), 4) if steps else None,
        },
        local=LocalFacts(
            pairs=_abs(state["settings"].get("pairs")),
            eval_pairs=_abs(state["settings"].get("eval_pairs")),
            index=state["index"],
            out=str(run.out),
        ),
    )


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


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
    rows = read_rows(run.out / METRICS) or read_rows(run.metrics)
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
        base_model=config.base_model,
    )
