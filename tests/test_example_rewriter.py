"""The shapes example's base rewriter: its supervised targets, and a quick-mode model
that loads and generates through grape's own loader and prompt."""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import torch

# examples/ is not an installed package and --import-mode=importlib does not put the
# repository root on sys.path, so the bundled example is imported from the checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes import rewriter, world  # noqa: E402
from grape_cli.models import load_causal_lm  # noqa: E402
from grape_cli.prompt import PromptTemplate, clean_rewrite, render_prompt  # noqa: E402


def test_targets_mostly_synonyms_but_sometimes_exact():
    """GRPO needs the exact words in the policy's samples, but not as its habit."""
    rng = random.Random(0)
    scenes = world.make_scenes(400, seed=1)
    usage = Counter()
    for sc in scenes:
        for attr, u in rewriter.word_usage(rewriter.base_caption(sc, rng), sc).items():
            usage[attr, u] += 1
    for attr in ("shape", "color", "size"):
        assert usage[attr, "wrong"] == 0
        assert usage[attr, "synonym"] > usage[attr, "exact"]
    exact_size = usage["size", "exact"] / len(scenes)  # no size value is NATURAL
    assert 0.04 < exact_size < 0.2
    assert usage["background", "dropped"] > 0


def test_word_usage_reads_retriever_and_base_captions():
    sc = world.Scene("x.jpg", "square", "red", "blue", "top", "small")
    caption = world.caption_en(sc, random.Random(0))
    assert set(rewriter.word_usage(caption, sc).values()) == {"exact"}
    assert rewriter.word_usage(
        "a tiny crimson box in the upper part, against a navy backdrop", sc
    ) == dict.fromkeys(world.ATTRIBUTES, "synonym")
    assert rewriter.word_usage("a green box", sc) == {
        "shape": "synonym",
        "color": "wrong",
        "background": "dropped",
        "position": "dropped",
        "size": "dropped",
    }


def test_colour_mixup_and_hedging_read_captions():
    sc = world.Scene("x.jpg", "square", "red", "blue", "top", "small")
    assert not rewriter.colour_mixup("a tiny crimson box, against a navy backdrop", sc)
    assert rewriter.colour_mixup("a tiny navy box, against a crimson backdrop", sc)
    assert rewriter.colour_mixup("a blue square at the top", sc)  # object given bg's colour
    assert not rewriter.hedges("a small red square at the top, blue background")
    assert not rewriter.hedges("a tiny crimson box off to one side, navy backdrop")
    assert rewriter.hedges("a small red or orange square, blue background")
    assert rewriter.hedges("a small red square box circle")
    assert rewriter.hedges("a small big red square")
    # one colour for the object and the background: a hedge across the two
    assert rewriter.one_colour_twice("a small yellow heart at the top, yellow background")
    assert rewriter.one_colour_twice("a golden box, against a lemon backdrop")
    assert not rewriter.one_colour_twice("a small yellow heart at the top, blue background")
    assert not rewriter.one_colour_twice("a small yellow heart at the top")


def test_binding_probe_tells_a_reader_from_a_colour_bag():
    """The probe's queries hold each pair of colours in their clauses, and its score tells
    a caption that follows the clauses from one that names the colours the other way."""
    rows = list(rewriter.binding_queries("seen", per_pair=3))
    n_templates = len(world.LONG_CLAUSES["seen"]["color"]) * len(
        world.LONG_CLAUSES["seen"]["background"]
    )
    assert len(rows) == 3 * n_templates
    for (ct, bt), query, (a, b) in rows:
        text = query.lower()  # a clause may open a sentence, capitalised
        assert a != b and ct.format(x=a).lower() in text and bt.format(x=b).lower() in text
    colours = [c for *_, c in rows]
    right = [f"a large {a} star on the left, {b} background" for a, b in colours]
    swapped = [f"a large {b} star on the left, {a} background" for a, b in colours]
    assert rewriter.binding_score(right, colours) == {
        "object": 1.0,
        "background": 1.0,
        "object_given_background": 0.0,
    }
    assert rewriter.binding_score(swapped, colours)["object_given_background"] == 1.0
    assert rewriter.binding_score(swapped, colours)["object"] == 0.0


def test_garble_keeps_values_and_cues_and_swaps_only_for_seen_words():
    """The garbled long inputs keep what says the answer and never leak the held-out
    phrasings: a swap is always a word the seen phrasings have."""
    scene = world.Scene(
        file="f.jpg", shape="ring", color="green", background="purple", position="top", size="small"
    )
    rng = random.Random(0)
    seen = [
        *world.FILLER["seen"],
        *(t for ts in world.LONG_CLAUSES["seen"].values() for t in ts),
        *(t for ts in world.LONG_POS["seen"].values() for t in ts),
    ]
    seen_words = {w for t in seen for w in re.findall(r"[a-z]+", t.lower())}
    changed = 0
    for _ in range(50):
        text = world.query_long(scene, rng)
        out = rewriter.garble(text, rng, 0.5)
        a, b = text.split(), out.split()
        for x, y in zip(a, b, strict=True):
            core = "".join(c for c in x if c.isalpha() or c == "-").lower()
            if core in rewriter._KEPT:
                assert x == y
            elif x != y:
                changed += 1
                swap = "".join(c for c in y if c.isalpha() or c == "-").lower()
                assert swap in seen_words
        for value in ("ring", "green", "small", "top", "purple"):
            assert len(rewriter._find(out.lower(), value)) == len(
                rewriter._find(text.lower(), value)
            )
    assert changed > 200  # about half of ~25 swappable words in each of 50 queries
    assert rewriter.garble("a green ring", random.Random(0), 0.0) == "a green ring"


def test_base_targets_drop_as_often_for_long_inputs():
    """An instruction-tuned LLM reads a ramble as well as a short query: the supervised
    targets drop the background of long inputs no more often than of Chinese ones."""
    scenes = world.make_scenes(600, seed=2)
    drops = {}
    for kind in ("zh", "long"):
        rng = random.Random(0)
        targets = [rewriter.make_example(sc, rng, kind) for sc in scenes]
        drops[kind] = sum(
            rewriter.word_usage(t, sc)["background"] == "dropped"
            for sc, (_, t) in zip(scenes, targets, strict=True)
        ) / len(scenes)
    assert drops["long"] < 0.25 and abs(drops["long"] - drops["zh"]) < 0.06, drops


def test_quick_base_rewriter_loads_and_generates_one_line(tmp_path):
    train, _ = world.split_scenes(world.make_scenes(300, seed=0))
    folder = rewriter.train_base_rewriter(
        tmp_path / "base", train, steps=30, quick=True, log=lambda _: None
    )
    assert json.loads((folder / "base_rewriter.json").read_text())["steps"] > 0

    model, tokenizer = load_causal_lm(str(folder), device="cpu")
    assert tokenizer.eos_token == "<|im_end|>"
    query = world.query_zh(train[0], random.Random(0))
    prompt = render_prompt(tokenizer, rewriter.PROMPT, query)
    assert query in tokenizer.decode(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=16)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert tokenizer.eos_token_id in new  # stops at <|im_end|>, as GRPO's format gate needs
    text = clean_rewrite(tokenizer.decode(new, skip_special_tokens=True))
    assert text and "\n" not in text


def test_quick_base_vlm_reads_a_composed_query_through_grapes_loader(tmp_path):
    from examples.shapes import vlm
    from grape_cli.query import Query
    from grape_cli.rewrite import VLMRewriter, encode_vision_prompts, load_rewriter

    scenes = world.make_scenes(300, seed=0)
    train, held = world.split_scenes(scenes)
    quiet = dict(quick=True, log=lambda _: None)
    text = rewriter.train_base_rewriter(tmp_path / "text", train, steps=10, **quiet)
    # Built on the text rewriter: before any image is seen it rewrites text as that does.
    vlm.build_on_text_model(tmp_path / "on-text", text)
    # Same prompt tokens and nearly the same logits (a 10-step model's greedy text is junk
    # with near-ties, so equal rewrites would test rounding, not the weights). Not equal:
    # the VLM's RMSNorm eps is Qwen2-VL's 1e-5, the text model's 1e-6 (see vlm.ARCH);
    # measured difference 0.011, against 3.5 for a VLM whose weights are not carried over.
    text_rw = load_rewriter(str(text), prompt=rewriter.PROMPT)
    on_text = load_rewriter(str(tmp_path / "on-text"), prompt=rewriter.PROMPT)
    query = world.query_zh(held[0], random.Random(0))
    enc = encode_vision_prompts(on_text.tokenizer, rewriter.PROMPT, [Query(query)])
    plain = render_prompt(text_rw.tokenizer, rewriter.PROMPT, query)
    ids = text_rw.tokenizer([plain], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(enc["input_ids"], ids)
    with torch.no_grad():
        want = text_rw.model(input_ids=ids).logits
        got = on_text.model(**enc).logits[..., : want.shape[-1]]
    assert torch.allclose(got, want, atol=0.05), (got - want).abs().max()
    folder = vlm.train_base_vlm(tmp_path / "vlm", scenes, train, text, **quiet)
    assert json.loads((folder / "base_vlm.json").read_text())["steps"] == vlm.QUICK_STEPS
    model = load_rewriter(str(folder), device="cpu", prompt=vlm.PROMPT)
    assert isinstance(model, VLMRewriter)  # the example's VLM prompt, as training used
    # Without a prompt file a VLM folder gets grape's default vision prompt.
    assert load_rewriter(str(folder)).prompt == PromptTemplate.default(vision=True)
    ref = tmp_path / held[0].file
    world.render_scene(held[0], random.Random(0)).save(ref)
    ((caption,),) = model.rewrite([Query("和这张一样，但是换成红色", str(ref))])
    assert "\n" not in caption
    report = vlm.reading_report(folder, scenes, held[:4])
    assert set(report) == set(world.PHRASINGS)
    assert set(report["seen"]["edited"]) <= {"exact", "synonym", "wrong", "dropped"}
