"""The fast path of a cold `grape search` (grape_cli.quick): torch-free tokenizer ids equal
open_clip's, the ONNX text tower equals torch's, the same hits as the full path, the
cache follows every index change, any damaged cache falls back, and no torch import."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import _clean_lower
from PIL import Image

from grape_cli import quick, vectorcache
from grape_cli.cliptok import PROBES, ClipTokenizer, clean, open_clip_vocab_file
from grape_cli.index import index_folders
from grape_cli.models import load_clip
from grape_cli.quick import TEXT_CACHE, quick_search, refresh_cache
from grape_cli.search import Searcher, search
from grape_cli.store import SEARCH_CACHE, VECTOR_CACHE, Store
from grape_cli.textonnx import ExportError, OnnxTextEncoder, export_text_tower

REPO = Path(__file__).resolve().parents[1]
QUERIES = [
    "a red star",
    "A Photo of THE Eiffel Tower at night!!",
    "夕阳下的猫",
    "🐶 on the beach 🌅",
    "café naïve &amp; ﬂower",
    "a very long rambling description of a photo " * 12,  # over 77 tokens: truncated
]


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{i:03d}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture(scope="module")
def vocab() -> ClipTokenizer:
    return ClipTokenizer.from_file(open_clip_vocab_file())


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, tiny_clip):
    """An index of 20 images, built by `grape index` (search cache included)."""
    root = tmp_path_factory.mktemp("quick")
    write_images(root / "photos", 20, seed=3)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    return root


@pytest.fixture
def corpus(base_index, tmp_path):
    """A private copy of the base index, free to damage (its rows are the base photos)."""
    shutil.copytree(base_index / "index", tmp_path / "c" / "index")
    return tmp_path / "c"


@pytest.fixture
def fresh(tmp_path, tiny_clip):
    """An index of its own 20 photos, free to change both."""
    write_images(tmp_path / "photos", 20, seed=3)
    index_folders([tmp_path / "photos"], tmp_path / "index", str(tiny_clip), workers=0)
    return tmp_path


def same_hits(fast, full, k: int | None = None):
    assert fast is not None, "the fast path did not answer"
    assert [h.path for h in fast.hits] == [h.path for h in full.hits]
    assert [(h.width, h.height) for h in fast.hits] == [(h.width, h.height) for h in full.hits]
    np.testing.assert_allclose(
        [h.score for h in fast.hits], [h.score for h in full.hits], rtol=0, atol=1e-4
    )
    assert k is None or len(fast.hits) == k


# --------------------------------------------------------------------------- tokenizer


def random_texts(n: int, seed: int = 0) -> list[str]:
    """ASCII, HTML entities, accents, CJK, emoji and control characters, mixed."""
    rng = random.Random(seed)
    pool = [*map(chr, range(32, 127)), "&amp;", "&lt;", "&#39;", "\t", "\n", "\x1b[1m"]
    pool += (
        list("éÉñüßøœæçÀ“”‘’—…½²ⅫＡｂｃ")
        + list("猫狗夕阳下的红色圆形")
        + ["🐶", "🎉", "🇫🇷", "👍🏽"]
    )
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("context_length", [77, 16])
def test_token_ids_equal_open_clip(vocab, context_length, tmp_path):
    theirs = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    texts = [*PROBES, *QUERIES, *random_texts(300)]
    ours = ClipTokenizer(list(vocab.ranks), context_length)
    np.testing.assert_array_equal(ours.tokenize(texts), theirs(texts).numpy())
    # what the index keeps (the merges in use, uncompressed) reads back the same
    vocab.save(tmp_path / "merges.txt")
    again = ClipTokenizer.from_file(tmp_path / "merges.txt", context_length)
    np.testing.assert_array_equal(again.tokenize(texts), theirs(texts).numpy())
    long = ours.tokenize([QUERIES[-1]])[0]
    assert long[-1] == ours.eot and (long != 0).all()  # truncated, the end token kept


def test_plain_ascii_skips_ftfy_safely():
    """Plain printable ASCII is cleaned without ftfy (0.1 s of imports): the same text."""
    rng = random.Random(1)
    chars = [chr(c) for c in range(32, 127) if chr(c) != "&"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    for text in [*texts, *random_texts(200, seed=2), *PROBES]:
        assert clean(text) == _clean_lower(text), text
    assert clean("A&amp;B") == "a&b" == _clean_lower("A&amp;B")  # entities take the ftfy route


# --------------------------------------------------------------------------- ONNX


def test_onnx_text_embedding_equals_torch(tiny_clip, vocab, tmp_path):
    clip = load_clip(str(tiny_clip), "cpu")
    texts = [*QUERIES, *PROBES]
    onnx_path = export_text_tower(clip, tmp_path, "text", vocab.tokenize(list(PROBES)))
    got = OnnxTextEncoder(onnx_path).encode(vocab.tokenize(texts))
    want = clip.encode_texts(texts).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- searching


def test_fast_path_gives_the_full_paths_hits(base_index):
    idx = base_index / "index"
    full = Searcher(idx)
    for query in QUERIES:
        for k in (1, 5, 50):  # 50 > 20 images: every image
            fast = quick_search(query, idx, k)
            assert fast.backend == "numpy" and fast.rewrites == [query.strip()]
            same_hits(fast, full.search(query, k), min(k, 20))


def test_cli_output_is_identical_in_format(corpus, cli):
    idx = corpus / "index"
    args = ("search", "a red star", "--index", idx, "-k", "4")
    fast_json, fast_table = cli(*args, "--json"), cli(*args)
    shutil.move(idx / SEARCH_CACHE, corpus / "parked")
    full_json, full_table = cli(*args, "--json"), cli(*args)
    assert {r.exit_code for r in (fast_json, fast_table, full_json, full_table)} == {0}
    fast, full = json.loads(fast_json.stdout), json.loads(full_json.stdout)
    assert (fast["backend"], full["backend"]) == ("numpy", "faiss")
    assert fast.keys() == full.keys() and fast["hits"][0].keys() == full["hits"][0].keys()
    for key in fast.keys() - {"backend", "timings", "hits"}:
        assert fast[key] == full[key], key
    assert fast_table.stdout == full_table.stdout  # scores printed to 4 places: identical


def test_out_of_scope_queries_take_the_full_path(base_index, tmp_path):
    idx = base_index / "index"
    image = write_images(tmp_path, 1)[0]
    assert quick_search("a cat", idx, 3) is not None
    for kwargs in (
        {"rewriter": "zero-shot"},
        {"image": image},
        {"backend": "lance"},
        {"device": "cuda"},
        {"prompt": tmp_path / "prompt.txt"},
    ):
        assert quick_search("a cat", idx, 3, **kwargs) is None, kwargs
    assert quick_search("   ", idx, 3) is None  # the full path reports the empty query
    assert quick_search("a cat", tmp_path / "nowhere", 3) is None  # ... and a missing index


def test_long_query_warns_like_the_full_path(base_index, caplog):
    with caplog.at_level(logging.WARNING, logger="grape"):
        assert quick_search(QUERIES[-1], base_index / "index", 3) is not None
    assert "the retriever reads only the first 77" in caplog.text


# --------------------------------------------------------------------------- the cache


def test_cache_follows_added_and_removed_images(fresh):
    photos, idx = fresh / "photos", fresh / "index"
    before = json.loads((idx / SEARCH_CACHE / VECTOR_CACHE).read_text())
    text_before = (idx / SEARCH_CACHE / TEXT_CACHE).read_text()
    added = write_images(photos, 1, seed=9, prefix="new")[0]
    index_folders([photos], idx, workers=0)
    after = json.loads((idx / SEARCH_CACHE / VECTOR_CACHE).read_text())
    assert (
        after["count"] == before["count"] + 1 and after["table_version"] != before["table_version"]
    )
    assert (idx / SEARCH_CACHE / TEXT_CACHE).read_text() == text_before  # not exported again
    assert not (idx / SEARCH_CACHE / before["matrix"]).exists()  # old files removed
    fast = quick_search("a red star", idx, 21)
    assert str(added) in [h.path for h in fast.hits]
    same_hits(fast, search("a red star", idx, 21), 21)

    added.unlink()
    (photos / "img_000.png").unlink()
    index_folders([photos], idx, workers=0)
    fast = quick_search("a red star", idx, 30)
    assert len(fast.hits) == 19 and str(added) not in [h.path for h in fast.hits]
    same_hits(fast, search("a red star", idx, 30), 19)


def test_table_changed_without_grape_index_makes_the_cache_stale(corpus, cli):
    idx = corpus / "index"
    victim = quick_search("a red star", idx, 1).hits[0].path
    # Through LanceDB directly: the Store hooks never see it, the version token does.
    Store.open(idx).images.delete(f"path = '{victim}'")
    assert quick_search("a red star", idx, 5) is None
    r = cli("search", "a red star", "--index", idx, "-k", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["backend"] == "faiss" and victim not in [h["path"] for h in out["hits"]]
    # A Store write drops the pointer at once, before its commit.
    refresh_cache(idx)
    assert quick_search("a red star", idx, 5) is not None
    Store.open(idx).delete_ids(["no-such-id", "another"])
    assert not (idx / SEARCH_CACHE / VECTOR_CACHE).exists()


def _pointer(idx: Path, name: str = VECTOR_CACHE) -> dict:
    return json.loads((idx / SEARCH_CACHE / name).read_text())


DAMAGE = {
    "missing cache": lambda idx: shutil.rmtree(idx / SEARCH_CACHE),
    "missing vectors pointer": lambda idx: (idx / SEARCH_CACHE / VECTOR_CACHE).unlink(),
    "garbage pointer": lambda idx: (idx / SEARCH_CACHE / VECTOR_CACHE).write_text("{not json"),
    "truncated matrix": lambda idx: (idx / SEARCH_CACHE / _pointer(idx)["matrix"]).write_bytes(
        (idx / SEARCH_CACHE / _pointer(idx)["matrix"]).read_bytes()[:-64]
    ),
    "garbage matrix": lambda idx: (idx / SEARCH_CACHE / _pointer(idx)["matrix"]).write_bytes(
        b"\0" * (idx / SEARCH_CACHE / _pointer(idx)["matrix"]).stat().st_size
    ),
    "rows of another length": lambda idx: (idx / SEARCH_CACHE / _pointer(idx)["rows"]).write_text(
        json.dumps({"path": ["/x"], "width": [1], "height": [1]})
    ),
    "missing onnx weights": lambda idx: next((idx / SEARCH_CACHE).glob("*.weights")).unlink(),
    "garbage onnx": lambda idx: (
        idx / SEARCH_CACHE / _pointer(idx, TEXT_CACHE)["onnx"]
    ).write_bytes(b"not a model"),
    "missing merges": lambda idx: (
        idx / SEARCH_CACHE / _pointer(idx, TEXT_CACHE)["merges"]
    ).unlink(),
    "text export of another model": lambda idx: (idx / SEARCH_CACHE / TEXT_CACHE).write_text(
        json.dumps({**_pointer(idx, TEXT_CACHE), "model": "ViT-B-32:random"})
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_falls_back_silently(corpus, cli, damage):
    idx = corpus / "index"
    want = [h.path for h in search("a red star", idx, 5).hits]
    DAMAGE[damage](idx)
    assert quick_search("a red star", idx, 5) is None
    r = cli("search", "a red star", "--index", idx, "-k", "5", "--json")
    assert r.exit_code == 0 and r.stderr == "", r.output
    out = json.loads(r.stdout)
    assert out["backend"] == "faiss" and [h["path"] for h in out["hits"]] == want


def test_unchanged_reindex_rebuilds_a_missing_cache(fresh):
    idx = fresh / "index"
    shutil.rmtree(idx / SEARCH_CACHE)
    killed = idx / SEARCH_CACHE / "export-tmp-dead"  # an export killed halfway
    killed.mkdir(parents=True)
    (killed / "optimized.onnx.data").write_bytes(b"\0" * 1024)
    summary = index_folders([fresh / "photos"], idx, workers=0)
    assert summary.unchanged == 20 and summary.encoded == 0
    assert not killed.exists()
    same_hits(quick_search("a red star", idx, 5), search("a red star", idx, 5), 5)


def test_export_failure_never_fails_indexing(tmp_path, tiny_clip, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr("grape_cli.textonnx.export_text_tower", broken)
    write_images(tmp_path / "photos", 3)
    with caplog.at_level(logging.WARNING, logger="grape"):
        summary = index_folders([tmp_path / "photos"], tmp_path / "idx", str(tiny_clip), workers=0)
    assert summary.added == 3 and "could not export the text encoder" in caplog.text
    assert quick_search("a cat", tmp_path / "idx", 2) is None  # no export: the full path
    assert len(search("a cat", tmp_path / "idx", 2).hits) == 2


def test_model_that_cannot_be_exported_is_recorded_once(corpus, monkeypatch, caplog):
    idx = corpus / "index"
    (idx / SEARCH_CACHE / TEXT_CACHE).unlink()
    monkeypatch.setattr("grape_cli.cliptok.plain_open_clip_tokenizer", lambda tok: False)
    with caplog.at_level(logging.WARNING, logger="grape"):
        refresh_cache(idx)
    assert "fast cold searches are off" in caplog.text
    assert "unsupported" in _pointer(idx, TEXT_CACHE) and quick_search("a cat", idx, 2) is None

    def never(*args, **kwargs):
        raise AssertionError("export retried")

    monkeypatch.setattr(quick, "_export_text", never)
    refresh_cache(idx)  # recorded: not retried on every index run


def test_ann_index_leaves_no_vector_cache(corpus, monkeypatch):
    """`grape search` uses a table's ANN index (approximate) when there is one: no cache."""
    idx = corpus / "index"
    assert vectorcache._has_vector_index(Store.open(idx)) is False
    monkeypatch.setattr(vectorcache, "_has_vector_index", lambda store: True)
    assert vectorcache.write(Store.open(idx)) is False
    assert not (idx / SEARCH_CACHE / VECTOR_CACHE).exists()
    assert quick_search("a cat", idx, 2) is None


# --------------------------------------------------------------------------- imports


def test_no_heavy_import_on_the_fast_path(base_index):
    """The `grape` program answers a text query without torch, open_clip, LanceDB, faiss,
    transformers or pyarrow; and importing the CLI pulls none of them either."""
    script = f"""
import json, sys
import grape_cli.cli
heavy = ("torch", "open_clip", "lancedb", "faiss", "transformers", "pyarrow")
at_import = [m for m in heavy if m in sys.modules]
from grape_cli.cli import app
try:
    app(["search", "a red star", "--index", {str(base_index / "index")!r}, "--json"])
except SystemExit:
    pass
print(json.dumps({{"at_import": at_import, "after": [m for m in heavy if m in sys.modules]}}),
      file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "numpy"
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert loaded == {"at_import": [], "after": []}


def test_onnx_load_error_is_typed(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    with pytest.raises(ExportError):
        OnnxTextEncoder(tmp_path / "bad.onnx")
