"""Train the shapes world's tiny CLIP retriever on CPU, and measure what it can tell apart.

The retriever sees only `caption_en` text, so Chinese and long-form queries are a real
shift for it. Its image tower is open_clip's ModifiedResNet ("resnet" preset): a 16-px
ViT patch on a 64-px image loses small shapes and never learned position (measured with
`attribute_sensitivity` below while building this example).
Half of each batch is groups of scenes that differ in exactly one attribute; with only
random negatives, contrastive training can lean on the easy attributes (colours) and
ignore the rest, and a GRPO reward built on such a retriever cannot teach the rest.

    python -m examples.shapes.retriever WORK_DIR [--minutes 4] [--quick]

builds a corpus, trains, and prints recall for en/zh/long queries and per-attribute
sensitivity as JSON.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from examples.shapes.world import (
    ATTRIBUTES,
    COLORS,
    EN_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    all_combos,
    caption_en,
    fill_template,
    load_scenes,
    render_scene,
    scene_rng,
)

VALUES = {
    "shape": SHAPES,
    "color": COLORS,
    "background": COLORS,
    "position": POSITIONS,
    "size": SIZES,
}
BATCH = 128
GROUP = 4  # scenes per hard-negative group
# How often each attribute is the one varied in a group. Colour, background, size and
# position are learned within a few hundred steps; shape is the slow one (measured).
HARD_WEIGHTS = [3, 1, 1, 1, 1]  # in ATTRIBUTES order: shape first
RENDERS = 4  # pre-rendered jitters per combo; fresh seeds, never the corpus's renders
LR = 2e-3
STEPS_PER_MINUTE = 250  # batch 128, "resnet" preset, 2 idle cores: 0.23 s a step


def _valid(combo: tuple) -> bool:
    return combo[1] != combo[2]


def _vary(combo: tuple, attr: str, value: str) -> tuple:
    i = ATTRIBUTES.index(attr)
    return (*combo[:i], value, *combo[i + 1 :])


def _render_pool(combos: list[tuple], renders: int, image_size: int, seed: int):
    """uint8 array [len(combos), renders, H, W, 3]; 3 of 4 go through JPEG like the corpus."""
    pool = np.empty((len(combos), renders, image_size, image_size, 3), dtype=np.uint8)
    for i, combo in enumerate(combos):
        sc = Scene("", *combo)
        for r in range(renders):
            rng = scene_rng(seed, f"train:{'/'.join(combo)}:{r}")
            img = render_scene(sc, rng, image_size)
            if rng.random() < 0.75:
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=92)
                buf.seek(0)
                img = Image.open(buf).convert("RGB")
            pool[i, r] = np.asarray(img)
    return pool


def _caption(combo: tuple, template: str) -> str:
    return fill_template(template, Scene("", *combo))


def _sample_batch(rng: random.Random, combos: list[tuple], index: dict, size: int) -> list[int]:
    """Half hard-negative groups (one attribute varied), half random; combos distinct."""
    picked: list[int] = []
    seen: set[int] = set()

    def add(i: int) -> None:
        if i not in seen:
            seen.add(i)
            picked.append(i)

    size = min(size, len(combos))
    for _ in range(4 * size):  # bounded: a tiny combo set may have no one-attribute pairs
        if len(picked) >= size // 2:
            break
        anchor = combos[rng.randrange(len(combos))]
        attr = rng.choices(ATTRIBUTES, HARD_WEIGHTS)[0]
        others = [
            j
            for v in VALUES[attr]
            if v != anchor[ATTRIBUTES.index(attr)]
            and (j := index.get(_vary(anchor, attr, v))) is not None
        ]
        if not others:
            continue
        add(index[anchor])
        for j in rng.sample(others, min(GROUP - 1, len(others))):
            add(j)
    while len(picked) < size:
        add(rng.randrange(len(combos)))
    return picked[:size]


def train_retriever(
    out_dir,
    scenes_train: list[Scene],
    seed: int = 0,
    minutes: float = 4.0,
    image_size: int = 64,
    quick: bool = False,
    log: Callable = print,
    exclude: list[Scene] | None = None,
    steps: int | None = None,
) -> Path:
    """Train contrastively and save an open_clip local folder at `out_dir`.

    Runs exactly `steps` optimizer steps (default: what `minutes` allows at 0.23 s a
    step), however long they take: 0.1.0 stopped at 1.5 x `minutes` of wall time, so a
    loaded or slower machine trained a different retriever from the same seed and the
    example's table did not repeat (100-1,000 steps seen).

    Trains on the combos of `scenes_train` plus random extra combos, but only when
    `exclude` (the held-out scenes) is given: without it, any extra combo might be a
    held-out scene, so only the training scenes' own combos are used.
    """
    import open_clip
    import torch
    import torch.nn.functional as F

    from grape_cli.models import save_clip_folder
    from grape_cli.tiny import CLIP_PREPROCESS, CLIP_PRESETS, build_clip_model

    t_start = time.time()
    rng = random.Random(seed)
    if exclude is None:
        combos = sorted({s.combo for s in scenes_train})
    else:
        banned = {s.combo for s in exclude}
        combos = [c for c in all_combos() if c not in banned]
    renders = RENDERS
    if quick:
        minutes, renders = min(minutes, 0.25), 1
        combos = rng.sample(combos, min(len(combos), 800))
    steps = steps or max(1, round(minutes * STEPS_PER_MINUTE))
    index = {c: i for i, c in enumerate(combos)}

    cfg = json.loads(json.dumps(CLIP_PRESETS["resnet"]))
    cfg["vision_cfg"]["image_size"] = image_size
    model, cfg = build_clip_model(cfg, seed)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])

    pool = torch.from_numpy(_render_pool(combos, renders, image_size, seed))
    # Every caption style of every combo, tokenized once: [combos, templates, ctx].
    texts = [_caption(c, t) for c in combos for t in EN_TEMPLATES]
    tokens = tokenizer(texts).view(len(combos), len(EN_TEMPLATES), -1)
    log(
        f"retriever: {len(combos)} combos x {renders} renders, "
        f"data ready in {time.time() - t_start:.1f}s"
    )

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    warmup = min(30, steps // 10 + 1)
    model.train()
    t0, losses = time.time(), []
    for step in range(1, steps + 1):
        frac = (step - 1) / steps
        lr = LR * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.tensor(_sample_batch(rng, combos, index, BATCH))
        which = torch.randint(0, renders, (len(idx),))
        images = pool[idx, which].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        text = tokens[idx, torch.randint(0, len(EN_TEMPLATES), (len(idx),))]
        img_f, txt_f, scale = model(images, text)
        logits = scale * img_f @ txt_f.T
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: a runaway temperature destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0:
            log(
                f"retriever: step {step} loss {np.mean(losses[-100:]):.3f} "
                f"lr {lr:.2e} {time.time() - t0:.0f}s"
            )
    model.eval()
    log(
        f"retriever: {step} steps in {time.time() - t0:.0f}s, "
        f"final loss {np.mean(losses[-50:]):.3f}"
    )
    return save_clip_folder(model, cfg, CLIP_PREPROCESS, out_dir)


# --------------------------------------------------------------------------- evaluation


def encode_corpus(clip, corpus_dir) -> tuple[list[Scene], object]:
    """(scenes, L2-normalised image features) for every image listed in scenes.jsonl."""
    import torch

    scenes = load_scenes(corpus_dir)
    feats = []
    for i in range(0, len(scenes), 256):
        batch = [
            clip.preprocess(Image.open(Path(corpus_dir) / s.file).convert("RGB"))
            for s in scenes[i : i + 256]
        ]
        feats.append(clip.encode_images(torch.stack(batch)))
    return scenes, torch.cat(feats)


def recall(image_feats, text_feats, targets: list[int], ks=(1, 5, 10)) -> dict:
    """Recall@k of each query's target among all images, ranked as grape ranks everywhere
    (`grape_cli.ranking`: ties count against the target)."""
    from grape_cli.ranking import score_targets

    rank = score_targets(text_feats, image_feats, [[t] for t in targets], top_k=0).ranks
    return {f"recall@{k}": round(float((rank <= k).float().mean()), 4) for k in ks}


def evaluate_retriever(
    model_folder,
    corpus_dir,
    scenes_eval: list[Scene],
    seed: int = 0,
    query_fn: Callable = caption_en,
    clip=None,
    corpus=None,
) -> dict:
    """Recall@1/5/10 of `query_fn` queries (default: the oracle captions) over the corpus.

    `clip` and `corpus` (from `encode_corpus`) may be passed to avoid reloading.
    """
    from grape_cli.models import load_clip

    clip = clip or load_clip(str(model_folder), device="cpu")
    scenes, image_feats = corpus or encode_corpus(clip, corpus_dir)
    pos = {s.file: i for i, s in enumerate(scenes)}
    queries = [query_fn(s, scene_rng(seed, f"eval:{s.file}")) for s in scenes_eval]
    return recall(image_feats, clip.encode_texts(queries), [pos[s.file] for s in scenes_eval])


def attribute_sensitivity(
    model_folder, corpus_dir, scenes_eval: list[Scene], clip=None, corpus=None
) -> dict:
    """Per attribute, can the retriever tell its values apart?

    accuracy: fraction of `scenes_eval` images whose true caption outscores every caption
    that differs only in that attribute (chance = 1 / number of values).
    text_cosine: mean cosine between text embeddings of captions that differ only in
    that attribute; near 1.0 means the text tower ignores the word.
    """
    from grape_cli.models import load_clip

    clip = clip or load_clip(str(model_folder), device="cpu")
    scenes, image_feats = corpus or encode_corpus(clip, corpus_dir)
    pos = {s.file: i for i, s in enumerate(scenes)}
    out = {}
    for attr in ATTRIBUTES:
        hits, cos = [], []
        for s in scenes_eval:
            variants = [s.combo] + [
                c
                for v in VALUES[attr]
                if v != getattr(s, attr) and _valid(c := _vary(s.combo, attr, v))
            ]
            t = clip.encode_texts([_caption(c, EN_TEMPLATES[0]) for c in variants])
            scores = t @ image_feats[pos[s.file]]
            hits.append(bool((scores[1:] < scores[0]).all()))
            cos.append(float((t[1:] @ t[0]).mean()))
        # len(variants) is the number of values (7 for background: never the object's colour)
        out[attr] = {
            "accuracy": round(float(np.mean(hits)), 3),
            "chance": round(1 / len(variants), 3),
            "text_cosine": round(float(np.mean(cos)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse

    import torch

    from examples.shapes.world import (
        make_scenes,
        query_long,
        query_zh,
        split_scenes,
        write_corpus,
    )
    from grape_cli.models import load_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: from --minutes")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    scenes = make_scenes(a.scenes, a.seed)
    train, held = split_scenes(scenes, seed=a.seed)
    corpus_dir = a.work / "corpus"
    t = time.time()
    write_corpus(corpus_dir, scenes, seed=a.seed)
    t_corpus = time.time() - t
    t = time.time()
    folder = train_retriever(
        a.work / "retriever",
        train,
        seed=a.seed,
        minutes=a.minutes,
        quick=a.quick,
        exclude=held,
        steps=a.steps,
    )
    t_train = time.time() - t
    clip = load_clip(str(folder), device="cpu")
    corpus = encode_corpus(clip, corpus_dir)
    report = {
        "corpus_s": round(t_corpus, 1),
        "train_s": round(t_train, 1),
        "images": len(scenes),
        "heldout": len(held),
    }
    for name, fn in {"en": caption_en, "zh": query_zh, "long": query_long}.items():
        report[name] = evaluate_retriever(folder, corpus_dir, held, a.seed, fn, clip, corpus)
    report["sensitivity"] = attribute_sensitivity(folder, corpus_dir, held, clip, corpus)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
