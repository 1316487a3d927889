"""The shapes example world: seeded scenes, a decodable corpus, leak-free pairs."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

# examples/ is not an installed package and --import-mode=importlib does not put the
# repository root on sys.path, so the bundled example is imported from the checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes import world  # noqa: E402


def test_make_scenes_distinct_and_deterministic():
    scenes = world.make_scenes(500, seed=3)
    assert len({s.combo for s in scenes}) == 500
    assert all(s.color != s.background for s in scenes)
    assert scenes == world.make_scenes(500, seed=3)
    assert scenes != world.make_scenes(500, seed=4)
    assert {Path(s.file).suffix for s in scenes} == {".jpg", ".png"}
    assert world.Scene.from_dict(scenes[0].to_dict()) == scenes[0]


def test_render_is_deterministic_and_sized():
    scene = world.make_scenes(1)[0]
    a = world.render_scene(scene, random.Random(1))
    b = world.render_scene(scene, random.Random(1))
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    assert a.tobytes() != world.render_scene(scene, random.Random(2)).tobytes()


def test_write_corpus_round_trips(tmp_path):
    scenes = world.make_scenes(12, seed=1)
    out = world.write_corpus(tmp_path / "corpus", scenes, seed=1)
    assert world.load_scenes(out) == scenes
    for s in scenes:
        with Image.open(out / s.file) as img:
            assert img.format == ("PNG" if s.file.endswith(".png") else "JPEG")
            assert img.convert("RGB").size == (64, 64)
    # Same seed, same bytes: the corpus is reproducible.
    again = world.write_corpus(tmp_path / "again", scenes, seed=1)
    png = next(s.file for s in scenes if s.file.endswith(".png"))
    assert (out / png).read_bytes() == (again / png).read_bytes()


def test_pairs_split_by_scene(tmp_path):
    scenes = world.make_scenes(60, seed=2)
    train, held = world.split_scenes(scenes, heldout_fraction=0.25, seed=2)
    assert len(held) == 15 and {s.file for s in train}.isdisjoint(s.file for s in held)
    corpus = world.write_corpus(tmp_path / "corpus", scenes, seed=2)
    paths = world.write_pairs(corpus, tmp_path / "pairs", train, held, seed=2)
    assert set(paths) == {
        "train-zh",
        "heldout-zh",
        "train-long",
        "heldout-long",
        "heldout-en",
        "heldout-zh-unseen",
        "heldout-long-unseen",
    }

    def targets(name):
        rows = [json.loads(line) for line in paths[name].read_text("utf-8").splitlines()]
        assert all(r["query"] for r in rows)
        files = [(paths[name].parent / r["target"]).resolve() for r in rows]
        assert all(f.is_file() for f in files)
        return {f.name for f in files}

    held_files = {s.file for s in held}
    for name in ("train-zh", "train-long"):
        assert targets(name) == {s.file for s in train}
    for name in ("heldout-zh", "heldout-long", "heldout-en", "heldout-zh-unseen"):
        assert targets(name) == held_files
    assert targets("heldout-long-unseen") == held_files


@pytest.mark.parametrize("phrasing", world.PHRASINGS)
def test_zh_queries_use_only_the_listed_words(phrasing):
    words = {**world.ZH_SHAPES, **world.ZH_COLORS, **world.ZH_POSITIONS, **world.ZH_SIZES}
    rng = random.Random(0)
    for s in world.make_scenes(300, seed=5):
        q = world.query_zh(s, rng, phrasing)
        assert world.ZH_COLORS[s.background] in q and "背景" in q
        for attr, table in [
            ("shape", world.ZH_SHAPES),
            ("color", world.ZH_COLORS),
            ("position", world.ZH_POSITIONS),
            ("size", world.ZH_SIZES),
        ]:
            assert table[getattr(s, attr)] in q, (attr, q)
        # No other attribute word sneaks in (colours: only object and background).
        for table, keep in [
            (world.ZH_SHAPES, {s.shape}),
            (world.ZH_POSITIONS, {s.position}),
            (world.ZH_SIZES, {s.size}),
            (world.ZH_COLORS, {s.color, s.background}),
        ]:
            assert not [w for k, w in table.items() if k not in keep and w in q], q
        assert not re.search(r"[A-Za-z]", q)
    assert set(words.values()) >= {"圆形", "爱心", "中间", "小", "大", "黑色"}


@pytest.mark.parametrize("phrasing", world.PHRASINGS)
def test_long_queries_are_long_and_en_captions_short(phrasing):
    rng = random.Random(0)
    for s in world.make_scenes(50, seed=6):
        long_q = world.query_long(s, rng, phrasing)
        assert len(long_q.split()) > 40, long_q
        for attr in ("shape", "color", "size", "background"):
            assert re.search(rf"\b{getattr(s, attr)}\b", long_q, re.I), (attr, long_q)
        assert len(world.caption_en(s, rng).split()) <= 12
        core = world.query_long(s, rng, phrasing, fillers=False)
        assert not any(f in core for f in world.FILLER[phrasing]), core
        assert re.search(rf"\b{s.background}\b", core, re.I) and len(core.split()) < 60


def test_only_background_clauses_carry_a_background_cue():
    """Whose colour a clause gives is said by its words, in seen and unseen phrasings
    alike: every background clause has a cue, no object-colour clause has one."""
    cue = re.compile(r"\b(background|backdrop|behind|around it)\b")
    for ph in world.PHRASINGS:
        clauses = world.LONG_CLAUSES[ph]
        assert all(cue.search(t) for t in clauses["background"]), ph
        assert not any(cue.search(t) for t in clauses["color"]), ph


def test_scrambled_long_query_keeps_each_clause_words_in_another_order():
    # Same draws as the plain query: each clause's words shuffled, none lost or added.
    scene = world.make_scenes(1, seed=3)[0]
    plain = world.query_long(scene, random.Random(5), fillers=False)
    scrambled = world.query_long(scene, random.Random(5), fillers=False, scramble=True)
    assert scrambled != plain
    bag = lambda text: sorted(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    assert bag(scrambled) == bag(plain)


def test_scrambled_chinese_query_keeps_its_words_and_punctuation():
    scene = world.make_scenes(1, seed=3)[0]
    for t in range(10):
        plain = world.query_zh(scene, random.Random(t))
        scrambled = world.query_zh(scene, random.Random(t), scramble=True)
        # Same characters, the punctuation marks where they were.
        assert sorted(scrambled) == sorted(plain)
        marks = lambda q: [(i, c) for i, c in enumerate(q) if c in world._ZH_MARKS]  # noqa: E731
        assert marks(scrambled) == marks(plain)


_VALUES = [
    *world.SHAPES,
    *world.COLORS,
    *world.SIZES,
    *world.POSITIONS,
    *(c + "背景" for c in world.ZH_COLORS.values()),
    *world.ZH_SHAPES.values(),
    *world.ZH_COLORS.values(),
    *world.ZH_POSITIONS.values(),
    *world.ZH_SIZES.values(),
]


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: its literal text, any attribute value where one goes."""
    parts = re.split(r"\{\w+\}", template)
    slot = "(?:" + "|".join(map(re.escape, _VALUES)) + ")"
    return re.compile(slot.join(map(re.escape, parts)), re.I)


def test_unseen_phrasings_never_appear_in_seen_queries():
    """The held-out-phrasing split is real: none of its fillers, clause or sentence
    templates occurs in a query generated with the seen phrasings, and back."""
    scenes = world.make_scenes(300, seed=7)
    rng = random.Random(0)
    queries = {
        ph: (
            [world.query_long(s, rng, ph) for s in scenes],
            [world.query_zh(s, rng, ph) for s in scenes],
        )
        for ph in world.PHRASINGS
    }
    for ph, other in (("seen", "unseen"), ("unseen", "seen")):
        long_q, zh_q = queries[other]
        pieces = [*world.FILLER[ph], *world.ZH_TEMPLATES[ph]]
        pieces += [t for ts in world.LONG_CLAUSES[ph].values() for t in ts]
        pieces += [t for ts in world.LONG_POS[ph].values() for t in ts]
        for piece in pieces:
            pat = _pattern(piece)
            assert not any(pat.search(q) for q in long_q + zh_q), (ph, piece)
    # Every phrasing is used: the split is not one-sided by accident.
    for ph in world.PHRASINGS:
        joined = " ".join(queries[ph][0])
        assert all(f in joined for f in world.FILLER[ph])


def test_composed_pairs_edit_a_corpus_scene_into_its_target(tmp_path):
    scenes = world.make_scenes(400, seed=2)
    train, held = world.split_scenes(scenes, heldout_fraction=0.25, seed=2)
    corpus = world.write_corpus(tmp_path / "corpus", scenes, seed=2)
    paths = world.write_compose_pairs(corpus, tmp_path / "pairs", scenes, train, held, seed=2)
    by_file = {s.file: s for s in scenes}
    held_files = {s.file for s in held}
    for name in ("train-compose", "heldout-compose", "heldout-compose-unseen"):
        rows = [json.loads(x) for x in paths[name].read_text("utf-8").splitlines()]
        assert len(rows) >= 0.9 * (2 * len(train) if name.startswith("train") else len(held))
        for r in rows:
            ref = by_file[Path(r["image"]).name]  # both in the corpus
            target = by_file[Path(r["target"]).name]
            assert (paths[name].parent / r["image"]).resolve().is_file()
            changed = [a for a in world.ATTRIBUTES if getattr(ref, a) != getattr(target, a)]
            assert 1 <= len(changed) <= 2, (ref, target)
            assert (target.file in held_files) == name.startswith("heldout")
            # the edit names the target's new values, in the query's language
            zh = bool(re.search("[\u4e00-\u9fff]", r["query"]))
            words = world._edit_words(target, "zh" if zh else "en")
            key = {"background": "bgc" if zh else "background", "position": "pos"}
            assert all(words[key.get(a, a)] in r["query"] for a in changed), r
    oracle = paths["heldout-compose-oracle"].read_text("utf-8").splitlines()
    assert len(oracle) == len(paths["heldout-compose"].read_text("utf-8").splitlines())


def test_unseen_compose_phrasings_never_appear_in_seen_queries():
    scenes = world.make_scenes(300, seed=1)
    near = world.neighbours(scenes)
    seen = set()
    rng = random.Random(0)
    for s in scenes:
        for lang in ("zh", "en"):
            if c := world.compose_for(s, near[s.combo], rng, lang, "seen"):
                seen.add(c.query)
    assert len(seen) > 400
    for tables in (world.EN_EDITS, world.ZH_EDITS):
        for attr, phrases in tables["unseen"].items():
            for p in phrases:
                stem = max(re.split(r"\{\w+\}", p), key=len).strip()
                assert len(stem) >= 2 and not any(stem in q for q in seen), (attr, p)
    for tables in (world.EN_COMPOSE, world.ZH_COMPOSE):
        for t in tables["unseen"]:
            stem = max(t.split("{edits}"), key=len).strip(" ，,")
            assert not any(stem in q for q in seen), t


def test_probe_names_the_background_five_ways():
    from examples.shapes.probe import VARIANTS, background_variants

    scene = world.Scene("x.jpg", "square", "green", "yellow", "center", "large")
    rng = random.Random(0)
    for _ in range(20):
        v = background_variants(scene, rng)
        assert set(v) == set(VARIANTS)
        # `exact` is a caption the retriever was trained on; the others differ only in
        # how they name the background.
        assert v["exact"] in {world.fill_template(t, scene) for t in world.EN_TEMPLATES}
        assert v["copy"] == "a large green square in the center, green background"
        assert v["synonym"].endswith(", golden background")
        assert v["none"] == "a large green square in the center"
        other = v["other"].rsplit(", ", 1)[1].split()[0]
        assert other in world.COLORS and other not in ("green", "yellow")
