"""`grape train`: end to end on the tiny models (weights change, every output file, resume,
LoRA), and each way it refuses bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from grape_cli.errors import InputError, ModelError, TrainingError, UsageError
from grape_cli.reward import DEFAULT_REWARD
from grape_cli.train import TrainConfig, TrainingInterrupted, split_pairs, train_rewriter

from .conftest import FAST, TRAIN_PROMPT


@pytest.fixture(scope="module")
def world(train_world):
    return train_world


def config(world, out, **kw) -> TrainConfig:
    args = dict(
        pairs=world["pairs"],
        index=world["index"],
        base_model=str(world["lm"]),
        out=out,
        eval_split=0.25,
        prompt=TRAIN_PROMPT,
        **FAST,
    )
    return TrainConfig(**{**args, **kw})


def test_cli_end_to_end_changes_weights_and_writes_every_file(trained_run, cli):
    world, out, result = trained_run, trained_run["run"], trained_run["result"]
    assert result["out"] == str(out.resolve())
    assert result["train_pairs"] == 12 and result["heldout_pairs"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = {r["step"]: r["heldout"] for r in rows if "heldout" in r}
    assert set(heldout) == {0, 2, 4}
    # The kept step is the one the held-out score says is best (earliest on a tie).
    best = max((2, 4), key=lambda s: (heldout[s]["recall@10"], heldout[s]["mrr"], -s))
    assert result["best_step"] == best and result["after"] == heldout[best]
    assert result["seconds_per_step"] > result["reward_seconds_per_step"] > 0
    for name in (
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
        "grape.json", "grape.local.json", "metrics.jsonl", "training.png", "heldout.jsonl",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.partial")), "the partial folder is cleaned up"

    before = load_file(world["lm"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"

    meta = json.loads((out / "grape.json").read_text())
    assert meta["format"] == "grape-rewriter" and meta["format_version"] == 2
    assert meta["adapter"] is False and meta["reward"] == DEFAULT_REWARD
    # A local base model is named, not located: its path is a machine-local fact.
    assert meta["base_model"] == "lm" and meta["base_model_local"] is True
    local = json.loads((out / "grape.local.json").read_text())
    assert local["base_model_path"] == str(world["lm"].resolve())
    assert local["pairs"] == str(world["pairs"].resolve()) and local["out"] == str(out)
    assert str(world["root"]) not in json.dumps(meta), "grape.json holds no local path"
    from grape_cli.store import Store

    store = Store.open(world["index"])
    assert meta["retriever"] == "tiny-clip" and local["retriever_path"] == store.model
    assert meta["index_fingerprint"] == store.fingerprint()
    assert meta["prompt"] == TRAIN_PROMPT.to_dict()
    assert meta["generation"] == {"max_new_tokens": 12}
    assert meta["settings"]["group_size"] == 4 and meta["settings"]["learning_rate"] == 1e-4
    m = meta["metrics"]
    assert m["tuned"] == result["after"] and m["none"] == result["none"]
    assert m["base"] == result["before"] and m["best_step"] == result["best_step"]

    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("reward", "rank_mean", "rank_median", "recall@10", "top_nontarget_cos",
                "random_cos", "target_cos", "step_seconds"):  # fmt: skip
        assert all(key in r for r in rows[1:]), key
    assert all(1 <= r["rank_mean"] <= 16 for r in rows[1:])
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all(
        t in map(str, world["photos"]) for h in held for t in h["targets"]
    )

    r = cli("train", world["pairs"], "--index", world["index"], "--out", out)
    assert r.exit_code == 2 and "already exists" in r.stderr


class Recorder:
    """Progress that records calls and can pull the plug (Ctrl-C) at a given step."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.advanced, self.fields, self.done = stop_at, [], [], 0

    def start(self, total, description):
        self.total = total

    def advance(self, n):
        self.advanced.append(n)
        self.done += n
        if self.stop_at is not None and self.done >= self.stop_at:
            raise KeyboardInterrupt

    def update(self, fields):
        self.fields.append(fields)


def test_interrupted_run_resumes_from_its_checkpoint(world, tmp_path):
    out = tmp_path / "runs" / "r"
    work = tmp_path / "runs" / ".r.partial"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as e:
        train_rewriter(config(world, out), Recorder(stop_at=3))
    assert "`resume`" in e.value.hint  # the CLI shows it as --resume
    assert not out.exists(), "no half-written run folder"
    assert (work / "state.json").is_file() and (work / "checkpoints" / "checkpoint-2").is_dir()
    first = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [0, 1, 2]

    with pytest.raises(UsageError, match="unfinished run"):
        train_rewriter(config(world, out))  # without --resume: refuses, keeps the work

    progress = Recorder()
    result = train_rewriter(config(world, out, resume=True), progress)
    assert progress.advanced[0] == 2 and sum(progress.advanced) == 4  # steps 3 and 4 only
    assert result.best_step in (2, 4)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[:3] == first, "rows before the checkpoint are kept as they were"
    assert not work.exists()
    assert (out / "grape.json").is_file() and (out / "model.safetensors").is_file()

    with pytest.raises(UsageError, match="already exists"):
        train_rewriter(config(world, out, resume=True))


def test_lora_writes_an_adapter_that_loads(world, tmp_path, cli):
    out = tmp_path / "lora"
    r = cli(
        "train", world["pairs"], "--index", world["index"], "--base-model", world["lm"],
        "--lora", "--lora-rank", 4, "--steps", 2, "--eval-every", 2, "--group-size", 4,
        "--queries-per-step", 4, "--max-new-tokens", 12, "--eval-split", 0.25,
        "--prompt-file", world["prompt"], "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    # The before/after table, as `grape eval` shows it.
    assert "none" in r.stdout and "(before)" in r.stdout and "(step 2)" in r.stdout
    assert "R@10" in r.stdout and "s/step" in r.stdout and "score inflation" in r.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    meta = json.loads((out / "grape.json").read_text())
    assert meta["adapter"] is True and meta["base_model"] == "lm" and meta["base_model_local"]
    assert meta["metrics"]["best_step"] == 2
    from grape_cli.rewrite import load_rewriter

    assert len(load_rewriter(str(out), device="cpu").rewrite(["a dog"])) == 1


def test_non_finite_loss_stops_with_one_line_and_stays_resumable(world, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    real = GRPOTrainer._compute_loss

    def poisoned(self, model, inputs):
        return real(self, model, inputs) * math.nan

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="non-finite at step 1") as e:
        train_rewriter(config(world, out))
    assert "`learning_rate`" in e.value.hint
    assert not out.exists()
    assert (tmp_path / ".nan.partial" / "state.json").is_file()  # --resume can pick it up


# ----------------------------------------------------------------------------- bad input


def test_too_few_pairs_says_how_many_are_needed(world, tmp_path):
    pairs = tmp_path / "few.jsonl"
    lines = world["pairs"].read_text().splitlines()[:4]
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"4 usable pair\(s\); an `eval_split` of 0.25 needs at least 5 \(4 to train, 1 held",
    ):
        train_rewriter(config(world, tmp_path / "x", pairs=pairs))
    assert not list(tmp_path.glob(".*"))  # nothing written


def test_missing_targets_skipped_or_strict(world, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    text = world["pairs"].read_text()
    pairs.write_text(text + json.dumps({"query": "gone", "target": "/nowhere/x.jpg"}) + "\n")
    with pytest.raises(InputError, match="not in the index"):
        train_rewriter(config(world, tmp_path / "x", pairs=pairs, strict=True))


def test_no_indexed_target_at_all(world, tmp_path):
    pairs = tmp_path / "elsewhere.jsonl"
    pairs.write_text(json.dumps({"query": "a cat", "target": "/elsewhere/cat.jpg"}) + "\n")
    with pytest.raises(InputError, match="none of the pairs") as e:
        train_rewriter(config(world, tmp_path / "x", pairs=pairs))
    assert "grape index" in e.value.hint


def test_separate_eval_pairs_still_need_enough_training_pairs(world, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(world["pairs"].read_text().splitlines()[:3]) + "\n")
    with pytest.raises(InputError, match=r"0 usable training pair.*at least 4"):
        train_rewriter(config(world, tmp_path / "x", pairs=few, eval_pairs=world["pairs"]))


def test_base_model_not_available_offline(world, tmp_path, cli):
    r = cli("train", world["pairs"], "--index", world["index"], "--base-model",
            "nobody/no-such-model", "--out", tmp_path / "x")  # fmt: skip
    assert r.exit_code == ModelError.exit_code
    assert "nobody/no-such-model" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not list(tmp_path.iterdir())


def test_resume_needs_an_unfinished_run(world, tmp_path):
    with pytest.raises(UsageError, match="no unfinished run"):
        train_rewriter(config(world, tmp_path / "nothing", resume=True))


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"reward": "ndcg"}, "rank-top"),
        ({"group_size": 1}, "2 or more"),
        ({"temperature": 0}, "above 0"),
        ({"eval_split": 0.0}, "`eval_pairs`"),
        ({"beta": -1}, "negative"),
        ({"negatives": 0}, "whole index"),
        ({"learning_rate": 3.0}, "small positive"),
        ({"vllm_mode": "remote"}, "trl vllm-serve"),
    ],
)
def test_config_errors_name_the_fix(kw, words):
    with pytest.raises(UsageError) as e:
        TrainConfig(pairs="p.jsonl", **kw)
    assert words in str(e.value)


def test_an_unknown_loss_type_is_left_to_trl_and_reported_in_one_line(world, tmp_path):
    with pytest.raises(TrainingError, match="Unknown loss type: ppo"):
        train_rewriter(config(world, tmp_path / "x", loss_type="ppo"))


def test_cli_rejects_unknown_reward(cli, tmp_path):
    r = cli("train", tmp_path / "p.jsonl", "--reward", "ndcg")
    assert r.exit_code == 2 and "unknown reward" in r.stderr


def test_checkpointing_is_turned_off_under_either_transformers_name():
    """Recent transformers renamed gradient_checkpointing; 5.17 (an H200 machine's) knows
    only the old name, and the new one stopped every `grape train` there."""
    from dataclasses import dataclass

    from trl import GRPOConfig

    from grape_cli.train.trainer import checkpointing_off

    @dataclass
    class Old:  # transformers 5.17 and earlier
        gradient_checkpointing: bool = True

    @dataclass
    class New(Old):
        activation_checkpointing: bool = True

    assert checkpointing_off(Old) == {"gradient_checkpointing": False}
    assert checkpointing_off(New) == {"activation_checkpointing": False}
    args = GRPOConfig(
        output_dir="unused", use_cpu=True, bf16=False, **checkpointing_off(GRPOConfig)
    )
    assert not args.gradient_checkpointing


def test_split_is_seeded_and_disjoint():
    a = split_pairs(list(range(50)), 0.1, seed=1)
    assert a == split_pairs(list(range(50)), 0.1, seed=1)
    assert a != split_pairs(list(range(50)), 0.1, seed=2)
    train, held = a
    assert len(held) == 5 and not set(train) & set(held)


# ----------------------------------------------------------------------------- learning

POOL = ["a red circle", "a green square", "a blue background", "a dog on the beach"]


def test_grpo_improves_heldout_recall_on_a_learnable_task(tmp_path, tiny_clip, tiny_lm, teach_lm):
    """The base rewriter answers with one of four captions; its greedy one ranks the target
    outside the top 10, another ranks it near the top. GRPO with the rank reward must find
    that out from the reward alone and lift held-out Recall@10 (queries it never saw)."""
    import numpy as np

    from grape_cli.index import index_folders
    from grape_cli.models import load_clip
    from grape_cli.rewrite import load_rewriter
    from grape_cli.store import Store

    from .conftest import noise_images

    noise_images(tmp_path / "photos", 64)
    index_folders([tmp_path / "photos"], tmp_path / "index", str(tiny_clip), workers=0)
    lm = teach_lm(tiny_lm, tmp_path / "lm", {f"query {i}": POOL[i % 4] for i in range(8)},
                  TRAIN_PROMPT, steps=20)  # fmt: skip
    greedy = load_rewriter(str(lm), prompt=TRAIN_PROMPT).rewrite(["query 21"])[0][0]
    store = Store.open(tmp_path / "index")
    meta, corpus = store.load_matrix(("path",))
    sims = load_clip(store.model, "cpu").encode_texts(POOL).numpy() @ corpus.T
    ranks = np.array([[int((s >= s[j]).sum()) for j in range(len(corpus))] for s in sims])
    g = POOL.index(greedy)
    # The target: outside the greedy caption's top 10, best reachable with another caption.
    target = min(
        (j for j in range(len(corpus)) if ranks[g, j] > 10),
        key=lambda j: min(ranks[w, j] for w in range(4) if w != g),
    )
    assert min(ranks[w, target] for w in range(4) if w != g) <= 5, "a caption reaches it"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"query": f"query {i}", "target": meta["path"][target]}) + "\n"
            for i in range(24)
        )
    )
    result = train_rewriter(
        TrainConfig(
            pairs=pairs, index=tmp_path / "index", base_model=str(lm), out=tmp_path / "run",
            prompt=TRAIN_PROMPT, steps=40, eval_every=5, group_size=8, queries_per_step=4,
            max_completion_length=10, eval_split=0.25, learning_rate=1e-3,
        )
    )  # fmt: skip
    assert result.before["recall@10"] == 0.0
    assert result.after["recall@10"] >= 0.5, result.after
    assert result.after["median_rank"] < result.before["median_rank"]


# ----------------------------------------------------------------------------- resume


def steps_logged(folder) -> list[int]:
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_killed_before_the_first_checkpoint_and_again_each_step_appears_once(world, tmp_path):
    out, work = tmp_path / "r", tmp_path / ".r.partial"
    with pytest.raises(TrainingInterrupted, match="no checkpoint yet"):
        train_rewriter(config(world, out, eval_every=3), Recorder(stop_at=1))
    assert steps_logged(work) == [0]  # the interrupt came before step 1 was logged
    for stop in (2, 4):  # resumed and killed again: once before, once after a checkpoint
        with pytest.raises(TrainingInterrupted):
            train_rewriter(config(world, out, resume=True, eval_every=3), Recorder(stop_at=stop))
    train_rewriter(config(world, out, resume=True, eval_every=3))
    assert steps_logged(out) == [0, 1, 2, 3, 4]


def test_sigkill_mid_run_then_resume_logs_every_step_once(world, tmp_path):
    """A real `grape train` process killed with SIGKILL (no cleanup runs), then resumed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "grape_cli", "train", world["pairs"], "--index", world["index"],
        "--base-model", world["lm"], "--steps", 6, "--eval-every", 3, "--group-size", 4,
        "--queries-per-step", 4, "--max-new-tokens", 12, "--eval-split", 0.25,
        "--prompt-file", world["prompt"], "--out", out,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(a) for a in args], env=env, stderr=subprocess.DEVNULL)
    metrics = tmp_path / ".run.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:  # past step 3
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(steps_logged(tmp_path / ".run.partial"))
    assert 3 <= killed_at < 6
    done = subprocess.run([str(a) for a in [*args, "--resume"]], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert steps_logged(out) == [0, 1, 2, 3, 4, 5, 6]


def test_an_over_long_query_is_named_not_left_to_a_transformers_warning(world, tmp_path):
    pairs = tmp_path / "long.jsonl"
    long_query = "a very long and rambling query about a red circle " * 80
    lines = world["pairs"].read_text().splitlines()
    lines[0] = json.dumps({"query": long_query, "target": json.loads(lines[0])["target"]})
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"1 training quer\(ies\) are too long") as e:
        train_rewriter(config(world, tmp_path / "x", pairs=pairs, eval_split=0.1))
    assert "a very long and rambling" in e.value.message and "512 tokens" in e.value.message
