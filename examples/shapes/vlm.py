"""The shapes world's base vision-language rewriter: a tiny Qwen2-VL that plays an
off-the-shelf VLM for composed queries (a reference image plus an edit).

GRAPE's third shift starts from a VLM that already does the task (look at the reference,
apply the edit, write a caption) in its own words, not the retriever's. We cannot
download one, so `train_base_vlm` builds that starting point the way real VLMs are
built, a vision tower put in front of a language model: a Qwen2-VL from a config
(`grape_cli.tiny.build_tiny_vlm`: a few-patch ViT and a processor made locally around
the example's own tokenizer) whose language model is the example's base text rewriter,
weights and all. It is supervised on training targets' composed queries, prompted
exactly as grape prompts a VLM rewriter, with the example's one-line `PROMPT` (given to
grape as `--prompt-file`, as the text rewriter's). Its
targets are the text rewriter's house-style captions of the *edited* scene
(`rewriter.base_caption`): the same synonyms, layouts and dropped details, so its
imperfection is the same known one, and GRPO has the same job: find the retriever's
words.

Measured while building it (200 held-out targets, greedy; "wrong" = another value named):

| base VLM | edited attributes wrong | attributes on the image wrong |
|---|---|---|
| random language model, 1,500 steps | 75% | 63% (every caption "a tiny white plus sign") |
| on the text rewriter, 600 steps | 17% | 70% |
| + vision tower pretrained (heads over its 16 tokens), LM at 2e-4 | 19% | 59% |
| same, LM at 1e-3, 1,000 steps | 19% | 59% (shape 90%, position 80%) |
| + heads on every token | 16% | 64% |
| + image tokens scaled to the text embeddings' norm | 19% | 62% |
| + the LM frozen while it captions the image alone, 400 steps | 21% | 65% |
| one image token, fresh renders (below), 1,000 steps | 22% | 66% (colour 95%, background 16%) |
| same, the vision tower frozen while supervised, 600 steps | 15% | 77% |
| + word heads, vision tower at 2e-4 while supervised, 600 steps | 14% | 47% (colour 23%, size 4%, shape 88%) |
| same, 1,000 steps (held-out, 400 targets) | 25% | 36% (shape 86%, colour 28%, position 37%) |
| + the word heads' loss kept while supervised (`NAME_WEIGHT`; this file) | 21% | 33% (shape 57%, position 0%, background 85%) |
| same, the example's one-line prompt, whole run (400 targets) | 22% | 33% (shape 4%, colour 45%, position 38%, background 83%) |

Measured 2026-12-03 (not kept), on a world built at the example's settings (400 held-out
targets, seen phrasings; this file as it is: 19% | 21%, shape 6%, colour 11%, background
88%): the background's head anchored too, to its own word (the Chinese colour + 背景,
one token) gave 19% | 14% (shape 5%, colour 15%, background 51%); with shape's loss
weighted x2 or x3, background 84% and 76%. The better reading did not survive GRPO:
with the `rank` reward, 400 steps, held-out R@10 0.475 (unseen 0.393) against 0.532
(0.440) from the base VLM of the time on the same world.

Measured again 2026-12-04 and kept (`_word`): on the ff01b46 run's world, with 800 GRPO
steps, the base VLM's background read off the image went from 84% wrong to 5% (seen
phrasings; unseen 81% -> 7%; every attribute read off the image 18% -> 3%), and GRPO
held it: held-out compose R@10 `rank` 0.700 -> 0.860 (closure over the blend 0.56 ->
0.80), `similarity` 0.760 -> 0.887; compose-unseen 0.545 -> 0.685 and 0.605 -> 0.695.
Before, GRPO had learned to write one safe background colour ("against a violet
backdrop") for every image.

The vision tower alone, heads on each token, 1,200 steps, accuracy on renders of
held-out scenes: with 16 tokens (8-pixel patches merged 2x2) shape 17% and position
17%, chance (Qwen2-VL's vision tower has rotary positions only: a token cannot tell
where it lies); with one token (16-pixel patches merged 4x4) position 96-99%, and shape
39% when trained on the corpus' 1,600 training images (learned by heart), 60% on 8,000
fresh renders. So the language model had little to read, and when it had (one token)
it hardly attended to it (under 1% of layer 0's attention from the caption): the image
token was unlike any word it knew. With word heads the image token starts close to the
words a caption would use, and the language model reads colour, size and part of the
position; shape, which the tower itself reads worst, stays mostly wrong.

    python -m examples.shapes.vlm OUT_DIR [--steps N] [--quick] [--eval N]

trains on the default world's training targets and prints held-out reading statistics.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

from examples.shapes.rewriter import ARCH as TEXT_ARCH
from examples.shapes.rewriter import base_caption, warmup_cosine, word_usage
from examples.shapes.world import (
    ATTRIBUTES,
    PHRASINGS,
    ZH_COLORS,
    Composed,
    Scene,
    compose_for,
    neighbours,
    render_scene,
    scene_rng,
)
from grape_cli.prompt import PromptTemplate

# Text part as the text rewriter's (width mattered most there); mrope splits half the
# head dimension (256 / 8 / 2 = 16) over time, height and width.
ARCH = {
    "text": {
        **TEXT_ARCH,
        # The text rewriter's rotary base; for text tokens (equal time, height and width
        # positions) multimodal rotary embedding is then the text model's own.
        "rope_scaling": {"type": "default", "mrope_section": [8, 4, 4], "rope_theta": 10000.0},
        # The text rewriter's RMSNorm eps (Qwen2's 1e-6; Qwen2-VL's default is 1e-5), so on
        # text alone the VLM's language model is the rewriter it starts from.
        "rms_norm_eps": 1e-6,
    },
    # 16-pixel patches on a 64-pixel image, all 16 merged into one image token. Qwen2-VL's
    # vision tower has rotary positions only, so a token of a 2x2 merge cannot tell where
    # in the image it lies: with 8-pixel patches merged into 16 tokens, heads on each
    # token named shape 17% and position 17% right on held-out scenes (chance 12% and
    # 20%); with one token, whose merger sees every patch in order, position 99%.
    "vision": {"depth": 2, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 2},
    "patch_size": 16,
    "merge_size": 4,
    "max_pixels": 64 * 64,
}
STEPS, QUICK_STEPS = 1000, 20
# The vision tower is first pretrained alone to name each attribute of an image (five
# linear heads on its image token), as a real VLM's vision encoder comes pretrained.
# Without it, 600 steps of captioning left 70% of the attributes that must be read off
# the reference image wrong, while the edit text was read (83% right). Its images are
# fresh renders of any scene but the held-out targets: on the corpus' 1,600 training
# images alone it learned them by heart (held-out shape 39% right; 60% on fresh ones).
VISION_STEPS, VISION_BATCH, VISION_LR, VISION_SCENES = 1200, 64, 2e-3, 8000
# The heads of these attributes are the language model's own input embeddings of the
# retriever's words for their values, frozen: the image token is pushed towards a mix of
# the words a caption would use, which the language model already reads. With learned
# heads it hardly attended to the image token (under 1% of layer 0's attention) and
# after 600 steps named 77% of the image's attributes wrong; with these, 47% (colour
# 23%, size 4%, shape still 88%: the tower reads shape worst). The background's head
# too (`_word`): learned, it was read wrong 84% of the time; on its own word, 5%.
WORD_HEADS = ("shape", "color", "position", "size", "background")
BATCH = 16
# The vision tower and its merger, pretrained by `pretrain_vision`, go on learning slowly
# (at 2e-3 their output norm grew a thousandfold and only the background was read);
# the language model is trained and has to learn to read the image token.
LR, LM_LR, WARMUP = 2e-4, 1e-3, 30
# While supervised, the image token goes on naming the reference's shape, colour,
# position, size and background through the pretraining's word heads (frozen), at this
# weight next to the caption's loss. Without it the tower drifted from the word
# directions (shape's nearest word right for 18% of held-out images after 1,000 steps). Measured on 200
# held-out targets, attributes read off the image wrong: 37% -> 33% (shape 85% -> 57%,
# position 37% -> 0%, size 3% -> 0%), but the background 32% -> 85%: with any weight
# (0.1 or 0.5) and any set of anchored heads, the language model stopped reading it,
# until the background's head was anchored to a word as well (module docstring).
NAME_WEIGHT = 0.5
P_ZH = 0.5  # Chinese edits, the rest English
# As the text rewriter's `PROMPT`: grape's default vision system message is ~90 tokens.
PROMPT = PromptTemplate(
    system="Rewrite the image search query, with its reference image if there is one, "
    "as one short English caption of the wanted image."
)


def _images(corpus_dir: Path | None, scenes: list[Scene], seed: int) -> dict[str, object]:
    """Each scene's image: read from the corpus folder when given, else rendered."""
    from PIL import Image

    out = {}
    for sc in scenes:
        if corpus_dir is not None:
            out[sc.file] = Image.open(corpus_dir / sc.file).convert("RGB")
        else:
            out[sc.file] = render_scene(sc, scene_rng(seed, sc.file))
    return out


def _batch(processor, prompt: PromptTemplate, items: list[tuple[Composed, str]], images):
    """The processor's right-padded batch with labels on the answers only."""

    tok = processor.tokenizer
    prompts = [
        processor.apply_chat_template(
            prompt.vision_messages(c.query, True), add_generation_prompt=True, tokenize=False
        )
        for c, _ in items
    ]
    texts = [p + answer + tok.eos_token for p, (_, answer) in zip(prompts, items, strict=True)]
    refs = [images[c.reference.file] for c, _ in items]
    tok.padding_side = "right"
    enc = processor(text=texts, images=refs, padding=True, return_tensors="pt")
    tok.padding_side = "left"
    per_image = enc["image_grid_thw"].prod(dim=1) // processor.image_processor.merge_size**2
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, p in enumerate(prompts):  # the image placeholder is one token before expansion
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"]) + int(per_image[i]) - 1
        labels[i, :n_prompt] = -100
    return {**enc, "labels": labels}


def build_on_text_model(out: Path, text_model: Path, seed: int = 0) -> None:
    """A Qwen2-VL in `out` whose language model is `text_model` (a Qwen2 causal LM):
    its tokenizer with the vision tokens added, its weights, and a new vision tower."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from grape_cli.models import load_vlm
    from grape_cli.tiny import build_tiny_vlm

    tokenizer = PreTrainedTokenizerFast.from_pretrained(text_model)
    build_tiny_vlm(out, [], preset=ARCH, seed=seed, tokenizer=tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32)
    vlm, _ = load_vlm(str(out), device="cpu", dtype=torch.float32)
    state = lm.model.state_dict()
    new = vlm.model.language_model.state_dict()
    rows = state["embed_tokens.weight"].shape[0]  # the vision tokens' rows stay new
    new["embed_tokens.weight"][:rows] = state.pop("embed_tokens.weight")
    new.update(state)
    vlm.model.language_model.load_state_dict(new)
    vlm.save_pretrained(out)


def _pixels(processor, images: dict) -> dict[str, tuple]:
    """Each image's patches and grid, as the processor makes them (computed once)."""
    out = {}
    for name, img in images.items():
        enc = processor.image_processor(images=[img], return_tensors="pt")
        out[name] = (enc["pixel_values"], enc["image_grid_thw"])
    return out


def _word(attr: str, value: str) -> str:
    """The word a head over the image token is anchored to: the value's English word, but
    for the background its Chinese colour + 背景, one token of the example's tokenizer and
    apart from the object's colour words (both heads on " red" would tie them together)."""
    return ZH_COLORS[value] + "背景" if attr == "background" else " " + value


def pretrain_vision(model, processor, held_out: list[Scene], steps: int, rng, n_scenes: int,
                    log=print) -> tuple[dict[str, float], object]:  # fmt: skip
    """Train the vision tower and its merger to name the attributes of images: one linear
    head per attribute on each image token. The images are `n_scenes` fresh renders of
    scenes whose attributes are no held-out target's (`held_out`). Returns the accuracy
    per attribute on renders of the `held_out` scenes (at most 400), and `name_loss`:
    the heads' loss on a batch of (pixels, grid, scenes), which supervision keeps adding.

    Every token names every attribute, not the image's tokens together: with heads over
    16 tokens in their order, the tower named 95% of the attributes, but each object's
    features sat in the token it fell in and the language model read almost none of them
    (1,000 steps: shape 90%, position 80% wrong, chance 88% and 80%). Hence one token."""
    import torch

    from examples.shapes.world import COLORS, POSITIONS, SHAPES, SIZES, all_combos

    values = {"shape": SHAPES, "color": COLORS, "background": COLORS,
              "position": POSITIONS, "size": SIZES}  # fmt: skip
    held = {s.combo for s in held_out}
    pool = [c for c in all_combos() if c not in held]
    scenes = [Scene(f"pretrain_{i:05d}", *rng.choice(pool)) for i in range(n_scenes)]
    images = {s.file: render_scene(s, random.Random(f"{rng.random()}")) for s in scenes}
    pixels = _pixels(processor, images)
    visual = model.model.visual
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, len(v)) for a, v in values.items()})
    embed = model.model.language_model.embed_tokens.weight.detach()
    tok = processor.tokenizer
    for a in WORD_HEADS:  # each value's word is one token of the example's tokenizer
        pieces = [tok.tokenize(_word(a, w)) for w in values[a]]
        assert all(len(p) == 1 for p in pieces), f"{a} words split by the tokenizer: {pieces}"
        ids = tok.convert_tokens_to_ids([p[0] for p in pieces])
        heads[a].weight.data.copy_(embed[ids] * 4.0)  # x4: sharper softmax at this norm
        heads[a].requires_grad_(False)
        heads[a].bias.data.zero_()
    params = [*visual.parameters(), *(p for p in heads.parameters() if p.requires_grad)]
    opt = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, WARMUP))

    def forward(batch: list[Scene]) -> tuple[dict, int]:  # attribute -> (logits, labels)
        pv = torch.cat([pixels[s.file][0] for s in batch])
        grid = torch.cat([pixels[s.file][1] for s in batch])
        feats = visual(pv, grid_thw=grid).pooler_output  # (images x tokens, width)
        per_image = len(feats) // len(batch)
        return {
            a: (heads[a](feats), torch.tensor([v.index(getattr(s, a)) for s in batch]))
            for a, v in values.items()
        }, per_image

    for step in range(steps):
        batch = [rng.choice(scenes) for _ in range(VISION_BATCH)]
        out, per_image = forward(batch)
        loss = sum(
            torch.nn.functional.cross_entropy(logits, labels.repeat_interleave(per_image))
            for logits, labels in out.values()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  vision step {step + 1}/{steps}  loss {loss.item():.3f}")
    test = held_out[:400]
    pixels.update(
        _pixels(processor, {s.file: render_scene(s, random.Random(s.file)) for s in test})
    )
    with torch.no_grad():
        out, per_image = forward(test)
        acc = {
            a: round(
                float((logits.argmax(-1) == labels.repeat_interleave(per_image)).float().mean()), 3
            )
            for a, (logits, labels) in out.items()
        }
    log(f"  vision tower on held-out scenes: {acc}")
    # The heads drive the image tokens' norm far past the text embeddings' (measured 150
    # against 2.7), and the language model then reads them poorly; the merger's last
    # layer is scaled down to the text embeddings' norm, which keeps what a linear head
    # reads from them.
    with torch.no_grad():
        pv = torch.cat([pixels[s.file][0] for s in batch])  # the last training batch
        grid = torch.cat([pixels[s.file][1] for s in batch])
        norm = visual(pv, grid_thw=grid).pooler_output.norm(dim=-1).mean()
        text = model.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
        last = visual.merger.mlp[-1]
        last.weight.mul_(text / norm)
        last.bias.mul_(text / norm)
    heads.requires_grad_(False)

    def name_loss(pv, grid, batch: list[Scene]):
        feats = visual(pv, grid_thw=grid).pooler_output * (norm / text)
        per_image = len(feats) // len(batch)
        return sum(
            torch.nn.functional.cross_entropy(
                heads[a](feats),
                torch.tensor([values[a].index(getattr(s, a)) for s in batch]).repeat_interleave(
                    per_image
                ),
            )
            for a in WORD_HEADS
        )

    return acc, name_loss


def train_base_vlm(
    out_dir,
    scenes: list[Scene],
    train_targets: list[Scene],
    text_model: Path,
    corpus_dir: Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    log=print,
) -> Path:
    """Build the base VLM on `text_model` (the example's base rewriter), supervise it and
    save it in `out_dir`; returns the folder.

    Targets are `train_targets` only; references are any of `scenes` (the corpus).
    """
    import torch

    from grape_cli.models import load_vlm

    t0 = time.time()
    out = Path(out_dir)
    rng = random.Random(seed)
    steps = steps if steps is not None else (QUICK_STEPS if quick else STEPS)
    near = neighbours(scenes)

    def example(target: Scene) -> tuple[Composed, str] | None:
        lang = "zh" if rng.random() < P_ZH else "en"
        c = compose_for(target, near[target.combo], rng, lang)
        return None if c is None else (c, base_caption(target, rng))

    build_on_text_model(out, Path(text_model), seed)
    model, processor = load_vlm(str(out), device="cpu")
    images = _images(corpus_dir, scenes, seed)
    model.train()
    torch.manual_seed(seed)
    vision_steps = 10 if quick else VISION_STEPS
    seen = {t.combo for t in train_targets}
    held_out = [s for s in scenes if s.combo not in seen]
    n_scenes = 200 if quick else VISION_SCENES
    vision_acc, name_loss = pretrain_vision(
        model, processor, held_out, vision_steps, rng, n_scenes, log
    )
    pixels = _pixels(processor, images)
    log(
        f"base VLM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
        f"({sum(p.numel() for p in model.model.visual.parameters()) / 1e6:.2f}M vision), "
        f"vocab {len(processor.tokenizer)}, {steps} steps"
    )
    torch.manual_seed(seed)
    lm = set(map(id, model.model.language_model.parameters())) | {id(model.lm_head.weight)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in lm], "lr": LR},
        {"params": [p for p in model.parameters() if id(p) in lm], "lr": LM_LR},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, WARMUP))
    ema = None
    for step in range(steps):
        items = []
        while len(items) < BATCH:
            if (e := example(rng.choice(train_targets))) is not None:
                items.append(e)
        loss = model(**_batch(processor, PROMPT, items, images)).loss
        refs = [c.reference for c, _ in items]
        pv = torch.cat([pixels[r.file][0] for r in refs])
        grid = torch.cat([pixels[r.file][1] for r in refs])
        (loss + NAME_WEIGHT * name_loss(pv, grid, refs)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}  loss {ema:.3f}  {time.time() - t0:.0f}s")
    model.eval()
    model.save_pretrained(out)
    meta = {"seed": seed, "steps": steps, "batch": BATCH, "lr": LR, "lm_lr": LM_LR, "arch": ARCH,
            "vision_steps": vision_steps, "vision_accuracy": vision_acc,
            "final_loss": ema, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    (out / "base_vlm.json").write_text(json.dumps(meta, indent=2))
    log(f"base VLM saved to {out} in {meta['seconds']}s")
    return out


def reading_report(model_dir, scenes: list[Scene], targets: list[Scene], seed: int = 0,
                   corpus_dir: Path | None = None) -> dict:  # fmt: skip
    """How the VLM reads held-out composed queries (greedy): per attribute of the target,
    how often its caption has the retriever's word, a synonym, a wrong value or none;
    split into the attributes the edit names and those it must read off the image."""
    import tempfile

    from grape_cli.query import Query
    from grape_cli.rewrite import load_rewriter

    near = neighbours(scenes)
    images = {} if corpus_dir else _images(None, scenes, seed)
    rewriter = load_rewriter(str(model_dir), device="cpu", prompt=PROMPT)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phrasing in PHRASINGS:
            rng = random.Random(f"{seed}:compose:{phrasing}")
            composed = [compose_for(t, near[t.combo], rng, ("zh", "en")[i % 2], phrasing)
                        for i, t in enumerate(targets)]  # fmt: skip
            composed = [c for c in composed if c]
            queries = []
            for c in composed:  # the corpus file as it is, else a lossless render
                name = c.reference.file
                path = Path(corpus_dir or tmp) / (name if corpus_dir else f"{name}.png")
                if not path.exists():
                    images[name].save(path)
                queries.append(Query(c.query, str(path)))
            texts = [r[0] for r in rewriter.rewrite(queries)]
            edited, kept, by_attr = Counter(), Counter(), Counter()
            n_edited = n_kept = 0
            for c, text in zip(composed, texts, strict=True):
                usage = word_usage(text, c.target)
                for a in ATTRIBUTES:
                    changed = getattr(c.reference, a) != getattr(c.target, a)
                    (edited if changed else kept)[usage[a]] += 1
                    if not changed:
                        by_attr[a, usage[a] == "wrong"] += 1
                    n_edited += changed
                    n_kept += not changed
            report[phrasing] = {
                "edited": {u: round(edited[u] / max(1, n_edited), 3) for u in sorted(edited)},
                "read_off_image": {u: round(kept[u] / max(1, n_kept), 3) for u in sorted(kept)},
                "read_off_image_wrong": {
                    a: round(by_attr[a, True] / max(1, by_attr[a, True] + by_attr[a, False]), 3)
                    for a in ATTRIBUTES
                },
                "examples": [[c.query, t] for c, t in zip(composed[:4], texts, strict=False)],
            }
    return report


def compose_misses(rows: list[dict], scenes: list[Scene], rewriters: list[str]) -> dict:
    """Why composed queries miss the first page: for each of `rewriters` (keys of the
    records of a `grape eval --per-query` file), of the queries whose target ranks past
    10, the share whose rewrite names a wrong value for each attribute, split into the
    attributes read off the reference image and those the edit names. A miss can count
    under several."""
    by_stem = {Path(s.file).stem: s for s in scenes}
    out = {}
    for name in rewriters:
        wrong, n = Counter(), 0
        for r in rows:
            if r["rank"][name] <= 10 or not r["rewrites"][name]:
                continue
            n += 1
            target, ref = (by_stem[Path(f).stem] for f in (r["targets"][0], r["image"]))
            usage = word_usage(r["rewrites"][name][0], target)
            edits = {a for a in ATTRIBUTES if getattr(ref, a) != getattr(target, a)}
            for a in ATTRIBUTES:
                wrong[a, "edited" if a in edits else "read_off_image"] += usage[a] == "wrong"
            wrong["any", "edited"] += any(usage[a] == "wrong" for a in edits)
        out[name] = {
            "misses": n,
            "queries": len(rows),
            **{f"{a} {part}": round(k / max(1, n), 3) for (a, part), k in sorted(wrong.items())},
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from examples.shapes.world import make_scenes, split_scenes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--text-model", help="the example's base text rewriter (rewriter-base/)")
    ap.add_argument("--corpus", type=Path, help="the corpus folder (else renders scenes)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval", type=int, default=200, help="held-out targets to analyse")
    ap.add_argument("--no-train", action="store_true", help="analyse OUT_DIR as it is")
    args = ap.parse_args(argv)
    scenes = make_scenes()
    train, heldout = split_scenes(scenes)
    folder = args.out_dir
    if not args.no_train:
        folder = train_base_vlm(
            args.out_dir, scenes, train, args.text_model, args.corpus, steps=args.steps,
            quick=args.quick,
        )  # fmt: skip
    t = time.time()
    report = reading_report(folder, scenes, heldout[: args.eval], corpus_dir=args.corpus)
    report["eval_seconds"] = round(time.time() - t, 1)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
