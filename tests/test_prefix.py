"""GRPO's loss pass with each prompt run once: the same numbers as TRL's pass."""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from grape_cli.train.prefix import grpo_trainer_class, shared_prefix_logps, sharing_generate

COMPLETION = 6


def batch(tok, prompts: list[str], group: int, seed: int = 0):
    """TRL's layout: left-padded prompts, each `group` times, right-padded completions."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    rng = random.Random(seed)
    rows, masks = [], []
    for p in ids:
        for _ in range(group):
            n = rng.randint(1, COMPLETION)
            pad = [tok.pad_token_id] * (COMPLETION - n)
            rows.append(
                [tok.pad_token_id] * (width - len(p)) + p + [rng.randrange(3, 50)] * n + pad
            )
            masks.append([0] * (width - len(p)) + [1] * (len(p) + n) + [0] * (COMPLETION - n))
    return torch.tensor(rows), torch.tensor(masks)


@pytest.fixture
def model(tiny_lm):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    add_fused_lm_head(m, outputs=("log_probs", "entropy"))  # as GRPOTrainer patches it
    return m, PreTrainedTokenizerFast.from_pretrained(tiny_lm)


def trl_pass(model, ids, mask):
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    )
    return GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, model, ids, mask, COMPLETION, compute_entropy=True
    )[:2]


def logps_and_grads(model, fn, mask):
    model.zero_grad(set_to_none=True)
    logps, entropy = fn()
    (logps * mask[:, -COMPLETION:]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropy.detach(), grads


def test_same_logps_entropies_and_gradients_as_trl(model):
    m, tok = model
    prompts = ["a red circle on the left, please", "blue", "a small green star at the top"]
    ids, mask = batch(tok, prompts, group=4)
    lp1, e1, g1 = logps_and_grads(m, lambda: trl_pass(m, ids, mask), mask)
    lp2, e2, g2 = logps_and_grads(
        m, lambda: shared_prefix_logps(m, ids, mask, COMPLETION, True), mask
    )
    scored = mask[:, -COMPLETION:].bool()
    assert lp1.shape == lp2.shape
    torch.testing.assert_close(lp2[scored], lp1[scored], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(e2[scored], e1[scored], atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-3)
    # Rows whose prompts differ get different log-probabilities (nothing is mixed up).
    assert not torch.allclose(lp2[0], lp2[4])


def test_nothing_to_share_falls_back(model):
    m, tok = model
    ids, mask = batch(tok, ["one prompt", "another prompt"], group=1)
    assert shared_prefix_logps(m, ids, mask, COMPLETION, False) is None


def vision_batch(vlm_folder, images, queries, group: int, seed: int = 0):
    """A VLM and TRL's multimodal batch for it: each (image, query) prompt `group` times,
    then random completions; the inputs `_get_per_token_logps_and_entropies` receives."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grape_cli.prompt import PromptTemplate
    from grape_cli.query import Query
    from grape_cli.rewrite import encode_vision_prompts

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_pretrained(vlm_folder, dtype=torch.float32)
    add_fused_lm_head(m, outputs=("log_probs", "entropy"))
    processor = AutoProcessor.from_pretrained(vlm_folder)
    enc = encode_vision_prompts(
        processor,
        PromptTemplate.default(vision=True),
        [Query(q, image=i) for i, q in zip(images, queries, strict=True)],
    )
    rows = torch.arange(len(queries)).repeat_interleave(group)
    rng = random.Random(seed)
    tails, tail_masks = [], []
    for _ in rows:
        n = rng.randint(1, COMPLETION)
        tails.append([rng.randrange(3, 50)] * n + [0] * (COMPLETION - n))
        tail_masks.append([1] * n + [0] * (COMPLETION - n))
    ids = torch.cat([enc["input_ids"][rows], torch.tensor(tails)], dim=1)
    mask = torch.cat([enc["attention_mask"][rows], torch.tensor(tail_masks)], dim=1)
    per = enc["image_grid_thw"].prod(-1).tolist()
    pixels = torch.split(enc["pixel_values"], per)
    vision = {
        "pixel_values": torch.cat([pixels[r] for r in rows]),
        "image_grid_thw": enc["image_grid_thw"][rows],
        "num_images": [1] * len(rows),
        "mm_token_type_ids": torch.cat(
            [enc["mm_token_type_ids"][rows], torch.zeros(len(rows), COMPLETION, dtype=torch.long)],
            dim=1,
        ),
    }
    return m, ids, mask, vision


def test_vision_language_batch_same_as_trl(tiny_vlm, tmp_path):
    from PIL import Image

    files = []
    for i, colour in enumerate(["red", "blue", "green"]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48 + 8 * i, 48), colour).save(files[-1])
    queries = ["make it red", "same but on the left and larger", "make it red"]
    m, ids, mask, vision = vision_batch(tiny_vlm, files, queries, group=3)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    )
    lp1, e1, g1 = logps_and_grads(
        m,
        lambda: GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, m, ids, mask, COMPLETION, compute_entropy=True, **vision
        )[:2],
        mask,
    )
    calls = []
    forward = m.forward
    m.forward = lambda *a, **k: calls.append(k) or forward(*a, **k)
    lp2, e2, g2 = logps_and_grads(
        m, lambda: shared_prefix_logps(m, ids, mask, COMPLETION, True, vision), mask
    )
    # The three prompts (two share a query, not an image) ran once each, with their images.
    assert calls[0]["input_ids"].shape[0] == 3 and len(calls[0]["image_grid_thw"]) == 3
    assert "pixel_values" not in calls[1]
    scored = mask[:, -COMPLETION:].bool()
    torch.testing.assert_close(lp2[scored], lp1[scored], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(e2[scored], e1[scored], atol=2e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and any("visual" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-3)
    assert not torch.allclose(lp2[0], lp2[6])  # same query, other image: other numbers

    # One prompt's rows with different images: not shared (TRL's path).
    other = dict(vision, pixel_values=vision["pixel_values"].clone())
    other["pixel_values"][0] += 1
    m.forward = forward
    assert shared_prefix_logps(m, ids, mask, COMPLETION, True, other) is None


def test_trainer_takes_trls_path_for_images():
    cls = grpo_trainer_class()
    assert issubclass(cls, GRPOTrainer)
    seen = []

    def trl(self, model, *args, **kwargs):
        seen.append(kwargs.get("pixel_values"))
        return "trl"

    trainer = cls.__new__(cls)  # no model needed: a batch of another VLM family goes to TRL
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", trl)
        got = cls._get_per_token_logps_and_entropies(
            trainer,
            object(),
            torch.zeros(2, 5),
            None,
            4,
            pixel_values=torch.zeros(1),
            image_sizes=[1],
        )
    assert got == "trl" and len(seen) == 1


def test_generation_from_the_shared_cache_is_the_same(model):
    from transformers import GenerationConfig

    m, tok = model
    tok.padding_side = "left"
    prompts = ["a red circle on the left, please", "blue", "a small green star"]
    enc = tok([p for p in prompts for _ in range(3)], return_tensors="pt", padding=True)
    calls = []
    forward = m.forward
    m.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k)
    for sample in (False, True):
        config = GenerationConfig(max_new_tokens=8, do_sample=sample, pad_token_id=0)
        torch.manual_seed(1)
        plain = m.generate(**enc, generation_config=config)
        calls.clear()
        torch.manual_seed(1)
        shared = sharing_generate(m)(**enc, generation_config=config)
        assert torch.equal(shared, plain)
        # The prompts ran once each (3 rows), then generation went on from their cache.
        assert calls[0] == (3, enc["input_ids"].shape[1] - 1)
        assert all(c[0] == 9 and c[1] <= 1 for c in calls[1:])
