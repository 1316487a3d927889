"""`grape search`: exact results (faiss = LanceDB = numpy brute force), the rewritten query
is what gets encoded, RRF fusion, image queries, the HTML page, JSON, and bad input."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grape_cli.errors import IndexNotFound, InputError
from grape_cli.html import render_html
from grape_cli.index import index_folders
from grape_cli.models import canonical_clip_spec, load_clip
from grape_cli.ranking import reciprocal_rank_fusion
from grape_cli.search import (
    Searcher,
    SearchResult,
    VectorIndex,
    cpu_threads,
    idle_threads,
    search,
)
from grape_cli.store import Store, path_id


def random_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        # smooth colour blobs rather than noise: thumbnails that look like something
        base = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((96, 64), Image.Resampling.BICUBIC)
        paths.append(folder / f"photo_{i:02d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip):
    """(index folder, image paths): 24 images indexed with the tiny CLIP."""
    root = tmp_path_factory.mktemp("search")
    paths = random_images(root / "photos", 24, seed=5)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    return root / "index", [str(p) for p in paths]


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return load_clip(str(tiny_clip), "cpu")


def brute_force(vec: np.ndarray, idx: Path, k: int) -> list[str]:
    meta, matrix = Store.open(idx).load_matrix(("path",))
    scores = matrix @ vec.reshape(-1)
    return [meta["path"][i] for i in np.argsort(-scores, kind="stable")[:k]]


class Stub:
    """A rewriter with fixed answers: shows exactly what search encodes."""

    name = "stub"

    def __init__(self, answers: list[str]):
        self.answers = answers

    def rewrite(self, queries, n=1, temperature=None):
        return [self.answers[:n] for _ in queries]


@pytest.fixture
def stub(monkeypatch):
    def install(answers):
        monkeypatch.setattr("grape_cli.rewrite.load_rewriter", lambda spec, **kw: Stub(answers))

    return install


# --------------------------------------------------------------------------- exactness


def test_faiss_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 32)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = matrix[:20] + 0.3 * rng.standard_normal((20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = VectorIndex(matrix)
    for batch in (queries, queries[:1]):  # batched and single-query paths
        scores, rows = index.search(batch, 10)
        full = batch @ matrix.T
        want = np.argsort(-full, axis=1, kind="stable")[:, :10]
        assert (rows == want).all()
        np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), atol=1e-5)
    assert index.search(queries[:2], 10_000)[1].shape == (2, 500)  # k capped at the size
    want = np.argsort(-(queries @ matrix.T), axis=1, kind="stable")[:, :10]
    for threads in (1, 2):  # exact whatever the thread count
        assert (VectorIndex(matrix, threads=threads).search(queries, 10)[1] == want).all()


def test_search_threads_are_the_idle_cores(monkeypatch):
    import faiss

    for load, available, want in ((5.5, 2, 1), (0.2, 8, 8), (3.0, 8, 6), (1.0, 4, 4)):
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        assert idle_threads(available) == want
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    try:
        for load, want in ((0.0, 2), (6.0, 1)):
            monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
            with cpu_threads() as n:
                assert n == want == torch.get_num_threads() == faiss.omp_get_max_threads()
            assert torch.get_num_threads() == faiss.omp_get_max_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)


def test_lance_backend_equals_faiss(tmp_path, tiny_clip):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store.open_for_write(tmp_path / "idx", canonical_clip_spec(str(tiny_clip)), 32)
    store.upsert(
        [
            {
                "id": path_id(f"/x/{i}.jpg"),
                "path": f"/x/{i}.jpg",
                "root": "/x",
                "size": 1,
                "mtime_ns": 1,
                "hash": f"h{i}",
                "width": 8,
                "height": 8,
                "vector": v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
    )
    queries = vectors[:5] + 0.5 * rng.standard_normal((5, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    by_faiss = Searcher(tmp_path / "idx", backend="faiss")
    by_lance = Searcher(tmp_path / "idx", backend="lance")
    assert (by_faiss.backend, by_lance.backend) == ("faiss", "lance")
    fs, fr = by_faiss.search_vectors(queries, 7)
    ls, lr = by_lance.search_vectors(queries, 7)
    paths = [[by_faiss._paths[i] for i in row] for row in fr]
    assert paths == [[by_lance._paths[i] for i in row] for row in lr]
    np.testing.assert_allclose(fs, ls, atol=1e-5)
    assert Searcher(tmp_path / "idx").backend == "faiss"  # no ANN index: exact faiss


def test_text_query_json_matches_brute_force(corpus, clip, cli):
    idx, _ = corpus
    r = cli("search", "a red circle on the left", "--index", idx, "-k", "5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["query"] == "a red circle on the left" and out["rewriter"] == "none"
    assert out["rewrites"] == ["a red circle on the left"] and out["score_kind"] == "cosine"
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True)
    vec = clip.encode_texts(["a red circle on the left"]).numpy()
    assert [h["path"] for h in out["hits"]] == brute_force(vec, idx, 5)
    # The stages both the full path and the fast path (grape_cli.quick) report.
    assert {"model_load", "index_load", "encode", "search"} <= set(out["timings"])


def test_table_shows_the_rewrite_above_results(corpus, clip, cli, stub):
    idx, _ = corpus
    stub(["a photo of a cat"])
    r = cli("search", "我的猫 [bold]在沙发上", "--index", idx, "-k", "3", "--rewriter", "x")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "query: 我的猫 [bold]在沙发上"  # shown as typed, not as Rich markup
    assert lines[1] == "rewrite (stub): a photo of a cat"
    # Each row's cells, a long path folded over several lines put back together (under
    # pytest-xdist the folders are deeper and an 80-column table folds the file name).
    rows: list[list[str]] = []
    for line in lines:
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3 and cells[0]:
            rows.append(cells)
        elif len(cells) == 3 and rows:
            rows[-1][2] += cells[2]
    vec = clip.encode_texts(["a photo of a cat"]).numpy()
    expected = [[str(rank), Path(p).name] for rank, p in enumerate(brute_force(vec, idx, 3), 1)]
    assert [[rank, Path(path).name] for rank, _, path in rows] == expected  # the rewrite's hits


def test_real_lm_rewriter_through_search(corpus, tiny_lm):
    idx, _ = corpus
    result = search("a dog on the beach", idx, k=3, rewriter=str(tiny_lm))
    assert result.rewriter == str(tiny_lm) and len(result.rewrites) == 1
    assert len(result.hits) == 3 and result.timings["rewriter_load"] > 0


# --------------------------------------------------------------------------- fusion


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1], [3]], k=60)
    assert [item for item, _ in fused] == [3, 1, 2]
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61 + 1 / 62)
    assert reciprocal_rank_fusion([[5, 4], [4, 5]]) == [(4, 1 / 61 + 1 / 62), (5, 1 / 61 + 1 / 62)]


def test_several_rewrites_are_fused(corpus, stub):
    idx, _ = corpus
    answers = ["a cat on a sofa", "a red circle", "a dog on a beach"]
    stub(answers)
    result = search("pets", idx, k=6, rewriter="x", rewrites=3)
    assert result.rewrites == answers and result.score_kind == "rrf"
    searcher = Searcher(idx)
    _, rows = searcher.search_vectors(searcher.encode_texts(answers), 100)
    want = reciprocal_rank_fusion([r.tolist() for r in rows])[:6]
    assert [h.path for h in result.hits] == [searcher._paths[i] for i, _ in want]
    assert [h.score for h in result.hits] == pytest.approx([s for _, s in want])


# --------------------------------------------------------------------------- images


def test_image_query_alone_finds_itself(corpus, cli):
    idx, paths = corpus
    r = cli("search", "--image", paths[7], "--index", idx, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["hits"][0]["path"] == paths[7]
    assert out["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert out["rewrites"] == [] and out["image_weight"] is None


def test_image_added_to_text_with_a_weight(corpus, clip):
    idx, paths = corpus
    searcher = Searcher(idx)
    text = clip.encode_texts(["a blue sky"]).numpy()
    image = searcher.encode_image(paths[3])
    for weight in (0.3, 1.0):
        result = searcher.search("a blue sky", 5, image=paths[3], image_weight=weight)
        vec = text + weight * image
        assert [h.path for h in result.hits] == brute_force(vec / np.linalg.norm(vec), idx, 5)
        assert result.image_weight == weight
    heavy = searcher.search("a blue sky", 1, image=paths[3], image_weight=50.0)
    assert heavy.hits[0].path == paths[3]


# --------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "link", "input"})

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_page_is_self_contained_with_thumbnails(corpus, tmp_path, stub, cli):
    idx, _ = corpus
    stub(['a <b>cat</b> & "dog"'])
    page = tmp_path / "out" / "results.html"
    r = cli("search", "狗和猫", "--index", idx, "-k", "4", "-r", "x", "--html", page)
    assert r.exit_code == 0, r.output
    html = page.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == []  # every element closed, in order
    text = "".join(parser.text)
    assert "狗和猫" in text and 'a <b>cat</b> & "dog"' in text  # escaped, shown as text
    assert len(parser.images) == 4
    for img in parser.images:
        head, _, data = img["src"].partition(",")
        assert head == "data:image/jpeg;base64"
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert 'src="file:' not in html and "http" not in html  # nothing to fetch


def test_html_says_when_a_result_file_is_gone(corpus, tmp_path):
    idx, _ = corpus
    result = search("a cat", idx, k=2)
    result.hits[1].path = str(tmp_path / "moved-away.jpg")
    html = render_html(result)
    assert html.count("data:image/jpeg;base64,") == 1 and "cannot show" in html


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_html_renders_in_headless_chromium(corpus, tmp_path, cli):
    idx, _ = corpus
    page = tmp_path / "page.html"
    assert cli("search", "a cat", "--index", idx, "-k", "8", "--html", page).exit_code == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1000,700",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the thumbnails are colour blobs; an empty or broken page is greys only
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 40).mean() > 0.05


# --------------------------------------------------------------------------- errors


def one_error(r, code: int, text: str):
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and text in lines[0], r.stderr
    assert len(lines) <= 2 and "Traceback" not in r.output


def test_each_bad_input_is_one_clear_error(corpus, tmp_path, tiny_clip, cli):
    idx, _ = corpus
    one_error(cli("search", "cat", "--index", tmp_path / "none"), 4, "no grape index")
    Store.open_for_write(tmp_path / "empty", canonical_clip_spec(str(tiny_clip)), 32)
    one_error(cli("search", "cat", "--index", tmp_path / "empty"), 2, "no images yet")
    one_error(cli("search", "   ", "--index", idx), 2, "query is empty")
    one_error(cli("search", "--index", idx), 2, "query is empty")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    one_error(cli("search", "--image", bad, "--index", idx), 2, "cannot read image")
    one_error(cli("search", "--image", tmp_path / "x.jpg", "--index", idx), 2, "no such file")
    one_error(cli("search", "cat", "--index", idx, "-r", tmp_path / "nope"), 3, "rewriter")
    one_error(cli("search", "cat", "--index", idx, "--backend", "x"), 2, "backend")
    with pytest.raises(InputError):
        search("", idx)
    with pytest.raises(IndexNotFound):
        Searcher(tmp_path / "none")


def test_long_query_warns_that_the_retriever_truncates(corpus, caplog):
    idx, _ = corpus
    with caplog.at_level(logging.WARNING, logger="grape"):
        result = search("a very long query " * 30, idx, k=1)
    assert "reads only the first 77" in caplog.text and len(result.hits) == 1


def test_result_round_trips_to_json(corpus):
    idx, _ = corpus
    d = search("a cat", idx, k=2).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert SearchResult(**{**d, "hits": []}).query == "a cat"
