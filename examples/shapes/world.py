"""The "shapes" world: a seeded benchmark where the query shift is real.

Each image is one object (shape, colour, size, position) on a plain background. A tiny
CLIP is trained on `caption_en` only, so it reads short English in those few styles;
`query_zh` (Chinese) and `query_long` (rambling English longer than the text encoder's
32-token window) describe the same scenes in ways it never saw, each in two disjoint
sets of phrasings (`PHRASINGS`): seen ones for training, unseen ones held out. A rewriter has to map
them back to the retriever's words, which is what GRAPE's GRPO stage learns.

Everything is a pure function of its seed: the corpus, the pairs and every render.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
SIZES = ["small", "large"]
ATTRIBUTES = ["shape", "color", "background", "position", "size"]

ZH_SHAPES = dict(
    zip(SHAPES, ["圆形", "正方形", "三角形", "星星", "十字", "圆环", "菱形", "爱心"], strict=True)
)
ZH_COLORS = dict(
    zip(COLORS, ["红色", "绿色", "蓝色", "黄色", "紫色", "橙色", "白色", "黑色"], strict=True)
)
ZH_POSITIONS = dict(zip(POSITIONS, ["左边", "右边", "上面", "下面", "中间"], strict=True))
ZH_SIZES = dict(zip(SIZES, ["小", "大"], strict=True))

RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
# Object centre as a fraction of the image; 0.28 keeps a large shape (<= 34 px) in frame.
CENTERS = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
SIZE_PX = {"small": (14, 18), "large": (28, 34)}  # bounding box side at 64 px
SUPERSAMPLE = 4  # draw large, then downsample: antialiased edges like a real photo


@dataclass(frozen=True)
class Scene:
    file: str
    shape: str
    color: str
    background: str
    position: str
    size: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(**{k: d[k] for k in ("file", *ATTRIBUTES)})

    @property
    def combo(self) -> tuple[str, str, str, str, str]:
        """The attributes alone: what a query can tell apart (the file name is not)."""
        return (self.shape, self.color, self.background, self.position, self.size)


def all_combos() -> list[tuple[str, str, str, str, str]]:
    """Every valid (shape, color, background, position, size): 4,480 of them."""
    return [c for c in itertools.product(SHAPES, COLORS, COLORS, POSITIONS, SIZES) if c[1] != c[2]]


def make_scenes(n: int = 2000, seed: int = 0) -> list[Scene]:
    combos = all_combos()
    if not 0 < n <= len(combos):
        raise ValueError(f"n must be in 1..{len(combos)}, got {n}")
    picked = random.Random(seed).sample(combos, n)
    # Every 4th file a PNG: the corpus should exercise both decoders.
    return [
        Scene(f"img_{i:05d}.{'png' if i % 4 == 3 else 'jpg'}", *c) for i, c in enumerate(picked)
    ]


# --------------------------------------------------------------------------- rendering


def _jitter_rgb(rgb: tuple[int, int, int], rng: random.Random, amount: int = 14):
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _star(cx: float, cy: float, r: float, inner: float = 0.42) -> list[tuple[float, float]]:
    return [
        (cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
        for k in range(10)
        for rr in [r if k % 2 == 0 else r * inner]
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    s: float,
    fill: tuple[int, int, int],
) -> None:
    h = s / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        q = h * 0.88  # a square's corners reach further than a circle: even out area
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy + h * 0.08, h * 1.08), fill=fill)
    elif shape == "cross":
        t = s * 0.17
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], outline=fill, width=round(s * 0.2))
    elif shape == "diamond":  # narrower than a turned square, so it reads as a rhombus
        draw.polygon(
            [(cx, cy - h), (cx + h * 0.68, cy), (cx, cy + h), (cx - h * 0.68, cy)], fill=fill
        )
    elif shape == "heart":
        r = s * 0.26
        for dx in (-1, 1):
            x = cx + dx * s * 0.22
            draw.ellipse([x - r, cy - h * 0.3 - r, x + r, cy - h * 0.3 + r], fill=fill)
        draw.polygon(
            [(cx - s * 0.47, cy - h * 0.18), (cx + s * 0.47, cy - h * 0.18), (cx, cy + h * 0.95)],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    """The scene with jittered size, position and colours, plus a little pixel noise."""
    lo, hi = SIZE_PX[scene.size]
    s = rng.uniform(lo, hi) * image_size / 64
    fx, fy = CENTERS[scene.position]
    j = image_size * 0.05  # +-3 px at 64: positions stay well apart
    half, margin = s / 2, image_size * 0.02
    cx = min(max(fx * image_size + rng.uniform(-j, j), half + margin), image_size - half - margin)
    cy = min(max(fy * image_size + rng.uniform(-j, j), half + margin), image_size - half - margin)

    k = SUPERSAMPLE
    img = Image.new(
        "RGB", (image_size * k, image_size * k), _jitter_rgb(RGB[scene.background], rng)
    )
    _draw_shape(
        ImageDraw.Draw(img), scene.shape, cx * k, cy * k, s * k, _jitter_rgb(RGB[scene.color], rng)
    )
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, 4, (image_size, image_size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def scene_rng(seed: int, key: str) -> random.Random:
    """A generator per (seed, image): renders do not depend on order or on other images."""
    return random.Random(f"{seed}:{key}")


def write_corpus(
    out_dir: str | Path, scenes: list[Scene], image_size: int = 64, seed: int = 0
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sc in scenes:
        img = render_scene(sc, scene_rng(seed, sc.file), image_size)
        if sc.file.endswith(".png"):
            img.save(out / sc.file)
        else:
            img.save(out / sc.file, quality=92)
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as f:
        for sc in scenes:
            f.write(json.dumps(sc.to_dict()) + "\n")
    return out


def load_scenes(corpus_dir: str | Path) -> list[Scene]:
    with open(Path(corpus_dir) / "scenes.jsonl", encoding="utf-8") as f:
        return [Scene.from_dict(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------------------- language

EN_POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# The retriever's own styles: the only text it is trained on.
EN_TEMPLATES = [
    "a {size} {color} {shape} {pos}, {background} background",
    "{size} {color} {shape} {pos} on a {background} background",
    "a {background} background with a {size} {color} {shape} {pos}",
    "{pos}, a {size} {color} {shape}, {background} background",
]


def caption_en(scene: Scene, rng: random.Random) -> str:
    return fill_template(rng.choice(EN_TEMPLATES), scene)


def fill_template(template: str, scene: Scene) -> str:
    return template.format(
        size=scene.size,
        color=scene.color,
        shape=scene.shape,
        pos=EN_POSITIONS[scene.position],
        background=scene.background,
    )


# Users write in their own words, so the Chinese and long-form generators come in two
# disjoint sets of phrasings. "seen" phrasings are the only ones the base rewriter's
# supervised data, its tokenizer and GRPO's training pairs use; "unseen" ones (other
# sentence structures, clause templates and fillers over the same vocabulary) appear
# only in the heldout-*-unseen pairs, to measure what a tuned rewriter does with
# phrasings it never met. The vocabulary is shared: a real LLM knows the words, what it
# has not seen is how this user strings them together.
#
# Far more varied seen long-form phrasings were measured and not kept (commit 5c4a5b4,
# reverted: 32 fillers, 10 clause templates per attribute, 6 structures, colour and
# shape in one clause, hedges; the unseen split byte for byte the same). The whole
# example, seed 0, R@1 / R@10 against this world's run: long-unseen rank-top .163 / .448
# (was .113 / .285), similarity .177 / .468 (.087 / .247); long similarity .287 / .660
# (.217 / .565); but zh rank-top .542 / .843 (.830 / .925), zh-unseen rank-top .400 /
# .672 (.752 / .897), and composed queries, whose VLM is built on this base rewriter,
# GRPO similarity R@10 .302 (.485), rank .242 (.305), below the blend baseline. The base
# rewriter read long inputs no better (colour wrong 48%, background 51% on seen; 56% and
# 65% on unseen), its BPE grew to 1,270 tokens and GRPO steps to 5.2 s (4.3): 100 minutes
# in all. One run each.
# Measured again once the base rewriter was supervised at 1e-3 and read long inputs
# (rewriter.py; 2026-12-04, 5c4a5b4's phrasings, the same retriever and index, one
# rank-top and one similarity GRPO run of the example's settings, evaluated on this
# world's held-out pairs): base rewriter on 200 held-out scenes, long colour mix-ups 8%
# (this file's phrasings: 2%), unseen long 27% (37%), unseen position wrong 13% (46%). Rank-top
# R@1 / R@10: zh .950 / 1.000 (this file's: .948 / 1.000), long .743 / .845
# (.895 / .983), zh-unseen .865 / .958 (.943 / .998), long-unseen .372 / .627 (.323 /
# .512); similarity about the same. Long-form queries in unseen phrasings gain .115 of
# R@10, at .14 of long R@10, .04 of zh-unseen and R@1 on long 20 points under the
# oracle; one GRPO run each, whose seeds differ by up to .10. Not kept.
# Kept the third time (873db2b), once the base rewriter was trained on scrambled inputs
# (rewriter.py `SCRAMBLE`): 10-13 seen clause templates per attribute (5 before), 5 per
# position (2), 18 fillers (12), 5 structures (3); plain clauses, no hedges. The base
# rewriter alone (two floating-point draws, 400 held-out scenes): unseen long position
# wrong 0-1.5% (17%), colour mix-ups 14-26% (25-31%), the binding probe's unseen
# templates 81-85% right (the run before's base: 87.5%; colour binding did not
# improve); seen long mix-ups 3-6% (0.3-1.3%). The whole example:
# examples/shapes/README.md, "Results with more varied seen long phrasings".
PHRASINGS = ("seen", "unseen")

ZH_TEMPLATES = {
    "seen": [
        "{bg}的{pos}有一个{size}的{color}{shape}",
        "一个{size}{color}{shape}在{pos}，{bg}",
        "{bg}，{pos}是一个{color}的{size}{shape}",
        "找一张{bg}的图片，{pos}有{size}{color}{shape}",
        "图片{pos}有一个{size}{color}{shape}，{bg}",
        "{color}{shape}，{size}的，在{pos}，{bg}",
        "我要找{pos}有{size}{color}{shape}的图，{bg}",
        "{size}{color}{shape}，位置：{pos}，{bg}",
        "背景是{bgc}，{pos}有一个{size}的{color}{shape}",
        "请帮我找：{color}的{shape}，{size}，在{pos}，背景{bgc}",
    ],
    "unseen": [
        "有没有一张{bg}的照片？{shape}是{color}的，{size}的，在{pos}",
        "{pos}那个{color}{shape}，挺{size}的，后面是{bg}",
        "记得是{bg}，有个{color}的东西，形状是{shape}，{size}的，位置在{pos}",
        "一张图：{shape}（{color}，{size}），在{pos}；背景颜色是{bgc}",
        "想找{color}{shape}的图片。它在{pos}，{size}。{bg}。",
        "在{pos}，一个{size}的{shape}，颜色是{color}，背景为{bgc}",
    ],
}


def query_zh(
    scene: Scene, rng: random.Random, phrasing: str = "seen", scramble: bool = False
) -> str:
    """One Chinese query. `scramble=True` shuffles the words of each part between
    punctuation marks (a value word, or a run of the characters between them, is one
    word): a training augmentation, so which colour is the background's is told by its
    word (红色背景) or a 背景 beside it, not by where a template puts it."""
    query = rng.choice(ZH_TEMPLATES[phrasing]).format(
        size=ZH_SIZES[scene.size],
        color=ZH_COLORS[scene.color],
        shape=ZH_SHAPES[scene.shape],
        pos=ZH_POSITIONS[scene.position],
        bg=ZH_COLORS[scene.background] + "背景",
        bgc=ZH_COLORS[scene.background],
    )
    if not scramble:
        return query
    parts = []
    for part in _ZH_PUNCT.split(query):
        words = [w for w in ZH_WORDS.split(part) if w] if part not in _ZH_MARKS else [part]
        parts.append("".join(rng.sample(words, len(words))))
    return "".join(parts)


_ZH_MARKS = "，。；：？（）"
_ZH_PUNCT = re.compile(f"([{_ZH_MARKS}])")
# Chinese cut into words: each value word is one, and a colour + 背景 is one word too, so
# the background's colour never looks like the object's (`query_zh`'s scrambling; the
# example's tokenizer corpus, rewriter.py). Longest first: 红色背景 before 红色.
ZH_WORDS = re.compile(
    "("
    + "|".join(
        map(
            re.escape,
            sorted(
                {
                    *(c + "背景" for c in ZH_COLORS.values()),
                    *ZH_COLORS.values(),
                    *ZH_SHAPES.values(),
                    *ZH_SIZES.values(),
                    *ZH_POSITIONS.values(),
                },
                key=len,
                reverse=True,
            ),
        )
    )
    + ")"
)


FILLER = {
    "seen": [
        "I took this picture a while ago and I have been trying to find it again for days.",
        "My photo folder is a complete mess, there are thousands of files in there.",
        "It was for a presentation at work, or maybe it was for my niece, I forget.",
        "Honestly I should have given the files better names when I saved them.",
        "A friend asked me to send it to her and now I cannot find it anywhere.",
        "I remember it looked quite simple, nothing fancy at all.",
        "There were a lot of similar ones so please look carefully.",
        "I hope this makes sense, I am not very good at describing pictures.",
        "We used it on a poster for the school fair last spring.",
        "I think I downloaded it from an old email but the email is gone now.",
        "Sorry for the long message, I have been looking for ages.",
        "It might have been in the folder from my old laptop.",
        "I have looked in every album on my phone and it is not there.",
        "My sister says she has a copy but she never answers her messages.",
        "It is a really basic picture but it matters to me.",
        "I used it as a wallpaper for a while, then I changed phones.",
        "The file might have been renamed when I backed everything up.",
        "I would be so grateful if you could find it for me.",
    ],
    "unseen": [
        "This is going to sound silly but I really need that one image back.",
        "My manager wants it in the slides by tomorrow morning.",
        "I scrolled through my whole gallery twice already without luck.",
        "It is one of those simple graphics you make in a minute.",
        "My cousin made a whole set of these for a card game.",
        "Searching by file name gets me nowhere, they are all numbers.",
        "Any help is appreciated, thanks in advance.",
    ],
}
# One clause per attribute; {x} is the value. Colour clauses name the object, background
# clauses always carry a cue (background, backdrop, behind, around it), as a person
# would; tests/test_example_world.py checks both.
LONG_CLAUSES = {
    "seen": {
        "shape": [
            "the thing in it was a {x}, I am fairly sure",
            "there was this {x}, or at least it looked like a {x} to me",
            "I keep thinking of the {x} in it",
            "it showed a single {x}",
            "{x} is what it was, I think",
            "it was a {x}",
            "the shape was a {x}",
            "it looked like a {x} to me",
            "there was a {x} in it",
            "the picture had a {x} in it",
            "I remember a {x}",
        ],
        "color": [
            "it was {x}, kind of a {x} colour I believe",
            "the colour of it was {x} if I remember right",
            "it was {x}",
            "the shape itself was coloured {x}",
            "{x}, that was its colour",
            "the shape was {x}",
            "it was painted {x}",
            "the thing itself was {x}",
            "it was a {x} colour",
            "I remember it being {x}",
            "{x} is what it was painted",
            "its colour was {x}",
        ],
        "size": [
            "it was pretty {x} compared to the picture",
            "not huge or tiny, well, {x} really",
            "I would call it {x}",
            "size-wise it was {x}",
            "{x} compared to the rest of the picture",
            "it was quite {x}",
            "the size was {x}",
            "it was {x} in size",
            "kind of {x}",
            "it looked {x}",
        ],
        "background": [
            "behind it everything was {x}",
            "the whole background was {x}",
            "with a plain {x} background",
            "the backdrop was {x}",
            "{x} in the background",
            "the background was {x}",
            "on a {x} background",
            "set against a {x} background",
            "everything behind it was {x}",
            "the colour behind it was {x}",
            "a {x} backdrop",
            "{x} behind it",
            "the area around it was {x}",
        ],
    },
    "unseen": {
        "shape": [
            "the main object was shaped like a {x}",
            "a {x}, that is what was drawn",
            "picture a {x}",
        ],
        "color": [
            "its colour? {x}, definitely",
            "the object had a {x} tint",
            "{x} was the colour of the shape",
        ],
        "size": [
            "{x}, as far as size goes",
            "it was on the {x} side",
            "quite a {x} one",
        ],
        "background": [
            "the background? {x}, all of it",
            "it stood against a flat {x} backdrop",
            "{x} was the background colour",
        ],
    },
}
LONG_POS = {
    "seen": {
        "left": [
            "it sat over on the left side",
            "it was placed towards the left",
            "it was on the left",
            "over on the left of the picture",
            "the left side is where it was",
        ],
        "right": [
            "it was off to the right",
            "it was placed towards the right",
            "it was on the right",
            "over on the right of the picture",
            "the right side is where it was",
        ],
        "top": [
            "it was up at the top",
            "it was near the top of the frame",
            "it was high up in the picture",
            "at the top, I think",
            "the top is where it was",
        ],
        "bottom": [
            "it was down at the bottom",
            "it was near the bottom of the frame",
            "it was low in the picture",
            "at the bottom, I think",
            "the bottom is where it was",
        ],
        "center": [
            "it was right in the center",
            "it was placed in the center",
            "it was in the middle of the picture",
            "in the center, I think",
            "the center is where it was",
        ],
    },
    "unseen": {
        "left": ["you would find it at the left edge"],
        "right": ["you would find it at the right edge"],
        "top": ["it hung at the top"],
        "bottom": ["it rested at the bottom"],
        "center": ["it sat dead in the center"],
    },
}


def _long_clauses(scene: Scene, rng: random.Random, phrasing: str) -> list[str]:
    clauses = LONG_CLAUSES[phrasing]
    parts = [rng.choice(clauses[a]).format(x=getattr(scene, a)) for a in clauses]
    parts.append(rng.choice(LONG_POS[phrasing][scene.position]))
    rng.shuffle(parts)
    return parts


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


# Sentence structures: where the description sits among the fillers and how its
# clauses are joined. Each takes (clauses, head fillers, tail fillers).
LONG_STRUCTURES = {
    "seen": [
        # Filler first, then "So, a, and b, and c." (the 0.1.0 example's only structure).
        lambda c, h, t: " ".join([*h, "So, " + ", and ".join(c) + ".", *t]),
        # Filler, then one short sentence per clause.
        lambda c, h, t: " ".join([*h, *map(_sentence, c), *t]),
        # Filler, then a colon-led list.
        lambda c, h, t: " ".join([*h, "What I remember: " + "; ".join(c) + ".", *t]),
        # The description between two fillers, one sentence.
        lambda c, h, t: " ".join([h[0], "Basically, " + ", ".join(c) + ".", *h[1:], *t]),
        # Filler, then "I remember that a and b and c."
        lambda c, h, t: " ".join([*h, "I remember that " + " and ".join(c) + ".", *t]),
    ],
    "unseen": [
        # The description first, the rambling after.
        lambda c, h, t: " ".join(["Here is what I recall.", _sentence(", ".join(c)), *h, *t]),
        # Clauses interleaved with the fillers.
        lambda c, h, t: " ".join(
            [h[0], _sentence(", ".join(c[:2])), *h[1:], _sentence(" and ".join(c[2:])), *t]
        ),
    ],
}


def query_long(
    scene: Scene,
    rng: random.Random,
    phrasing: str = "seen",
    fillers: bool = True,
    scramble: bool = False,
) -> str:
    """Filler, and the five attributes scattered over rambling clauses in random order.

    The fillers alone are about as long as the retriever's 32-token window, so the
    description is mostly cut off; what survives is buried in words the retriever never
    saw. `fillers=False` gives the rambling description alone; `scramble=True` puts
    each clause's words in random order (a training augmentation: which colour is the
    background's is then told only by the words around it, not by where they stand).
    """
    clauses = _long_clauses(scene, rng, phrasing)
    pool = FILLER[phrasing] if fillers else []
    # Without fillers, one empty head keeps every structure's h[0] valid; strip() below.
    head = rng.sample(pool, rng.randint(2, 3)) if pool else [""]
    tail = rng.sample([f for f in pool if f not in head], rng.randint(0, 1)) if pool else []
    structure = rng.choice(LONG_STRUCTURES[phrasing])
    # Drawn last, so a scrambled query has the plain one's clauses, fillers and structure.
    if scramble:
        clauses = [" ".join(rng.sample(c.split(), len(c.split()))) for c in clauses]
    return structure(clauses, head, tail).strip()


# --------------------------------------------------------------------------- splits


def split_scenes(
    scenes: list[Scene], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Scene], list[Scene]]:
    order = list(range(len(scenes)))
    random.Random(seed).shuffle(order)
    n_held = round(len(scenes) * heldout_fraction)
    held = set(order[:n_held])
    return (
        [s for i, s in enumerate(scenes) if i not in held],
        [s for i, s in enumerate(scenes) if i in held],
    )


def write_pairs(
    corpus_dir: str | Path,
    pairs_dir: str | Path,
    train: list[Scene],
    heldout: list[Scene],
    seed: int = 0,
) -> dict[str, Path]:
    """Query/target files; train gets two queries per scene, held-out one.

    Training pairs use the seen phrasings only. The held-out scenes get one query in
    seen phrasings (`heldout-zh`, `heldout-long`) and one in phrasings no training data
    uses (`heldout-zh-unseen`, `heldout-long-unseen`). Targets are relative to the pairs
    file so the folder pair can be moved as a whole.
    """
    pairs_dir = Path(pairs_dir)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(corpus_dir).resolve(), pairs_dir.resolve())
    jobs = {
        "train-zh": (train, query_zh, 2),
        "heldout-zh": (heldout, query_zh, 1),
        "train-long": (train, query_long, 2),
        "heldout-long": (heldout, query_long, 1),
        "heldout-zh-unseen": (heldout, partial(query_zh, phrasing="unseen"), 1),
        "heldout-long-unseen": (heldout, partial(query_long, phrasing="unseen"), 1),
        "heldout-en": (heldout, caption_en, 1),
    }
    out = {}
    for name, (scenes, fn, per_scene) in jobs.items():
        path = pairs_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for sc in scenes:
                rng = scene_rng(seed, f"{name}:{sc.file}")
                queries: list[str] = []
                for _ in range(per_scene * 5):  # a few tries for distinct phrasings
                    if len(queries) == per_scene:
                        break
                    if (q := fn(sc, rng)) not in queries:
                        queries.append(q)
                target = Path(rel, sc.file).as_posix()
                for q in queries:
                    f.write(json.dumps({"query": q, "target": target}, ensure_ascii=False) + "\n")
        out[name] = path
    return out


# --------------------------------------------------------------------------- composed queries

# A composed query is a reference image plus an edit of one or two of its attributes,
# in Chinese or English; its target is the edited scene, which is in the corpus too.
# The edit names only what changes: the rest has to be read off the reference image.
# Seen and unseen phrasings as for the other shifts (templates and edit wordings).
EN_EDITS = {
    "seen": {
        "shape": ["a {shape} instead", "make it a {shape}"],
        "color": ["in {color}", "make it {color}"],
        "background": ["on a {background} background", "with a {background} background"],
        "position": ["{pos}", "moved {pos}"],
        "size": ["{size}", "make it {size}"],
    },
    "unseen": {
        "shape": ["the object should be a {shape}", "swap the shape for a {shape}"],
        "color": ["paint it {color}", "the colour should be {color}"],
        "background": ["change the backdrop to {background}", "{background} behind it"],
        "position": ["place it {pos}", "shift it {pos}"],
        "size": ["a {size} version", "{size} this time"],
    },
}
EN_COMPOSE = {
    "seen": ["like this one, but {edits}", "same picture but {edits}", "this image, {edits}"],
    "unseen": ["I want this again, only {edits}", "{edits}, otherwise keep everything as it is"],
}
ZH_EDITS = {
    "seen": {
        "shape": ["换成{shape}", "形状改成{shape}"],
        "color": ["颜色换成{color}", "改成{color}的"],
        "background": ["背景换成{bgc}", "用{bgc}背景"],
        "position": ["放到{pos}", "移到{pos}"],
        "size": ["变{size}", "改成{size}的"],
    },
    "unseen": {
        "shape": ["把形状变为{shape}", "形状用{shape}"],
        "color": ["涂成{color}", "颜色要{color}"],
        "background": ["背景颜色调成{bgc}", "后面换成{bgc}"],
        "position": ["挪到{pos}", "位置改到{pos}"],
        "size": ["做得{size}一点", "尺寸{size}一些"],
    },
}
ZH_COMPOSE = {
    "seen": ["和这张一样，但是{edits}", "这张图，{edits}", "参考这张，{edits}"],
    "unseen": ["照着这张来，只是{edits}", "{edits}，其余保持不变"],
}


@dataclass(frozen=True)
class Composed:
    reference: Scene
    target: Scene
    query: str


def _edit_words(target: Scene, lang: str) -> dict[str, str]:
    if lang == "zh":
        return {
            "shape": ZH_SHAPES[target.shape],
            "color": ZH_COLORS[target.color],
            "bgc": ZH_COLORS[target.background],
            "pos": ZH_POSITIONS[target.position],
            "size": ZH_SIZES[target.size],
        }
    return {
        "shape": target.shape,
        "color": target.color,
        "background": target.background,
        "pos": EN_POSITIONS[target.position],
        "size": target.size,
    }


def query_compose(
    target: Scene, changed: list[str], rng: random.Random, lang: str, phrasing: str = "seen"
) -> str:
    """The edit text that turns a reference scene into `target` by changing `changed`."""
    edits, templates = (ZH_EDITS, ZH_COMPOSE) if lang == "zh" else (EN_EDITS, EN_COMPOSE)
    words = _edit_words(target, lang)
    parts = [rng.choice(edits[phrasing][a]).format(**words) for a in changed]
    joined = "，".join(parts) if lang == "zh" else " and ".join(parts)
    return rng.choice(templates[phrasing]).format(edits=joined)


def neighbours(scenes: list[Scene]) -> dict[tuple, dict[tuple[str, ...], list[Scene]]]:
    """For each scene's attributes: the corpus scenes that differ from it in exactly the
    attributes of each key (one or two of them)."""
    out: dict[tuple, dict[tuple[str, ...], list[Scene]]] = {s.combo: {} for s in scenes}
    for k in (1, 2):
        for attrs in itertools.combinations(range(len(ATTRIBUTES)), k):
            names = tuple(ATTRIBUTES[i] for i in attrs)
            groups: dict[tuple, list[Scene]] = {}
            for s in scenes:  # same key: equal on every attribute outside `attrs`
                key = tuple(v for i, v in enumerate(s.combo) if i not in attrs)
                groups.setdefault(key, []).append(s)
            for group in groups.values():
                for s in group:
                    near = [o for o in group if all(o.combo[i] != s.combo[i] for i in attrs)]
                    if near:
                        out[s.combo][names] = near
    return out


def compose_for(
    target: Scene, near: dict[tuple[str, ...], list[Scene]], rng: random.Random, lang: str,
    phrasing: str = "seen",
) -> Composed | None:  # fmt: skip
    """One composed query for `target`: a corpus scene one or two attributes away as the
    reference (one attribute in 60% of queries), the edit back to `target` as text."""
    ones = [k for k in near if len(k) == 1]
    twos = [k for k in near if len(k) == 2]
    keys = ones if (rng.random() < 0.6 or not twos) else twos
    if not keys:
        return None
    changed = list(rng.choice(sorted(keys)))
    reference = rng.choice(near[tuple(changed)])
    rng.shuffle(changed)
    return Composed(reference, target, query_compose(target, changed, rng, lang, phrasing))


def write_compose_pairs(
    corpus_dir: str | Path,
    pairs_dir: str | Path,
    scenes: list[Scene],
    train: list[Scene],
    heldout: list[Scene],
    seed: int = 0,
) -> dict[str, Path]:
    """`train-compose` (two per training target, Chinese and English), `heldout-compose`
    and `heldout-compose-unseen` (one per held-out target, the language alternating),
    and `heldout-compose-oracle` (the held-out targets' own captions, the ceiling).

    Split by target scene, as the other shifts: no held-out target is a training target.
    A reference is any corpus scene (held-out ones included: the retriever has indexed
    them too). Paths are relative to the pairs file.
    """
    pairs_dir = Path(pairs_dir)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(corpus_dir).resolve(), pairs_dir.resolve())
    near = neighbours(scenes)
    jobs = {
        "train-compose": (train, ("zh", "en"), "seen"),
        "heldout-compose": (heldout, None, "seen"),
        "heldout-compose-unseen": (heldout, None, "unseen"),
    }
    out = {}
    oracle = []
    for name, (targets, langs, phrasing) in jobs.items():
        path = pairs_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, sc in enumerate(targets):
                rng = scene_rng(seed, f"{name}:{sc.file}")
                for lang in langs or (("zh", "en")[i % 2],):
                    c = compose_for(sc, near[sc.combo], rng, lang, phrasing)
                    if c is None:
                        continue
                    rec = {
                        "query": c.query,
                        "image": Path(rel, c.reference.file).as_posix(),
                        "target": Path(rel, sc.file).as_posix(),
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    if name == "heldout-compose":
                        cap = caption_en(sc, scene_rng(seed, f"oracle:{sc.file}"))
                        oracle.append({"query": cap, "target": rec["target"]})
        out[name] = path
    path = pairs_dir / "heldout-compose-oracle.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in oracle), encoding="utf-8")
    out["heldout-compose-oracle"] = path
    return out
