"""grape's ANN index (grape_cli.ann): built by `grape index` past `--ann-threshold` and not
below, used by `grape search` (full and cold paths alike, and saying so), `--exact`
gives brute force, recall against exact is high, ranks keep the tie rule, and a missing,
stale or damaged index falls back to exact search."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pytest

from grape_cli import ann
from grape_cli.index import index_folders
from grape_cli.quick import quick_search
from grape_cli.ranking import rank_positions
from grape_cli.search import Searcher, search
from grape_cli.store import ANN_POINTER, SEARCH_CACHE, Store, image_schema, path_id

from .conftest import write_images

N_SYNTHETIC = 5_000
QUERIES = ["a red star", "a dog on the beach", "夕阳下的猫", "something else entirely"]


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors from a mixture of Gaussian clusters (uniform noise is too easy)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def add_rows(idx, vectors: np.ndarray, prefix: str = "/synthetic/img") -> list[str]:
    """Rows straight into the images table, under a folder `grape index` never walks (so
    its runs keep them), as if indexed earlier. Returns their paths."""
    store = Store.open(idx)
    paths = [f"{prefix}_{i:05d}.jpg" for i in range(len(vectors))]
    store._drop_snapshot()  # as every Store write does
    store.images.add(
        pa.table(
            {
                "id": [path_id(p) for p in paths],
                "path": paths,
                "root": ["/synthetic"] * len(paths),
                "size": pa.array(np.full(len(paths), 1), pa.int64()),
                "mtime_ns": pa.array(np.full(len(paths), 1), pa.int64()),
                "hash": [f"s{prefix}{i}" for i in range(len(paths))],
                "width": pa.array(np.full(len(paths), 8), pa.int32()),
                "height": pa.array(np.full(len(paths), 8), pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1)), vectors.shape[1]
                ),
            },
            schema=image_schema(vectors.shape[1]),
        )
    )
    return paths


@pytest.fixture(scope="module")
def big(tmp_path_factory, tiny_clip):
    """An index of 12 photos plus 5,000 synthetic rows, with an ANN index (threshold 1,000)."""
    root = tmp_path_factory.mktemp("ann")
    write_images(root / "photos", 12)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    add_rows(root / "index", clustered(N_SYNTHETIC, Store.open(root / "index").dim))
    summary = index_folders([root / "photos"], root / "index", workers=0, ann_threshold=1_000)
    assert summary.ann["state"] == "built", summary.ann
    return root


@pytest.fixture
def copy(big, tmp_path):
    """A private copy of `big`, free to damage."""
    shutil.copytree(big / "index", tmp_path / "index")
    return tmp_path / "index"


def pointer(idx) -> dict:
    return json.loads((idx / SEARCH_CACHE / ANN_POINTER).read_text())


def random_queries(dim: int, n: int = 200, seed: int = 5) -> np.ndarray:
    """Half near the data, half anywhere: queries from both sides of the lists' borders."""
    near = clustered(n // 2, dim, seed=0)[: n // 2] + 0.3 * clustered(n // 2, dim, seed=seed)
    anywhere = np.random.default_rng(seed).standard_normal((n - n // 2, dim))
    q = np.concatenate([near, anywhere]).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# --------------------------------------------------------------------------- building


def test_threshold_and_lists_by_size():
    assert ann.threshold({}) == ann.DEFAULT_THRESHOLD == 1_000_000
    assert ann.threshold({"ann_threshold": 5}) == 5
    assert ann.threshold({"ann_threshold": "5"}) == ann.DEFAULT_THRESHOLD  # not a number
    assert [ann.plan_nlist(n) for n in (10, 5_000, 100_000, 1_000_000)] == [1, 64, 256, 1024]


def test_built_past_the_threshold_and_not_below(tmp_path, tiny_clip, cli):
    photos = tmp_path / "photos"
    write_images(photos, 12)
    idx = tmp_path / "index"
    r = cli("index", photos, "--index", idx, "--model", tiny_clip, "--ann-threshold", 13, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ann"]["state"] == "off"  # 12 images < 13
    assert not (idx / SEARCH_CACHE / ANN_POINTER).exists()
    assert Store.read_manifest(idx)["ann_threshold"] == 13  # kept for later runs
    assert search("a red star", idx, 3).backend == "faiss"

    r = cli("index", photos, "--index", idx, "--ann-threshold", 12, "--json")  # nothing new
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ann"]["state"] == "built"
    assert (idx / SEARCH_CACHE / pointer(idx)["file"]).is_file()
    r = cli("index", photos, "--index", idx, "--json")  # the kept threshold still holds
    assert json.loads(r.stdout)["ann"]["state"] == "current"
    assert search("a red star", idx, 3).backend == "faiss-ivf"
    r = cli("info", "--index", idx, "--json")
    assert json.loads(r.stdout)["ann"]["kind"] == "IVF1,Flat"

    r = cli("index", photos, "--index", idx, "--ann-threshold", 1000, "--json")  # raised
    assert json.loads(r.stdout)["ann"]["state"] == "off"
    assert not list((idx / SEARCH_CACHE).glob(f"{ann.PREFIX}*"))  # its files removed
    assert search("a red star", idx, 3).backend == "faiss"


def test_any_write_invalidates_it_and_grape_index_rebuilds(copy, big):
    Store.open(copy).delete_ids(["no-such-id"])  # any Store write, even one that removes nothing
    assert not (copy / SEARCH_CACHE / ANN_POINTER).exists()
    assert Searcher(copy).backend == "faiss"
    summary = index_folders([big / "photos"], copy, workers=0)
    assert summary.ann["state"] == "built"
    assert Searcher(copy).backend == "faiss-ivf"


# --------------------------------------------------------------------------- searching


def test_search_uses_it_and_exact_forces_brute_force(big, cli):
    idx = big / "index"
    approx, exact = Searcher(idx), Searcher(idx, exact=True)
    assert (approx.backend, approx.exact) == ("faiss-ivf", False)
    assert (exact.backend, exact.exact) == ("faiss", True)
    for query in QUERIES:
        a, e = approx.search(query, 10), exact.search(query, 10)
        assert (a.backend, a.exact, e.backend, e.exact) == ("faiss-ivf", False, "faiss", True)
        # what the ANN index returns carries exact cosines: never above the true ones
        assert a.hits[0].score <= e.hits[0].score + 1e-5
    for args, backend in (((), "faiss-ivf"), (("--exact",), "numpy")):  # cold path first
        r = cli("search", "a red star", "--index", idx, "-k", "5", "--json", *args)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert (out["backend"], out["exact"]) == (backend, backend == "numpy")
        want = search("a red star", idx, 5, exact=True)
        if args:
            assert [h["path"] for h in out["hits"]] == [h.path for h in want.hits]
    table, exact_table = (
        cli("search", "a red star", "--index", idx, *a) for a in ((), ("--exact",))
    )
    assert "approximate search" in table.stdout  # the table says so too
    assert "approximate" not in exact_table.stdout


def test_recall_against_exact_is_high(big):
    idx = big / "index"
    approx, exact = Searcher(idx), Searcher(idx, exact=True)
    queries = random_queries(approx.store.dim)
    a_scores, a_rows = approx.search_vectors(queries, 10)
    _, e_rows = exact.search_vectors(queries, 10)
    assert approx._paths == exact._paths  # the same rows, in the same order
    recall = ann.recall_at_k(a_rows, e_rows)
    assert recall >= 0.95, recall
    _, matrix = Store.open(idx).load_matrix()
    found = np.einsum("qd,qkd->qk", queries, matrix[a_rows])
    np.testing.assert_allclose(a_scores, found, atol=1e-5)  # exact cosines of what it found


def test_cold_path_answers_as_the_full_path_does(big):
    idx = big / "index"
    full, full_exact = Searcher(idx), Searcher(idx, exact=True)
    for query in QUERIES:
        for k in (1, 10, 30):
            fast, want = quick_search(query, idx, k), full.search(query, k)
            assert (fast.backend, fast.exact) == ("faiss-ivf", False)
            assert [h.path for h in fast.hits] == [h.path for h in want.hits]
            assert [h.rank for h in fast.hits] == [h.rank for h in want.hits]
            np.testing.assert_allclose(
                [h.score for h in fast.hits], [h.score for h in want.hits], atol=1e-4
            )
            fast = quick_search(query, idx, k, exact=True)
            assert (fast.backend, fast.exact) == ("numpy", True)
            want = full_exact.search(query, k)
            assert [h.path for h in fast.hits] == [h.path for h in want.hits]


def test_ranks_keep_the_tie_rule(copy, big, tiny_clip):
    from grape_cli.models import load_clip

    clip = load_clip(str(tiny_clip), "cpu")
    vec = clip.encode_texts(["a red star"]).numpy()[0]
    add_rows(copy, np.repeat(vec[None], 3, axis=0), prefix="/synthetic/twin")  # 3 exact ties
    index_folders([big / "photos"], copy, workers=0)
    result = search("a red star", copy, 6)
    assert result.backend == "faiss-ivf"
    assert [h.path.split("/")[-1].startswith("twin") for h in result.hits[:3]] == [True] * 3
    ranks = [h.rank for h in result.hits]
    assert ranks[:3] == [3, 3, 3]  # a target tied with two others ranks third
    assert ranks == rank_positions([h.score for h in result.hits])
    assert [h.rank for h in quick_search("a red star", copy, 6).hits] == ranks


# --------------------------------------------------------------------------- falling back


def _file(idx):
    return idx / SEARCH_CACHE / pointer(idx)["file"]


def _edit_pointer(idx, **changes):
    (idx / SEARCH_CACHE / ANN_POINTER).write_text(json.dumps({**pointer(idx), **changes}))


DAMAGE = {
    "missing pointer": lambda idx: (idx / SEARCH_CACHE / ANN_POINTER).unlink(),
    "garbage pointer": lambda idx: (idx / SEARCH_CACHE / ANN_POINTER).write_text("{not json"),
    "missing file": lambda idx: _file(idx).unlink(),
    "truncated file": lambda idx: _file(idx).write_bytes(_file(idx).read_bytes()[:-4096]),
    "garbage file": lambda idx: _file(idx).write_bytes(b"\1" * _file(idx).stat().st_size),
    "stale (another table version)": lambda idx: _edit_pointer(idx, table_version="0" * 24),
    "rows in another order": lambda idx: _edit_pointer(idx, rows_digest="0" * 32),
    "table changed behind grape's back": lambda idx: Store.open(idx).images.delete(
        "path = '/synthetic/img_00007.jpg'"
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_missing_stale_or_damaged_falls_back_to_exact(copy, damage, caplog):
    want = search("a red star", copy, 10, exact=True)
    DAMAGE[damage](copy)
    if damage == "table changed behind grape's back":
        want = search("a red star", copy, 10, exact=True)
    with caplog.at_level(logging.DEBUG, logger="grape"):
        full, fast = search("a red star", copy, 10), quick_search("a red star", copy, 10)
    assert (full.backend, full.exact) == ("faiss", True)
    assert [h.path for h in full.hits] == [h.path for h in want.hits]
    if fast is not None:  # the cold path answers exactly, or leaves it to the full path
        assert (fast.backend, fast.exact) == ("numpy", True)
        assert [h.path for h in fast.hits] == [h.path for h in want.hits]
    if damage not in ("missing pointer", "table changed behind grape's back"):
        assert "ANN index not used" in caplog.text  # silent, but said at debug level
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_impossible_answer_switches_to_exact(big, monkeypatch, caplog):
    idx = big / "index"
    searcher = Searcher(idx)
    assert searcher.backend == "faiss-ivf"
    count = searcher.size

    def broken(queries, k):
        rows = np.full((len(queries), k), count + 5, dtype=np.int64)  # no such row
        return np.zeros((len(queries), k), np.float32), rows

    monkeypatch.setattr(
        searcher._ann, "_index", type("Broken", (), {"search": staticmethod(broken)})()
    )
    with caplog.at_level(logging.DEBUG, logger="grape"):
        result = searcher.search("a red star", 5)
    assert (result.backend, result.exact) == ("faiss", True)
    assert [h.path for h in result.hits] == [
        h.path for h in search("a red star", idx, 5, exact=True).hits
    ]
    assert "outside the table" in caplog.text


def test_a_lancedb_index_keeps_auto_on_lance_and_exact_bypasses_it(tmp_path, tiny_clip):
    import lancedb

    photos = tmp_path / "photos"
    write_images(photos, 4)
    idx = tmp_path / "index"
    index_folders([photos], idx, str(tiny_clip), workers=0)
    add_rows(idx, clustered(600, Store.open(idx).dim))
    Store.open(idx).images.create_index(
        "vector",
        config=lancedb.index.IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4),
    )
    summary = index_folders([photos], idx, workers=0, ann_threshold=10)
    assert summary.ann["state"] == "lance"  # the table's own index; grape builds none
    assert not (idx / SEARCH_CACHE / ANN_POINTER).exists()
    auto, exact, flat = Searcher(idx), Searcher(idx, exact=True), Searcher(idx, backend="faiss")
    assert (auto.backend, auto.exact, exact.backend, exact.exact) == ("lance", False, "lance", True)
    assert (flat.backend, flat.exact) == ("faiss", True)
    queries = random_queries(auto.store.dim, 20)
    _, want = flat.search_vectors(queries, 10)
    _, got = exact.search_vectors(queries, 10)  # LanceDB's flat scan: brute force
    assert [[exact._paths[i] for i in r] for r in got] == [
        [flat._paths[i] for i in r] for r in want
    ]


def test_grape_serve_answers_from_it_and_exact_searches_locally(copy, cli, monkeypatch):
    from grape_cli.serve import GrapeServer, Service

    service = Service(copy)
    assert service.health()["backend"] == "faiss-ivf"
    want = Searcher(copy).search("a red star", 5)
    got = service.search("a red star", 5)
    assert (got["backend"], got["exact"]) == ("faiss-ivf", False)
    assert [h["path"] for h in got["hits"]] == [h.path for h in want.hits]
    server = GrapeServer(service, "127.0.0.1", 0, advertise=True).start()
    try:
        calls = []
        original = Service.search
        monkeypatch.setattr(
            Service, "search", lambda self, *a, **kw: calls.append(a) or original(self, *a, **kw)
        )
        for args, asked in (((), 1), (("--exact",), 1)):  # --exact: not the server's answer
            r = cli("search", "a red star", "--index", copy, "-k", "5", "--json", *args)
            assert r.exit_code == 0, r.output
            assert json.loads(r.stdout)["exact"] is bool(args) and len(calls) == asked
    finally:
        server.stop()
