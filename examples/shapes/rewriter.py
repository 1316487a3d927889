"""The shapes world's base rewriter: a tiny LM that plays an off-the-shelf LLM.

Before GRPO, GRAPE starts from an instruction-tuned LLM that already knows the task
(turn any query into a short English caption) but not the words *this* retriever was
trained on. We cannot download one here, so `train_base_rewriter` builds that starting
point: a 2.2M-parameter Qwen2-architecture LM, supervised on the training scenes'
Chinese, long rambling English and short English queries, prompted exactly as grape
prompts it (`render_prompt` with the example's one-line `PROMPT`, which the example hands
every grape command as `--prompt-file`; then target, `<|im_end|>`).

Its targets imitate an LLM's own house style, so its imperfection is realistic and known:

- Synonyms the retriever never saw. Most values have a preferred paraphrase (`SYNONYMS`):
  crimson for red, box for square, donut for ring, rhombus for diamond, "in the upper/
  lower part" for top/bottom, "in the middle" for center, tiny/big for small/large,
  "backdrop" for "background"; left and right become a vague "off to one side" now and
  then. A few values it names as the retriever does, as a real LLM would (`NATURAL`:
  triangle, star, white, black, left, right).
- Its own caption layouts ("a big crimson box in the upper part, against a golden
  backdrop"), none of them the retriever's.
- It drops details: size, position or background are left out of some targets, as
  often for long inputs as for short ones (`P_DROP`).
- It reads long inputs in seen phrasings nearly as well as Chinese ones. For a long
  time it did not: trained at a learning rate of 2e-3 it never learned which colour of
  a rambling paragraph is the object's and which the background's, and named the two
  colours in either order (in the whole example: colour wrong 46%, background 48% of
  held-out long queries; Chinese 0%). `binding_probe` (`python -m examples.shapes.rewriter MODEL_DIR
  --binding`) asks for every pair of an object-colour and a background clause template
  (`the shape itself was coloured {a}` ... `the whole background was {b}`), 24 colour
  pairs each, fillers around, all else fixed: that model (measured by the probe's first
  version, other random draws) gave the object its own colour in 55% and the
  background's in 46%, a coin flip, with a lean to the colour named first (66% right
  when the object's clause came first, 43% when not). More
  layers and steps (200 held-out long queries, both colours right / the object given
  the background's colour: two layers 31 / 95, 6,000 steps 101 / 88, three layers 104 / 93),
  curricula, minimal-pair twins (`TWINS`) and an extra reading task (a long query, then
  "What colour was the background?"; mix-ups 72-75%) did not make it bind.
  The learning rate did. 200 held-out scenes, 3,000 steps, one thread; long-input
  colour / background wrong, mix-ups; then the held-out phrasings (`PHRASINGS`):
  - 2e-3: seen long 46% / 48% (the example's run); the probe 55% right
  - **1e-3: seen long 2% / 2%, mix-ups 2%**, shape 3%; the probe 97% right;
    unseen long: mix-ups 37%, position wrong 46%; unseen Chinese mix-ups 1.5%
  - 5e-4: seen long 0% / 1%; unseen long mix-ups 68%, shape wrong 35%
  One `rank-top` GRPO run from each (the example's settings, 300 steps, on the
  example's world), held-out R@1 / R@10, zh / long / zh-unseen / long-unseen:
  1e-3 .948 / 1.000, .895 / .983, .943 / .998, .323 / .512; 5e-4 .943 / .998, .940 /
  .995, .838 / .922, .120 / .333; the 2e-3 base's (the example before) .858 / .953,
  .333 / .610, .828 / .940, .133 / .325. So 1e-3: it holds best on phrasings it never
  saw. In the whole example (trained on two threads, another trajectory; 400 held-out
  scenes, RESULTS.md) the 1e-3 base reads seen long queries with colour and background
  wrong in 10% each (46% / 48% at 2e-3), shape 4% (26%), mix-ups 10% (47%); unseen long:
  mix-ups 30% (51%), background 42%, position 41%; Chinese: 0% seen, 5% unseen (15%).
  `binding_probe` on it: object's colour right 91.5% (seen templates; the background's
  given instead 8.5%), unseen templates 72.7% (24.5%).
  Long queries in unseen phrasings stay the weak spot (unseen clause templates
  such as "{x} was the background colour" name the background and a colour word in
  one breath). Garbling half of the long training inputs (`GARBLE`) took the whole
  example's unseen long reading to mix-ups 22%, background wrong 24%, position wrong
  23% (dropped 18%); seen long mix-ups 6%. But the same code on another machine gave
  26% seen, 42% unseen: floating-point luck. Scrambling 30% of the long and Chinese
  training inputs (`SCRAMBLE`) at 7e-4 made the seen long reading hold in every draw
  measured (mix-ups 0.3-1.3%, the whole example 1%); unseen long 18-31%, unseen
  Chinese 0-14% (the whole example 25% and 14%). Far more varied seen long phrasings
  (world.py, 873db2b) took unseen long position wrong from 17% to 0-2%; colour binding
  did not improve (the binding probe's unseen templates 81-85% against 87.5%, unseen
  long mix-ups 14-26%), seen long mix-ups rose to 3-6%. `usage_report` and RESULTS.md
  measure it on every run.

GRPO can only amplify what the policy already samples (measured while building this
example: with the right word in none of the supervised targets, GRPO went nowhere; with
5% it reached the oracle). So each attribute gets the retriever's exact word in `P_EXACT` of targets, and
`P_ORACLE` of targets are the retriever's own caption (`caption_en`): about 9% per
attribute. Greedy decoding says the synonym; sampling at temperature 1 finds the exact
word now and then.

Measured in 0.1.0 (400 held-out scenes, seed 0, 1,500 steps, 0.1.0's phrasings): greedy
rewrites of Chinese queries name every attribute, with the exact word only for the
NATURAL values (size never); of the queries whose greedy rewrite misses a word, 25-55%
have it in at least one of 8 samples (long inputs: 20-55%). Against the example's retriever, held-out
Chinese queries rewritten this way reach Recall@10 ~0.05; the same rewrites with the
synonyms mapped back to the retriever's words ~0.95: what GRPO has to find is wording.

    python -m examples.shapes.rewriter OUT_DIR [--steps N] [--quick] [--eval N]

trains on the default world's training split and prints held-out usage statistics.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

from examples.shapes.world import (
    ATTRIBUTES,
    COLORS,
    EN_POSITIONS,
    FILLER,
    LONG_CLAUSES,
    LONG_POS,
    LONG_STRUCTURES,
    PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    ZH_WORDS,
    Scene,
    caption_en,
    query_long,
    query_zh,
)
from grape_cli.prompt import PromptTemplate, render_prompt
from grape_cli.tiny import build_tiny_lm

# The base LLM's vocabulary: first entry is its habit, the rest are rarer variants.
SYNONYMS: dict[str, list[str]] = {
    "circle": ["disc", "round dot"],
    "square": ["box", "block"],
    "triangle": ["pyramid"],
    "star": ["pentagram"],
    "cross": ["plus sign", "plus"],
    "ring": ["donut", "hoop"],
    "diamond": ["rhombus", "lozenge"],
    "heart": ["love symbol", "valentine"],
    "red": ["crimson", "scarlet"],
    "green": ["emerald", "lime"],
    "blue": ["navy", "azure"],
    "yellow": ["golden", "lemon"],
    "purple": ["violet", "lilac"],
    "orange": ["amber", "tangerine"],
    "white": ["ivory"],
    "black": ["charcoal"],
    "small": ["tiny", "little"],
    "large": ["big", "huge"],
    # "off to one side" loses left/right: a vague paraphrase, as LLMs do.
    "left": ["off to one side"],
    "right": ["off to one side"],
    "top": ["in the upper part", "near the upper edge"],
    "bottom": ["in the lower part", "near the lower edge"],
    "center": ["in the middle", "in the centre"],
}
# The example's prompt, which every grape command of the example gets with
# `--prompt-file` (run.py writes it to the work folder). grape's default system message
# is 74 tokens, 90% of a Chinese query's prompt and 45% of a long one's: a GRPO step
# runs them forwards and backwards for each of its 64 completions, and a model trained
# from scratch learns nothing from a longer constant prefix.
PROMPT = PromptTemplate(system="Rewrite the image search query as one short English caption.")
# Values the base LLM already names as the retriever does: not every word is wrong.
NATURAL = {"triangle", "star", "white", "black", "left", "right"}
assert set(SYNONYMS) == {*SHAPES, *COLORS, *SIZES, *POSITIONS}, "world vocabulary changed"

P_EXACT = 0.06  # per attribute: the retriever's word instead of the habit
P_ORACLE = 0.04  # whole target: the retriever's own caption (~9% exact per attribute)
P_NATURAL = 0.85  # a NATURAL value comes out exact this often
P_VARIANT = 0.25  # among synonyms, the rarer variants
# Chance to leave a detail out, the same for every kind of input: an instruction-tuned
# LLM reads a rambling paragraph as well as a short one (0.1.0's example dropped the
# background of 55% of long inputs by design, 91% in practice; real LLMs do not).
P_DROP = {"size": 0.25, "position": 0.1, "background": 0.15}
# What the supervised batches are made of, phase by phase: (until this fraction of the
# steps, input kind -> share of batches). One input kind per batch, so short batches are
# not padded to a long query.
# - Chinese alone first: its words are never output words and a background colour is one
#   token, so the model learns to look attributes up within ~300 steps; with English
#   mixed in from the start it often had not after 1,000 (measured).
# - Long inputs first without their fillers ("clauses"): the model learns to read the
#   description before it learns to skip the rambling around it. Measured on 200
#   held-out scenes, 3,000 steps: long-input shape wrong 25% with it, 84% without;
#   colour mix-ups 46% and 45%.
# - Long inputs are the hardest and the costliest (~3.4x a short step); at 2e-3 their
#   colours were never bound to their clauses (module docstring).
# (The measurements in this comment and the next were made at the old rate, 2e-3.)
INPUT_MIX = {"zh": 0.16, "long": 0.6, "en": 0.24}
CURRICULUM: list[tuple[float, dict[str, float]]] = [
    (0.2, {"zh": 1.0}),
    (0.5, {"zh": 0.16, "clauses": 0.6, "en": 0.24}),
    (1.0, INPUT_MIX),
]
# Long batches as minimal pairs: each query beside a twin from another training scene
# whose object and background colours are the other way round, written with the same
# draws (clause order, templates, fillers, target wording). Measured on the base
# rewriter alone (3 layers, 200 held-out scenes, against the same without twins): long
# queries both colours right 117 vs 104, shape wrong 15% vs 27%; unseen Chinese mix-ups
# 6% vs 18%; unseen long-form position wrong 24% vs 64%; swap test 128 of 128. Off:
# one rank-top GRPO run from each base (the example's settings, 300 steps, same world)
# gave held-out long R@1/R@10 .205/.522 with twins against .320/.600 without, unseen long
# .115/.393 against .117/.295, Chinese .785/.953 against .828/.927; the twins' policy
# named one colour twice (object and background) in 48% of long rewrites, against 23%.
TWINS = False
# Long inputs with some of their words swapped for others of the seen phrasings: in
# GARBLE[0] of the long training inputs, each word that is neither a value nor a cue
# ("background", "colour", ...) is replaced with GARBLE[1] chance (`garble`). Without it
# the model learned each seen clause template as a whole and read an unseen one by its
# first words: "it hung at the top" came out "off to one side" or "in the middle", and
# unseen long position was wrong in 41-46% of held-out queries. Measured on 200 held-out
# scenes, 3,000 steps, one thread (without -> with): unseen long position wrong 46% ->
# 10%, colour mix-ups 37% -> 32%; seen long mix-ups 2% -> 9% (one run each; without it
# the whole example's two-thread run gave 10%: seen long is within a run's spread);
# Chinese seen 0% both. Swaps at 0.3 with words dropped as well: unseen long position
# 15%, but mix-ups 46% (seen long 11%). One GRPO run per reward from each base (the
# example's settings, on the e58765a example's world), held-out R@1 / R@10, without ->
# with: long-unseen rank .325 / .497 -> .415 / .647, rank-top .307 / .505 -> .420 /
# .635; long rank .865 / .960 -> .853 / .940; zh and zh-unseen within .03. Swaps are
# only ever words of the seen phrasings.
GARBLE = (0.5, 0.15)
# Inputs with each clause's words (a long query's) or each part's between punctuation marks
# (a Chinese query's) in random order, this share of each kind (`query_long`/`query_zh`
# scramble=True). Seen templates always put a colour in the same place beside its cue, so
# the model learned the places, and how well it did was a matter of floating-point luck:
# the same code at 1e-3 read seen long queries with colour mix-ups of 6% on one machine
# and 26-32% on another. Scrambled, only the words around a colour ("backdrop", 红色背景)
# tell whose it is, not where they stand. Base rewriter alone, two
# floating-point draws (one thread, AVX-512 / AVX2), 400 held-out scenes, colour mix-ups
# seen long / unseen long / unseen Chinese: 7e-4 without scrambling 1.0 / 30 / 24% and
# 2.2 / 35 / 0.3%; long scrambled 0.3 / 31 / 34% and 0.5 / 18 / 0.7%; both scrambled
# (kept) 1.3 / 25 / 14% and 0.3 / 31 / 0%; 1e-3 with long scrambled 8 / 39 / 7% and
# 4 / 20 / 11%.
SCRAMBLE = {"long": 0.3, "zh": 0.3}

# 2.2M parameters (the figures in this comment are at the old learning rate, 2e-3).
# Width mattered more than depth at first: at hidden 128 (2 or 4
# layers) the model had not begun to read the query after 600 steps; at 256 it had by
# ~300. Four layers at 256 read worse after the same 3,000 steps (colour mix-ups in
# held-out long queries 81% of 200; Chinese 15%). Three layers bind a long query's
# colours to the object and the background far more often than two (both right in 104
# of 200 held-out long queries, against 31; module docstring), and GRPO's long-query
# results rest on that. The whole example's GRPO steps (64 completions) took 3.8 s side
# by side on one thread each and 2.6 s alone (two layers: 2.8 and 1.8), on 2 cores.
ARCH = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
VOCAB = 2500  # an upper bound: the BPE runs out of merges near 960
STEPS, QUICK_STEPS = 3000, 80
BATCH = 16
# 2e-3 never learned to bind a long query's colours to their clauses; 5e-4 read the seen
# phrasings best and the unseen ones worst (module docstring); 7e-4 with `SCRAMBLE` bound
# them in every draw measured (1e-3 did in some).
LR, WARMUP = 7e-4, 30


def _word(value: str, rng: random.Random) -> str:
    """How the base LLM names one attribute value (position: the whole phrase)."""
    exact = EN_POSITIONS.get(value, value)
    p_exact = P_NATURAL if value in NATURAL else P_EXACT
    if rng.random() < p_exact:
        return exact
    syns = SYNONYMS[value]
    if len(syns) > 1 and rng.random() < P_VARIANT:
        return rng.choice(syns[1:])
    return syns[0]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def base_caption(scene: Scene, rng: random.Random) -> str:
    """One supervised target: what the imitated LLM would answer for this scene."""
    if rng.random() < P_ORACLE:
        return caption_en(scene, rng)
    keep = {k: rng.random() >= p for k, p in P_DROP.items()}
    noun = f"{_word(scene.color, rng)} {_word(scene.shape, rng)}"
    if keep["size"]:
        noun = f"{_word(scene.size, rng)} {noun}"
    pos = _word(scene.position, rng) if keep["position"] else ""
    bg = ""
    if keep["background"]:
        bg_word = "background" if rng.random() < P_EXACT else "backdrop"
        bg = f"{_word(scene.background, rng)} {bg_word}"
    style = rng.choices([0, 1, 2], weights=[0.6, 0.25, 0.15])[0]
    if style == 0:  # "a big crimson box in the upper part, against a golden backdrop"
        parts = [_a(noun) + (f" {pos}" if pos else "")] + ([f"against {_a(bg)}"] if bg else [])
    elif style == 1:  # "image of a crimson box, in the upper part, golden backdrop"
        parts = [f"image of {_a(noun)}"] + [p for p in (pos, bg) if p]
    else:  # "big crimson box in the upper part with a golden backdrop"
        return " ".join([noun, *([pos] if pos else []), *([f"with {_a(bg)}"] if bg else [])])
    return ", ".join(parts)


def make_example(scene: Scene, rng: random.Random, kind: str) -> tuple[str, str]:
    """(query, target) for one scene and input kind: 'zh', 'long', 'clauses' (a long
    query's description without its fillers) or 'en'. Long and Chinese ones are
    scrambled now and then (`SCRAMBLE`), long ones garbled (`GARBLE`)."""
    if kind in ("long", "clauses"):
        scramble = rng.random() < SCRAMBLE["long"]
        query = query_long(scene, rng, fillers=kind == "long", scramble=scramble)
    elif kind == "zh":
        query = query_zh(scene, rng, scramble=rng.random() < SCRAMBLE["zh"])
    else:
        query = caption_en(scene, rng)
    target = base_caption(scene, rng)
    if kind in ("long", "clauses") and rng.random() < GARBLE[0]:
        query = garble(query, rng, GARBLE[1])
    return query, target


# Words `garble` never swaps: every value and synonym, and the cues that say which
# attribute a colour word belongs to. The rest of the seen phrasings' words are the swaps.
_KEPT = {w for v, syns in SYNONYMS.items() for w in [v, *" ".join(syns).split()]} | {
    "background", "backdrop", "behind", "colour", "coloured", "color", "size", "shape"
}  # fmt: skip
_SWAPS = sorted(
    {
        w
        for text in [
            *FILLER["seen"],
            *(t for ts in LONG_CLAUSES["seen"].values() for t in ts),
            *(t for ts in LONG_POS["seen"].values() for t in ts),
        ]
        for w in re.findall(r"[a-z]+", text.lower())
    }
    - _KEPT
    - {"x"}  # the templates' {x}
)


def garble(text: str, rng: random.Random, rate: float) -> str:
    """`text` with each word that is no value or cue swapped, at `rate`, for a random
    word of the seen phrasings; punctuation stays. The value words and their cues are
    then all a clause reliably has, so the model learns to read those, not the template."""
    words = []
    for tok in text.split():
        core = re.sub(r"[^A-Za-z-]", "", tok).lower()
        if core and core not in _KEPT and rng.random() < rate:
            tok = re.sub(r"[A-Za-z-]+", rng.choice(_SWAPS), tok, count=1)
        words.append(tok)
    return " ".join(words)


# --------------------------------------------------------------------------- training


def _tokenizer_corpus(scenes: list[Scene], rng: random.Random) -> list[str]:
    """Texts for the BPE: English as written, Chinese cut into words.

    Byte-level pre-tokenisation splits on spaces, and Chinese has none: trained on whole
    queries, BPE learned one token per templated clause ("上面有大橙色圆环"), so a new
    combination of attributes tokenised into junk the model never saw. Trained on each
    word as its own text, merges stay inside words, as in a real LLM's vocabulary.
    """
    # "红色背景" as one word (`ZH_WORDS`): without it the model confused the object's and
    # the background's colour in 9 of 10 Chinese queries after 1,000 steps.
    corpus = [PROMPT.system] * 20
    for sc in scenes:
        corpus += [p for p in ZH_WORDS.split(query_zh(sc, rng)) if p]
        corpus += [query_long(sc, rng), caption_en(sc, rng), base_caption(sc, rng)]
    corpus += [s for syns in SYNONYMS.values() for s in syns] * 5
    return corpus


def _encode(tokenizer, prompts: dict[str, list[int]], query: str, target: str):
    """Prompt ids exactly as grape renders them, then target ids and EOS."""
    if query not in prompts:
        text = render_prompt(tokenizer, PROMPT, query)
        prompts[query] = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompts[query], answer


def _loss(model, tokenizer, pairs: list[tuple[list[int], list[int]]]):
    """Mean loss on the answers (prompt tokens get none), right-padded.

    Every prompt starts with the same ~64 tokens (system message, "Query:"), a third to
    two thirds of each sequence; they are run once and their keys and values repeated
    over the batch. Same loss and gradients as the plain batch, 1.4-2.3x less compute.
    """
    import torch

    first = pairs[0][0]
    n = min(len(p) for p, _ in pairs) - 1  # keep one prompt token to predict the answer
    n = next((i for i in range(n) if any(p[i] != first[i] for p, _ in pairs)), n)
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    # transformers 5 renamed `past_key_values` to `cache`, in and out
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = model(input_ids=ids[:1, :n], use_cache=True)[arg]
    cache.batch_repeat_interleave(len(pairs))
    return model(
        input_ids=ids[:, n:], attention_mask=mask, labels=labels[:, n:], **{arg: cache}
    ).loss


def _twins(scenes, by_colours, rng: random.Random, kind: str) -> list[tuple[str, str]]:
    """One example and its twin: colours the other way round, every other draw the same."""
    scene = rng.choice(scenes)
    twin = rng.choice(by_colours.get((scene.background, scene.color)) or [scene])
    state = rng.getstate()
    twin_example = make_example(twin, rng, kind)
    rng.setstate(state)
    return [make_example(scene, rng, kind), twin_example]


def warmup_cosine(steps: int, warmup: int):
    """The learning-rate factor at each step: linear warmup, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train_base_rewriter(
    out_dir,
    scenes_train: list[Scene],
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    log=print,
) -> Path:
    """Build, supervise and save the base rewriter in `out_dir`; returns the folder.

    Only `scenes_train` are seen. quick=True is a smoke-test size (seconds, no quality).
    """
    import torch

    from grape_cli.models import load_causal_lm

    t0 = time.time()
    out = Path(out_dir)
    rng = random.Random(seed)
    steps = steps if steps is not None else (QUICK_STEPS if quick else STEPS)

    corpus = _tokenizer_corpus(scenes_train[:200] if quick else scenes_train, rng)
    build_tiny_lm(out, corpus, preset=ARCH, vocab_size=VOCAB, seed=seed)
    model, tokenizer = load_causal_lm(str(out), device="cpu")
    model.train()
    log(
        f"base rewriter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"vocab {len(tokenizer)}, {steps} steps (tokenizer {time.time() - t0:.1f}s)"
    )

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, WARMUP))
    by_colours: dict[tuple[str, str], list[Scene]] = {}  # twins' lookup, only with TWINS
    for sc in scenes_train if TWINS else []:
        by_colours.setdefault((sc.color, sc.background), []).append(sc)
    prompts: dict[str, list[int]] = {}
    ema = None
    for step in range(steps):
        mix = next(m for until, m in CURRICULUM if step < until * steps)
        # A one-kind phase draws nothing: the random stream, and so every weight, stays
        # what the schedule before CURRICULUM gave.
        kind = next(iter(mix)) if len(mix) == 1 else rng.choices(list(mix), list(mix.values()))[0]
        if TWINS and kind in ("long", "clauses"):
            examples = [
                ex for _ in range(BATCH // 2) for ex in _twins(scenes_train, by_colours, rng, kind)
            ]
        else:
            examples = [make_example(rng.choice(scenes_train), rng, kind) for _ in range(BATCH)]
        pairs = [_encode(tokenizer, prompts, *ex) for ex in examples]
        loss = _loss(model, tokenizer, pairs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}  loss {ema:.3f}  {time.time() - t0:.0f}s")
        if len(prompts) > 20000:  # the cache is for repeated Chinese queries; keep it bounded
            prompts.clear()

    model.eval()
    model.save_pretrained(out)
    meta = {
        "seed": seed,
        "steps": steps,
        "batch": BATCH,
        "lr": LR,
        "arch": ARCH,
        "vocab": len(tokenizer),
        "train_scenes": len(scenes_train),
        "final_loss": ema,
        "seconds": round(time.time() - t0, 1),
        "p_exact": P_EXACT,
        "p_oracle": P_ORACLE,
    }
    (out / "base_rewriter.json").write_text(json.dumps(meta, indent=2))
    log(f"base rewriter saved to {out} in {meta['seconds']}s")
    return out


# --------------------------------------------------------------------------- analysis

_VALUES = {"shape": SHAPES, "color": COLORS, "position": POSITIONS, "size": SIZES}
# Synonyms that name one value only ("off to one side" is left or right: no hedge).
_OWN_WORDS = {
    v: [w for w in syns if sum(w in other for other in SYNONYMS.values()) == 1]
    for v, syns in SYNONYMS.items()
}


def _find(text: str, phrase: str) -> list[int]:
    return [m.start() for m in re.finditer(rf"\b{re.escape(phrase)}\b", text)]


def colour_reads(text: str) -> dict[str, tuple[str, bool] | None]:
    """The (value, is exact word) a caption gives for `color` and `background`, or None.

    Colour and background share a vocabulary: a colour word right before "background"
    or "backdrop" is the background, the first other one is the object's colour.
    """
    text = text.lower()
    spans: list[tuple[int, str, bool]] = []  # (offset, colour value, is exact word)
    for c in COLORS:
        spans += [(i, c, True) for i in _find(text, c)]
        spans += [(i, c, False) for s in SYNONYMS[c] for i in _find(text, s)]
    spans.sort()
    bg_at = {m.start() for m in re.finditer(r"\b\w+(?= (background|backdrop)\b)", text)}
    bg = [s[1:] for s in spans if s[0] in bg_at]
    obj = [s[1:] for s in spans if s[0] not in bg_at]
    return {"color": obj[0] if obj else None, "background": bg[0] if bg else None}


def word_usage(text: str, scene: Scene) -> dict[str, str]:
    """Per attribute: 'exact' (the retriever's word), 'synonym', 'wrong' or 'dropped'."""
    text = text.lower()
    colours = colour_reads(text)
    out = {}
    for attr in ATTRIBUTES:
        true = getattr(scene, attr)
        if attr in colours:
            hit = colours[attr]
            out[attr] = (
                "dropped"
                if hit is None
                else "wrong"
                if hit[0] != true
                else "exact"
                if hit[1]
                else "synonym"
            )
            continue
        if _find(text, true):
            out[attr] = "exact"
        elif any(_find(text, s) for s in SYNONYMS[true]):
            out[attr] = "synonym"
        elif any(_find(text, w) for v in _VALUES[attr] for w in [v, *SYNONYMS[v]]):
            out[attr] = "wrong"
        else:
            out[attr] = "dropped"
    return out


def colour_mixup(text: str, scene: Scene) -> bool:
    """The object's colour given as the background's, or the other way round."""
    c = colour_reads(text)
    return (c["color"] is not None and c["color"][0] == scene.background) or (
        c["background"] is not None and c["background"][0] == scene.color
    )


def hedges(text: str) -> bool:
    """More than one value named for one attribute ("a red or crimson or orange box"):
    how a policy games a cosine reward, by covering every value it is unsure of."""
    text = text.lower()
    for attr, values in _VALUES.items():
        named = {v for v in values for w in [v, *_OWN_WORDS[v]] if _find(text, w)}
        # Object and background colours are two attributes: the background's is not a hedge.
        if attr == "color" and (bg := colour_reads(text)["background"]):
            named.discard(bg[0])
        if len(named) > 1:
            return True
    return False


def one_colour_twice(text: str) -> bool:
    """The object and the background given the same colour, which no scene of this world
    has (`all_combos`): a hedge across two attributes. A policy unsure which of two
    colours is the object's names one of them for both, and the retriever still ranks a
    scene with that colour in either place high."""
    reads = colour_reads(text)
    return bool(reads["color"] and reads["background"]) and (
        reads["color"][0] == reads["background"][0]
    )


def usage_report(
    model_dir,
    scenes: list[Scene],
    seed: int = 0,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
) -> dict:
    """Held-out zh/long queries: greedy word usage, and exact-word reach when sampling.

    `reach` is the fraction of queries where at least one of `samples` completions at
    `temperature` uses the retriever's exact word: what GRPO has to work with. `rescue`
    is the same among the queries whose greedy rewrite misses that word.
    """
    import torch

    from grape_cli.models import load_causal_lm
    from grape_cli.prompt import clean_rewrite

    model, tokenizer = load_causal_lm(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    report: dict = {}
    for (kind, fn), phrasing in itertools.product(
        (("zh", query_zh), ("long", query_long)), PHRASINGS
    ):
        rng = random.Random(f"{seed}:{kind}:{phrasing}")
        queries = [fn(sc, rng, phrasing) for sc in scenes]
        greedy, reach, rescue = Counter(), Counter(), Counter()
        mixups = 0
        examples = []
        for i in range(0, len(scenes), 32):
            batch = [render_prompt(tokenizer, PROMPT, q) for q in queries[i : i + 32]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            n = enc["input_ids"].shape[1]
            with torch.no_grad():
                g = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
                s = (
                    model.generate(
                        **enc,
                        do_sample=True,
                        temperature=temperature,
                        top_k=0,
                        top_p=1.0,
                        num_return_sequences=samples,
                        max_new_tokens=max_new_tokens,
                    )
                    if samples
                    else g[:0]
                )
            g_txt = tokenizer.batch_decode(g[:, n:], skip_special_tokens=True)
            s_txt = tokenizer.batch_decode(s[:, n:], skip_special_tokens=True)
            for j, sc in enumerate(scenes[i : i + 32]):
                text = clean_rewrite(g_txt[j])
                if len(examples) < 4:
                    examples.append([queries[i + j], text])
                usage = word_usage(text, sc)
                greedy.update(usage.items())
                mixups += colour_mixup(text, sc)
                hits = {
                    a
                    for k in range(samples)
                    for a, u in word_usage(clean_rewrite(s_txt[j * samples + k]), sc).items()
                    if u == "exact"
                }
                reach.update(hits)
                rescue.update(a for a in hits if usage[a] != "exact")
        n_miss = {a: len(scenes) - greedy[a, "exact"] for a in ATTRIBUTES}
        report[f"{kind}-{phrasing}"] = {
            "greedy": {
                a: {
                    u: round(greedy[a, u] / len(scenes), 3)
                    for u in ("exact", "synonym", "wrong", "dropped")
                }
                for a in ATTRIBUTES
            },
            "colour_mixup": round(mixups / len(scenes), 3),
            f"reach@{samples}": {a: round(reach[a] / len(scenes), 3) for a in ATTRIBUTES},
            f"rescue@{samples}": {a: round(rescue[a] / max(1, n_miss[a]), 3) for a in ATTRIBUTES},
            "examples": examples,
        }
    return report


def binding_queries(phrasing: str = "seen", per_pair: int = 24, seed: int = 0, fillers=True):
    """Long queries that differ only in which colour goes where: for every pair of an
    object-colour and a background clause template, `per_pair` (object, background)
    colour pairs, the other attributes fixed (a large star on the left), clause order
    and fillers drawn as `query_long` draws them. Yields (templates, query, colours)."""
    clauses = LONG_CLAUSES[phrasing]
    colour_pairs = [(a, b) for a in COLORS for b in COLORS if a != b]
    rng = random.Random(f"{seed}:bind:{phrasing}")
    for ct, bt in itertools.product(clauses["color"], clauses["background"]):
        for a, b in rng.sample(colour_pairs, per_pair):
            parts = [
                rng.choice(clauses["shape"]).format(x="star"),
                ct.format(x=a),
                rng.choice(clauses["size"]).format(x="large"),
                bt.format(x=b),
                rng.choice(LONG_POS[phrasing]["left"]),
            ]
            rng.shuffle(parts)
            head = rng.sample(FILLER[phrasing], 2) if fillers else [""]
            query = rng.choice(LONG_STRUCTURES[phrasing])(parts, head, []).strip()
            yield (ct, bt), query, (a, b)


def binding_score(captions: list[str], colours: list[tuple[str, str]]) -> dict[str, float]:
    """How often a caption gives the object its own colour, the background its own, and
    the object the background's colour (a reader that ignores which clause a colour sits
    in gets about 0.5 for each)."""
    reads = [colour_reads(c) for c in captions]
    n = max(1, len(reads))

    def share(key, which):
        return (
            sum(bool(r[key]) and r[key][0] == c[which] for r, c in zip(reads, colours, strict=True))
            / n
        )

    return {
        "object": round(share("color", 0), 3),
        "background": round(share("background", 1), 3),
        "object_given_background": round(share("color", 1), 3),
    }


def binding_probe(model_dir, phrasing: str = "seen", fillers: bool = True, per_pair: int = 24):
    """Greedy captions of `binding_queries`: does the rewriter bind each colour of a long
    query to its clause, or name the two colours in either order? Module docstring."""
    import torch

    from grape_cli.models import load_causal_lm
    from grape_cli.prompt import clean_rewrite

    model, tokenizer = load_causal_lm(str(model_dir), device="cpu")
    rows = list(binding_queries(phrasing, per_pair, fillers=fillers))
    captions = []
    for i in range(0, len(rows), 32):
        batch = [render_prompt(tokenizer, PROMPT, q) for _, q, _ in rows[i : i + 32]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=32)
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        captions += [clean_rewrite(t) for t in texts]
    return {"queries": len(rows), **binding_score(captions, [c for *_, c in rows])}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from examples.shapes.world import make_scenes, split_scenes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval", type=int, default=200, help="held-out scenes to analyse")
    ap.add_argument("--samples", type=int, default=8, help="sampled rewrites per query")
    ap.add_argument("--no-train", action="store_true", help="analyse OUT_DIR as it is")
    ap.add_argument(
        "--binding", action="store_true", help="only the colour-binding probe of OUT_DIR"
    )
    args = ap.parse_args(argv)
    if args.binding:
        report = {ph: binding_probe(args.out_dir, ph) for ph in PHRASINGS}
        print(json.dumps(report, indent=1))
        return report
    train, heldout = split_scenes(make_scenes())
    folder = args.out_dir
    if not args.no_train:
        folder = train_base_rewriter(args.out_dir, train, steps=args.steps, quick=args.quick)
    t = time.time()
    report = usage_report(folder, heldout[: args.eval], samples=args.samples)
    report["eval_seconds"] = round(time.time() - t, 1)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
