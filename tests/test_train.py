"""`grape train`: end to end on the tiny models (weights change, every output file, resume,
LoRA), and each way it refuses bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from grape_cli.errors import InputError, ModelError, TrainingError, UsageError
from grape_cli.index import index_folders
from grape_cli.prompt import PromptTemplate
from grape_cli.train import TrainConfig, TrainingInterrupted, split_pairs, train_rewriter

CAPTIONS = [
    "a red circle",
    "a green square",
    "a dog on the beach",
    "a cat on a sofa",
    "a blue background",
    "a small circle on the left",
    "a large square at the top",
    "photo of a sunset",
]
# A short prompt keeps the tiny LM's steps fast; the real default is a chat prompt.
PROMPT = PromptTemplate(system="", user="{query}")
FAST = dict(steps=4, eval_every=2, group_size=4, queries_per_step=4, max_completion_length=12)


def _images(folder, n: int) -> list:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    paths = [folder / f"img_{i:02d}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
    return paths


def _teach_to_stop(teach_lm, src, dst):
    """A few supervised steps so the random tiny LM writes short captions and then EOS,
    as any real rewriter does (a random one never ends and earns the reward's floor)."""
    examples = {f"query {i}: {c}": c for i, c in enumerate(CAPTIONS)}
    return teach_lm(src, dst, examples, PROMPT, steps=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip, tiny_lm, teach_lm):
    """An index of 16 images, 16 pairs, a rewriter that stops, and a prompt file."""
    root = tmp_path_factory.mktemp("train-world")
    photos = _images(root / "photos", 16)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    with open(root / "pairs.jsonl", "w") as f:
        for i, p in enumerate(photos):
            f.write(json.dumps({"query": f"query {i}: {CAPTIONS[i % 8]}", "target": str(p)}) + "\n")
    (root / "prompt.json").write_text(json.dumps(PROMPT.to_dict()))
    return {
        "root": root,
        "index": root / "index",
        "pairs": root / "pairs.jsonl",
        "lm": _teach_to_stop(teach_lm, tiny_lm, root / "lm"),
        "prompt": root / "prompt.json",
        "photos": photos,
    }


def config(world, out, **kw) -> TrainConfig:
    args = dict(
        pairs=world["pairs"],
        index=world["index"],
        base_model=str(world["lm"]),
        out=out,
        eval_split=0.25,
        prompt=PROMPT,
        **FAST,
    )
    return TrainConfig(**{**args, **kw})


def test_cli_end_to_end_changes_weights_and_writes_every_file(world, tmp_path, cli):
    out = tmp_path / "runs" / "first"
    r = cli(
        "train", world["pairs"], "--index", world["index"], "--base-model", world["lm"],
        "--steps", 4, "--eval-every", 2, "--group-size", 4, "--queries-per-step", 4,
        "--max-new-tokens", 12, "--eval-split", 0.25, "--prompt-file", world["prompt"],
        "--out", out, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["out"] == str(out.resolve())
    assert result["train_pairs"] == 12 and result["heldout_pairs"] == 4
    assert result["best_step"] in (2, 4)
    assert result["seconds_per_step"] > result["reward_seconds_per_step"] > 0
    for name in (
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
        "grape.json", "metrics.jsonl", "training.png", "heldout.jsonl",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.partial")), "the partial folder is cleaned up"

    before = load_file(world["lm"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"

    meta = json.loads((out / "grape.json").read_text())
    assert meta["format"] == "grape-rewriter" and meta["format_version"] == 1
    assert meta["adapter"] is False and meta["reward"] == "rank"
    assert meta["base_model"] == str(world["lm"].resolve())
    from grape_cli.store import Store

    store = Store.open(world["index"])
    assert meta["retriever"] == store.model
    assert meta["index_fingerprint"] == store.fingerprint()
    assert meta["prompt"] == PROMPT.to_dict()
    assert meta["generation"] == {"max_new_tokens": 12}
    assert meta["settings"]["group_size"] == 4 and meta["settings"]["learning_rate"] == 1e-4
    m = meta["metrics"]
    assert set(m["before"]) == {"none", str(world["lm"].resolve())}
    assert m["after"][str(out.resolve())]["n"] == 4
    assert m["best_step"] == result["best_step"]

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "heldout" in rows[0] and "heldout" in rows[2] and "heldout" in rows[4]
    for key in ("reward", "rank_mean", "rank_median", "recall@10", "top_nontarget_cos",
                "random_cos", "target_cos", "step_seconds"):  # fmt: skip
        assert all(key in r for r in rows[1:]), key
    assert all(1 <= r["rank_mean"] <= 16 for r in rows[1:])
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all(
        t in map(str, world["photos"]) for h in held for t in h["targets"]
    )

    # The run folder is a rewriter the rest of grape loads.
    from grape_cli.rewrite import load_rewriter

    rewriter = load_rewriter(str(out), device="cpu")
    assert rewriter.prompt == PROMPT and rewriter.max_new_tokens == 12
    assert len(rewriter.rewrite(["a red circle"])[0]) == 1

    # Human output: the before/after table.
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
    assert "--resume" in e.value.hint
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
    assert meta["adapter"] is True and meta["base_model"] == str(world["lm"].resolve())
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
    assert "--learning-rate" in e.value.hint
    assert not out.exists()
    assert (tmp_path / ".nan.partial" / "state.json").is_file()  # --resume can pick it up


# ----------------------------------------------------------------------------- bad input


def test_too_few_pairs_says_how_many_are_needed(world, tmp_path):
    pairs = tmp_path / "few.jsonl"
    lines = world["pairs"].read_text().splitlines()[:4]
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"4 usable pair\(s\); --eval-split 0.25 needs at least 5 \(4 to train, 1 held out\)",
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
    with pytest.raises(InputError, match=r"3 usable training pair.*at least 4"):
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
        ({"eval_split": 0.0}, "--eval PAIRS"),
        ({"beta": -1}, "negative"),
        ({"loss_type": "ppo"}, "dapo"),
        ({"negatives": 0}, "whole index"),
        ({"learning_rate": 3.0}, "small positive"),
    ],
)
def test_config_errors_name_the_fix(kw, words):
    with pytest.raises(UsageError) as e:
        TrainConfig(pairs="p.jsonl", **kw)
    assert words in str(e.value)


def test_cli_rejects_unknown_reward(cli, tmp_path):
    r = cli("train", tmp_path / "p.jsonl", "--reward", "ndcg")
    assert r.exit_code == 2 and "unknown reward" in r.stderr


def test_split_is_seeded_and_disjoint():
    a = split_pairs(list(range(50)), 0.1, seed=1)
    assert a == split_pairs(list(range(50)), 0.1, seed=1)
    assert a != split_pairs(list(range(50)), 0.1, seed=2)
    train, held = a
    assert len(held) == 5 and not set(train) & set(held)
