"""Shared fixtures: tiny models built locally, small photo folders, a CLI runner.

Nothing here downloads anything: HF_HUB_OFFLINE is forced so a Hub miss fails at once.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from grape_cli.prompt import PromptTemplate
from grape_cli.tiny import TINY_LM_TEXTS, build_tiny_clip, build_tiny_lm

# One intra-op thread: the tensors here are tiny, and on a 2-core machine that also runs
# subprocesses, torch's default of one thread per core spends its time waiting (measured
# 41 s vs 137 s for the whole suite under load).
torch.set_num_threads(1)

LM_TEXTS = TINY_LM_TEXTS


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight open_clip model folder (the 'test' preset: 32 px, dim 32)."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", "test", seed=0)


@pytest.fixture(scope="session")
def tiny_clip_b(tmp_path_factory):
    """A second, different tiny CLIP, for model-mismatch tests."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip-b", "test", seed=1)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A random-weight Qwen2-architecture LM with a trained BPE tokenizer and chat template."""
    return build_tiny_lm(
        tmp_path_factory.mktemp("models") / "tiny-lm",
        LM_TEXTS,
        preset="test",
        vocab_size=400,
        seed=0,
    )


def write_images(folder, n: int, seed: int = 0, size=(64, 48), prefix: str = "img"):
    """n random JPEG/PNG images; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ext = "png" if i % 3 == 0 else "jpg"
        p = folder / f"{prefix}_{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 12)
    write_images(folder / "nested" / "deeper", 4, seed=1, prefix="deep")
    return folder


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPE_HOME", str(tmp_path / "grape-home"))
    monkeypatch.delenv("GRAPE_INDEX", raising=False)


@pytest.fixture
def cli():
    """Run `grape ...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from grape_cli.cli import app

    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run


def _teach_lm(base, out, examples: dict[str, str], prompt, steps: int = 60):
    from grape_cli.tiny import teach_lm

    return teach_lm(base, out, examples, prompt, steps)


@pytest.fixture(scope="session")
def teach_lm():
    """`teach_lm(base, out, {query: caption}, prompt, steps)`: a tiny LM fine-tuned to answer."""
    return _teach_lm


# ----------------------------------------------------------------------------- training

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
TRAIN_PROMPT = PromptTemplate(system="", user="{query}")
FAST = dict(steps=4, eval_every=2, group_size=4, queries_per_step=4, max_completion_length=12)


def noise_images(folder, n: int, seed: int = 3, size: int = 32) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = [folder / f"img_{i:02d}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
    return paths


@pytest.fixture(scope="session")
def train_world(tmp_path_factory, tiny_clip, tiny_lm):
    """An index of 16 images, 16 pairs, a rewriter that stops, and a prompt file."""
    from grape_cli.index import index_folders

    root = tmp_path_factory.mktemp("train-world")
    photos = noise_images(root / "photos", 16)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    with open(root / "pairs.jsonl", "w") as f:
        for i, p in enumerate(photos):
            f.write(json.dumps({"query": f"query {i}: {CAPTIONS[i % 8]}", "target": str(p)}) + "\n")
    (root / "prompt.json").write_text(json.dumps(TRAIN_PROMPT.to_dict()))
    # A few supervised steps so the random tiny LM writes short captions and then EOS,
    # as any real rewriter does (a random one never ends and earns the reward's floor).
    examples = {f"query {i}: {c}": c for i, c in enumerate(CAPTIONS)}
    lm = _teach_lm(tiny_lm, root / "lm", examples, TRAIN_PROMPT, steps=20)
    return {
        "root": root,
        "index": root / "index",
        "pairs": root / "pairs.jsonl",
        "lm": lm,
        "prompt": root / "prompt.json",
        "photos": photos,
    }


@pytest.fixture(scope="session")
def trained_run(train_world, tmp_path_factory):
    """The real `grape train` command, run once on the tiny models: its run folder and
    its --json result. Tests that need a run folder use this one (copy it to change it)."""
    from grape_cli.cli import app
    from grape_cli.store import Store

    out = tmp_path_factory.mktemp("trained") / "runs" / "first"
    w = train_world
    r = CliRunner().invoke(
        app,
        [str(a) for a in (
            "train", w["pairs"], "--index", w["index"], "--base-model", w["lm"],
            "--steps", 4, "--eval-every", 2, "--group-size", 4, "--queries-per-step", 4,
            "--max-new-tokens", 12, "--eval-split", 0.25, "--prompt-file", w["prompt"],
            "--out", out, "--json",
        )],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return {
        **w,
        "run": out,
        "result": json.loads(r.stdout),
        "retriever": Store.open(w["index"]).model,
        "prompt": TRAIN_PROMPT,
    }


# ----------------------------------------------------------------------------- the Hub


def fake_hub_cache(cache, repo_id: str, folder, refs=("main",)):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot."""
    import shutil

    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "3" * 40
    snapshot = storage / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache folder that huggingface_hub reads from (fill it with
    `fake_hub_cache`); the one place tests point the Hub client at a stand-in."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- composed queries


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A random-weight Qwen2-VL with a processor built here (tokenizer, image processor,
    chat template): the layout of a Hub download, nothing downloaded."""
    from grape_cli.tiny import build_tiny_vlm

    folder = tmp_path_factory.mktemp("models") / "tiny-vlm"
    return build_tiny_vlm(folder, LM_TEXTS, preset="test", vocab_size=400, seed=0)


@pytest.fixture(scope="session")
def compose_world(tmp_path_factory, tiny_clip, tiny_vlm):
    """An index of 16 images, 16 composed pairs (a reference image outside the index plus
    an edit), a tiny VLM taught to answer with a caption and stop, and a prompt file."""
    from grape_cli.index import index_folders
    from grape_cli.query import Query
    from grape_cli.tiny import teach_vlm

    root = tmp_path_factory.mktemp("compose-world")
    photos = noise_images(root / "photos", 16)
    refs = noise_images(root / "refs", 16, seed=7)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    edits = [f"like this but {CAPTIONS[i % 8]}" for i in range(16)]
    with open(root / "pairs.jsonl", "w") as f:
        for edit, ref, target in zip(edits, refs, photos, strict=True):
            rec = {"query": edit, "image": f"refs/{ref.name}", "target": f"photos/{target.name}"}
            f.write(json.dumps(rec) + "\n")
    (root / "prompt.json").write_text(json.dumps(TRAIN_PROMPT.to_dict()))
    examples = [
        (Query(e, str(r)), CAPTIONS[i % 8])
        for i, (e, r) in enumerate(zip(edits, refs, strict=True))
    ]
    vlm = teach_vlm(tiny_vlm, root / "vlm", examples[:8], TRAIN_PROMPT, steps=20)
    return {
        "root": root,
        "index": root / "index",
        "pairs": root / "pairs.jsonl",
        "vlm": vlm,
        "prompt": root / "prompt.json",
        "photos": photos,
        "refs": refs,
    }


@pytest.fixture(scope="session")
def vlm_run(compose_world, tmp_path_factory):
    """`grape train` of the tiny VLM on the composed pairs, run once: its run folder."""
    from grape_cli.cli import app

    out = tmp_path_factory.mktemp("trained-vlm") / "runs" / "compose"
    w = compose_world
    r = CliRunner().invoke(
        app,
        [str(a) for a in (
            "train", w["pairs"], "--index", w["index"], "--base-model", w["vlm"],
            "--steps", 4, "--eval-every", 2, "--group-size", 4, "--queries-per-step", 4,
            "--max-new-tokens", 12, "--eval-split", 0.25, "--prompt-file", w["prompt"],
            "--learning-rate", 1e-3, "--out", out, "--json",
        )],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return {**w, "run": out, "result": json.loads(r.stdout)}
