"""Shared fixtures: tiny models built locally, small photo folders, a CLI runner.

Nothing here downloads anything: HF_HUB_OFFLINE is forced so a Hub miss fails at once.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from grape_cli.tiny import build_tiny_clip, build_tiny_lm

# One intra-op thread: the tensors here are tiny, and on a 2-core machine that also runs
# subprocesses, torch's default of one thread per core spends its time waiting (measured
# 41 s vs 137 s for the whole suite under load).
torch.set_num_threads(1)

LM_TEXTS = [
    "a small red circle on the left, blue background",
    "a large green square at the top on a white background",
    "红色的圆形在左边 蓝色背景",
    "photo of a dog on the beach at sunset",
    "a cat sleeping on a sofa",
] * 20


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
    """Fine-tune the tiny LM until it answers each query with its caption; save to `out`."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from grape_cli.prompt import render_prompt

    tok = PreTrainedTokenizerFast.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    seqs = []
    for query, answer in examples.items():
        p = tok(render_prompt(tok, prompt, query), add_special_tokens=False)["input_ids"]
        a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append((p + a, [-100] * len(p) + a))
    n = max(len(s) for s, _ in seqs)
    ids = torch.tensor([[tok.pad_token_id] * (n - len(s)) + s for s, _ in seqs])
    labels = torch.tensor([[-100] * (n - len(lab)) + lab for _, lab in seqs])
    mask = (ids != tok.pad_token_id).long()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teach_lm():
    """`teach_lm(base, out, {query: caption}, prompt, steps)`: a tiny LM fine-tuned to answer."""
    return _teach_lm
