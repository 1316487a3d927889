"""`grape serve` over a real uvicorn server on 127.0.0.1: the JSON API, images by row id
only (traversal, absolute paths, symlinks out of the roots: 404), errors as JSON, the
token and localhost guards, pairs from concurrent clicks, `grape pairs`, and `grape search`
using a running server (same output) or falling back when it is stale.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grape_cli.errors import InputError, UsageError
from grape_cli.feedback import append_pair, pairs_file, pairs_info
from grape_cli.index import index_folders
from grape_cli.models import canonical_clip_spec
from grape_cli.pairs import load_pairs
from grape_cli.remote import ServerInfo, find_server, read_state, state_file, write_state
from grape_cli.search import Searcher
from grape_cli.serve import GrapeServer, Service, resolve_token
from grape_cli.store import Store, path_id

SECRET = b"TOP-SECRET-CONTENT-42"


def blob_images(folder: Path, n: int, seed: int) -> list[Path]:
    """Smooth colour blobs (thumbnails that look like something); one has a Chinese name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
        name = "夕阳下的猫.jpg" if i == 5 else f"photo_{i:02d}.jpg"
        paths.append(folder / name)
        Image.fromarray(base).resize((96, 64), Image.Resampling.BICUBIC).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip):
    """(index folder, image paths): 24 images indexed with the tiny CLIP."""
    root = tmp_path_factory.mktemp("serve")
    paths = blob_images(root / "photos", 24, seed=3)
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    return root / "index", [str(p) for p in paths]


@pytest.fixture(scope="module")
def service(corpus, tiny_lm):
    idx, _ = corpus
    return Service(idx, [str(tiny_lm)])


@contextmanager
def running(service, token=None, advertise=False):
    """A second server of the module's index is not advertised in its serve.json."""
    server = GrapeServer(service, "127.0.0.1", 0, token=token, advertise=advertise).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(service):
    with running(service, advertise=True) as s:
        yield s


def request(server, path: str, method="GET", body=None, headers=None):
    """(status, headers, parsed JSON or raw bytes); the path is sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        heads = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    if heads.get("content-type", "").startswith("application/json"):
        return resp.status, heads, json.loads(data.decode("utf-8"))
    return resp.status, heads, data


def search_api(server, **params):
    status, _, data = request(server, "/api/search?" + urllib.parse.urlencode(params))
    assert status == 200, data
    return data


def post_pair(server, body: dict, headers=None):
    return request(
        server,
        "/api/pairs",
        "POST",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


# --------------------------------------------------------------------------- API


def test_health_and_rewriters(server, corpus, tiny_lm):
    idx, paths = corpus
    status, heads, health = request(server, "/api/health")
    assert status == 200 and heads["content-type"] == "application/json; charset=utf-8"
    assert health["index"] == str(idx.resolve()) and health["images"] == len(paths)
    assert health["model"] == Searcher(idx).store.model and health["rewriters"][0] == "none"
    assert health["pairs_file"] == str(idx.resolve() / "pairs.jsonl")
    status, heads, page = request(server, "/")
    assert status == 200 and heads["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'unsafe-inline'" in heads["content-security-policy"]
    assert "unsafe-eval" not in heads["content-security-policy"]
    assert b"http" not in page.replace(b"http-equiv", b"")  # no CDN, nothing fetched outside
    _, _, listed = request(server, "/api/rewriters")
    names = [r["name"] for r in listed["rewriters"]]
    assert names == ["none", str(tiny_lm)] and listed["default"] == str(tiny_lm)
    assert listed["rewriters"][1] == {
        "name": str(tiny_lm),
        "label": Path(tiny_lm).name,
        "path": str(Path(tiny_lm).resolve()),
    }


def test_search_api_equals_a_local_search(server, corpus, tiny_lm):
    idx, _ = corpus
    local = Searcher(idx)
    for query in ("a red circle on the left", "夕阳下的猫 在沙发上"):
        got = search_api(server, q=query, k=7, rewriter="none")
        want = local.search(query, 7)
        assert got["query"] == query and got["rewrites"] == [query]
        assert [h["path"] for h in got["hits"]] == [h.path for h in want.hits]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want.hits])
        assert [h["id"] for h in got["hits"]] == [path_id(h.path) for h in want.hits]
        assert set(got["timings"]) == {"rewrite", "encode", "search"}  # loading paid once
    # the tiny LM rewriter: what it wrote is what was searched
    got = search_api(server, q="a dog on the beach", k=5, rewriter=str(tiny_lm))
    assert got["rewriter"] == str(tiny_lm) and len(got["rewrites"]) == 1
    again = local.search(got["rewrites"][0], 5)
    assert [h["path"] for h in got["hits"]] == [h.path for h in again.hits]
    # the default rewriter is the one given on the command line
    assert search_api(server, q="a dog on the beach", k=5)["rewriter"] == str(tiny_lm)


def test_image_query_and_composed_query_by_row_id(server, corpus):
    idx, paths = corpus
    local = Searcher(idx)
    alone = search_api(server, image_id=path_id(paths[7]), k=3, rewriter="none")
    assert alone["hits"][0]["path"] == paths[7] and alone["hits"][0]["score"] == pytest.approx(1)
    assert alone["rewrites"] == [] and alone["image_id"] == path_id(paths[7])
    composed = search_api(
        server, q="but at night", image_id=path_id(paths[7]), image_weight=0.5, k=5, rewriter="none"
    )
    want = local.search("but at night", 5, image=paths[7], image_weight=0.5)
    assert [h["path"] for h in composed["hits"]] == [h.path for h in want.hits]
    assert composed["image_weight"] == 0.5


def test_images_by_row_id_thumbnail_and_file(server, corpus):
    _, paths = corpus
    for path in (paths[2], paths[5]):  # paths[5] has a Chinese file name
        status, heads, data = request(server, f"/api/image/{path_id(path)}")
        assert status == 200 and heads["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(data))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        status, _, data = request(server, f"/api/image/{path_id(path)}?full=1")
        assert status == 200 and data == Path(path).read_bytes()
    status, _, data = request(server, f"/api/image/{path_id(paths[2])}?size=32")
    assert status == 200 and max(Image.open(io.BytesIO(data)).size) == 32


TRAVERSALS = [
    "/api/image/..",
    "/api/image/../../../../etc/passwd",
    "/api/image/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/api/image/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/image/%2e%2e",
    "/api/image/%252e%252e%252fetc%252fpasswd",
    "/api/image/%2fetc%2fpasswd",
    "/api/image//etc/passwd",
    "/api/image/etc/passwd",
    "/api/image/%00",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../etc/passwd",
]


def test_traversal_absolute_paths_and_unknown_ids_answer_404(server, corpus, tmp_path):
    _, paths = corpus
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    real_id = path_id(paths[0])
    tries = [
        *TRAVERSALS,
        f"/api/image/{urllib.parse.quote(str(secret), safe='')}",  # an absolute path
        f"/api/image/{urllib.parse.quote('../' * 8 + str(secret)[1:], safe='')}",
        f"/api/image/{path_id(str(secret))}",  # a well-formed id that is no row
        f"/api/image/{path_id('/etc/passwd')}?full=1",
        f"/api/image/{real_id.upper()}",  # ids are exact
        f"/api/image/{real_id}%2f..%2f..",
        f"/api/image/{real_id}/../../etc/passwd",
        f"/api/image/{real_id[:-1]}",
    ]
    for path in tries:
        status, heads, data = request(server, path)
        assert status == 404, path
        assert heads["content-type"] == "application/json; charset=utf-8", path
        assert set(data) == {"error", "hint"}, path
        assert SECRET.decode() not in json.dumps(data) and "root:" not in json.dumps(data)
    # a user path in the query string is not a way in either
    status, heads, data = request(server, f"/api/image/{real_id}?path={secret}&full=1")
    assert status == 200 and data == Path(paths[0]).read_bytes()


def test_symlinks_out_of_the_roots_answer_404(photos, tmp_path, tiny_clip):
    """An indexed file that is (or becomes) a symlink to a file outside the index's roots
    is never served, not even as a thumbnail; a link that stays inside is."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(secret)
    (photos / "link_out.png").symlink_to(secret)  # indexed as a row under the root
    inside_target = photos / "img_001.jpg"
    (photos / "link_in.jpg").symlink_to(inside_target)
    index_folders([photos], tmp_path / "idx", str(tiny_clip), workers=0)
    victim = photos / "img_002.jpg"  # swapped for a link after indexing
    victim.unlink()
    victim.symlink_to(secret)
    (photos / "nested").rename(tmp_path / "moved-out")  # a folder of rows, now elsewhere
    (photos / "nested").symlink_to(tmp_path / "moved-out")
    service = Service(tmp_path / "idx")
    with running(service) as server:
        denied = [photos / "link_out.png", victim, photos / "nested/deeper/deep_000.png"]
        for path in denied:
            row = path_id(str(path))
            assert service.row_path(row) == str(path)  # it is a row of the index...
            for query in ("", "?full=1", "?size=64"):
                status, _, data = request(server, f"/api/image/{row}{query}")
                assert status == 404 and data["error"] == "no such image in this index"
            # ...and not a way to read the file as a query image either
            status, _, _ = request(server, f"/api/search?image_id={row}&rewriter=none")
            assert status == 404
        status, _, data = request(server, f"/api/image/{path_id(str(photos / 'link_in.jpg'))}")
        assert status == 200 and Image.open(io.BytesIO(data)).format == "JPEG"
        status, _, data = request(server, f"/api/image/{path_id(str(inside_target))}?full=1")
        assert status == 200 and data == inside_target.read_bytes()


def test_bad_requests_answer_4xx_json(server, corpus):
    _, paths = corpus
    cases = [
        ("/api/search", 400, "query is empty"),
        ("/api/search?q=%20%20", 400, "query is empty"),
        ("/api/search?q=cat&k=0", 400, "k=0"),
        ("/api/search?q=cat&k=abc", 400, "not a whole number"),
        ("/api/search?q=cat&k=100000", 400, "1 to 1000"),
        ("/api/search?q=cat&rewriter=gpt-9", 400, "unknown rewriter"),
        ("/api/search?q=cat&image_id=zz", 404, "no such image"),
        (f"/api/search?q=cat&image_id={path_id(paths[1])}&image_weight=nan", 400, "finite"),
        ("/api/search?q=" + "x" * 5000, 400, "characters long"),
        ("/api/image/abc?size=5000", 404, "no such image"),
        (f"/api/image/{path_id(paths[1])}?size=5000", 400, "16 to 1024"),
        ("/api/nothing", 404, "not found"),
        ("/favicon.ico", 404, "not found"),
    ]
    for path, code, text in cases:
        status, heads, data = request(server, path)
        assert status == code and text in data["error"], (path, data)
        assert heads["content-type"].startswith("application/json")
    status, _, data = request(server, "/api/search?q=cat&rewriter=gpt-9")
    assert "none" in data["hint"]  # says which rewriters there are
    status, _, data = request(server, "/api/search?q=cat", method="POST")
    assert status == 405 and data["error"] == "method not allowed"
    status, _, data = request(
        server, "/api/pairs", "POST", b'{"query": "x"}', {"Content-Type": "text/plain"}
    )
    assert status == 415 and "JSON" in data["error"]
    for body in (b"{not json", b"[1, 2]", "\u00ff".encode("latin-1")):
        status, _, data = request(
            server, "/api/pairs", "POST", body, {"Content-Type": "application/json"}
        )
        assert status == 400 and data["hint"], body
    status, _, data = post_pair(server, {"query": "cat", "target_id": "nope"})
    assert status == 404
    status, _, data = post_pair(server, {"query": "  ", "target_id": path_id(paths[0])})
    assert status == 400 and "text query" in data["error"]
    status, _, data = request(
        server,
        "/api/pairs",
        "POST",
        b"{}" + b" " * (70 * 1024),
        {"Content-Type": "application/json"},
    )
    assert status == 413


def test_unexpected_errors_are_500_without_internals(service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /very/private/path")

    monkeypatch.setattr(service.searchers["none"], "search", broken)
    with running(service) as server:
        status, heads, data = request(server, "/api/search?q=cat&rewriter=none")
    assert status == 500 and heads["content-type"].startswith("application/json")
    assert data == {"error": "internal server error", "hint": "see the server's log"}


# --------------------------------------------------------------------------- guards


def test_localhost_guard_and_cross_site_posts(server, corpus):
    _, paths = corpus
    for host in ("evil.example", "evil.example:8765", "10.0.0.1"):
        status, _, data = request(server, "/api/health", headers={"Host": host})
        assert status == 403 and "localhost" in data["error"]  # DNS rebinding
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert request(server, "/api/health", headers={"Host": host})[0] == 200
    status, _, data = post_pair(
        server,
        {"query": "x", "target_id": path_id(paths[0])},
        {"Origin": "http://evil.example"},
    )
    assert status == 403 and "cross-site" in data["error"]


def test_token_is_required_when_set(service, corpus):
    _, paths = corpus
    token = "t" * 20 + "-secret"
    with running(service, token=token) as server:
        row = path_id(paths[0])
        for path in ("/", "/api/health", f"/api/image/{row}", "/api/search?q=cat"):
            for headers in ({}, {"Authorization": "Bearer wrong-token-123456"}):
                status, _, data = request(server, path, headers=headers)
                assert status == 401 and "token" in data["error"] and data["hint"], path
        assert request(server, "/api/health?token=nope")[0] == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert request(server, "/api/health", headers=ok)[0] == 200
        assert request(server, "/api/health", headers={"X-Grape-Token": token})[0] == 200
        # the page's URL carries it once; the server turns it into an HttpOnly cookie
        status, heads, page = request(server, f"/?token={token}")
        assert status == 200 and b"<title>grape</title>" in page
        cookie = heads["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        assert request(server, f"/api/image/{row}", headers=jar)[0] == 200


def test_off_loopback_a_token_is_generated_and_printed_once(cli, monkeypatch, tmp_path, tiny_clip):
    assert resolve_token("127.0.0.1", None) == (None, False)
    assert resolve_token("::1", None) == (None, False)
    token, generated = resolve_token("0.0.0.0", None)
    assert generated and len(token) >= 30
    assert resolve_token("192.168.1.5", "x" * 16) == ("x" * 16, False)
    with pytest.raises(UsageError):
        resolve_token("0.0.0.0", "short")

    seen = {}

    class FakeServer:  # binding 0.0.0.0 is not for tests: check what the CLI asks for
        def __init__(self, service, host, port, token, **kwargs):
            seen.update(host=host, token=token)
            self.port, self.url = 8765, "http://0.0.0.0:8765"
            self.info = ServerInfo(pid=1, host=host, port=8765, index="x")

        def serve_forever(self):
            pass

    class FakeService:
        def __init__(self, *args, **kwargs):
            self.root, self.size, self.rewriters = Path("/idx"), 3, []
            self.store = type("S", (), {"model": "m"})()

    monkeypatch.setattr("grape_cli.serve.GrapeServer", FakeServer)
    monkeypatch.setattr("grape_cli.serve.Service", FakeService)
    monkeypatch.setattr("grape_cli.serve.bind", lambda host, port: None)
    idx = tmp_path / "idx"
    Store.open_for_write(idx, canonical_clip_spec(str(tiny_clip)), 32)
    r = cli("serve", "--index", idx, "--host", "0.0.0.0")
    assert r.exit_code == 0, r.output
    assert seen["host"] == "0.0.0.0" and len(seen["token"]) >= 30
    assert r.stdout.count(seen["token"]) == 2  # the URL and the one line that names it
    assert f"?token={seen['token']}" in r.stdout and "printed only now" in r.stdout
    r = cli("serve", "--index", idx, "--host", "0.0.0.0", "--token", "abc")
    assert r.exit_code == 2 and "too short" in r.stderr
    r = cli("serve", "--index", idx, "--token", "y" * 24)
    assert r.exit_code == 0 and "y" * 24 not in r.stdout and seen["token"] == "y" * 24


# --------------------------------------------------------------------------- pairs


def test_this_is_the_one_appends_pairs_train_can_read(server, corpus):
    idx, paths = corpus
    pf = pairs_file(idx.resolve())
    before = pf.read_text(encoding="utf-8").splitlines() if pf.exists() else []
    status, _, out = post_pair(server, {"query": "夕阳下的猫", "target_id": path_id(paths[5])})
    assert status == 200 and out["path"] == str(pf) and out["pairs"] == len(before) + 1
    body = {"query": "but red", "target_id": path_id(paths[3]), "image_id": path_id(paths[4])}
    assert post_pair(server, body)[0] == 200
    lines = pf.read_text(encoding="utf-8").splitlines()[len(before) :]
    assert [json.loads(x) for x in lines] == [
        {"query": "夕阳下的猫", "target": paths[5]},
        {"query": "but red", "target": paths[3], "image": paths[4]},
    ]
    assert "夕阳下的猫" in lines[0]  # UTF-8, not \\u escapes
    pairs = load_pairs(pf)
    assert pairs[-2].query.text == "夕阳下的猫" and pairs[-2].targets == (paths[5],)
    assert pairs[-1].query.image == str(paths[4]) and pairs[-1].query.composed
    assert request(server, "/api/health")[2]["pairs"] == len(before) + 2


def test_concurrent_posts_never_corrupt_the_pairs_file(server, corpus):
    idx, paths = corpus
    pf = pairs_file(idx.resolve())
    before = len(pf.read_bytes().splitlines()) if pf.exists() else 0
    barrier = threading.Barrier(50)
    statuses = []

    def click(i):
        barrier.wait()
        body = {"query": f"query {i} " + "长" * (i * 40), "target_id": path_id(paths[i % 24])}
        statuses.append(post_pair(server, body)[0])

    threads = [threading.Thread(target=click, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 50
    lines = pf.read_bytes().splitlines()
    assert len(lines) == before + 50
    new = [json.loads(line.decode("utf-8")) for line in lines[before:]]
    assert sorted(int(r["query"].split()[1]) for r in new) == list(range(50))
    for r in new:
        i = int(r["query"].split()[1])
        assert r["query"] == (f"query {i} " + "长" * (i * 40)).strip()
        assert r["target"] == paths[i % 24]
    assert len(load_pairs(pf)) == before + 50


def test_append_pair_directly(tmp_path):
    pf = pairs_file(tmp_path)
    pf.write_text('{"query": "by hand", "target": "/a.jpg"}', encoding="utf-8")  # no newline
    assert append_pair(tmp_path, " cat ", "/b.jpg") == 2
    assert [p.query.text for p in load_pairs(pf)] == ["by hand", "cat"]
    with pytest.raises(InputError, match="text query"):
        append_pair(tmp_path, "", "/b.jpg")
    with pytest.raises(InputError, match="Unicode"):
        append_pair(tmp_path, "bad \ud800", "/b.jpg")
    assert pf.read_text(encoding="utf-8").count("\n") == 2


def test_grape_pairs_command(cli, corpus, tmp_path, tiny_clip):
    idx, paths = corpus
    n = pairs_info(idx).pairs
    append_pair(idx, "a cat", paths[0], paths[1])
    r = cli("pairs", "--index", idx, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["pairs"] == n + 1 and out["path"] == str(idx.resolve() / "pairs.jsonl")
    assert out["with_image"] >= 1 and out["exists"]
    r = cli("pairs", "--index", idx)
    assert f"{n + 1} pair(s)" in r.stdout and "pairs.jsonl" in r.stdout
    empty = tmp_path / "empty-index"
    Store.open_for_write(empty, canonical_clip_spec(str(tiny_clip)), 32)
    r = cli("pairs", "--index", empty, "--json")
    assert json.loads(r.stdout)["pairs"] == 0
    r = cli("pairs", "--index", tmp_path / "nowhere")
    assert r.exit_code == 4 and "no grape index" in r.stderr


# --------------------------------------------------------------------------- grape search


def test_grape_search_uses_the_server_and_prints_the_same(server, corpus, cli, monkeypatch):
    idx, paths = corpus
    info = read_state(idx)
    assert info is not None and info.port == server.port and info.pid == os.getpid()
    assert find_server(idx) is not None
    calls = []
    original = Service.search

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Service, "search", counted)
    cases = [
        ("a red circle", "-k", "5"),
        ("夕阳下的猫", "-k", "4", "--json"),
        ("--image", paths[9], "-k", "3"),
        ("but at night", "--image", paths[9], "--image-weight", "0.3", "--json"),
    ]
    for args in cases:
        warm = cli("search", *args, "--index", idx)
        n = len(calls)
        with monkeypatch.context() as m:
            m.setenv("GRAPE_NO_SERVER", "1")
            cold = cli("search", *args, "--index", idx)
        assert len(calls) == n  # the local search did not ask the server
        assert warm.exit_code == cold.exit_code == 0, warm.output + cold.output
        if "--json" in args:
            w, c = json.loads(warm.stdout), json.loads(cold.stdout)
            assert "server_request" in w.pop("timings") and c.pop("timings")
            # Where the vectors were scanned (faiss, or the cold path's numpy) may differ.
            assert {w.pop("backend"), c.pop("backend")} <= {"faiss", "numpy"}
            _same(w, c)
        else:
            assert warm.stdout == cold.stdout
    assert len(calls) == len(cases)
    # options the server does not support: answered locally
    for extra in (["--rewrites", "2"], ["--seed", "1"], ["--backend", "faiss"]):
        assert cli("search", "cat", "--index", idx, *extra).exit_code == 0
    outside = Path(paths[0]).parent.parent / "not-indexed.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(outside)
    assert cli("search", "--image", outside, "--index", idx).exit_code == 0
    assert len(calls) == len(cases) + 1  # the unindexed image: asked, 404, then local


def _same(a, b) -> bool:
    """Equal, with floats compared to 1e-6."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6)
        return True
    assert a == b
    return True


def test_grape_search_with_the_servers_rewriter_prints_the_same(
    server, corpus, cli, tiny_lm, monkeypatch
):
    idx, _ = corpus
    args = ("search", "a dog on the beach", "-r", tiny_lm, "-k", "4", "--index", idx)
    warm = cli(*args)
    monkeypatch.setenv("GRAPE_NO_SERVER", "1")
    cold = cli(*args)
    assert warm.exit_code == cold.exit_code == 0 and warm.stdout == cold.stdout
    assert f"rewrite ({tiny_lm.name})" in warm.stdout


def test_stale_server_files_are_ignored(tmp_path, corpus, cli):
    idx, _ = corpus
    copy = tmp_path / "index"
    import shutil

    shutil.copytree(idx, copy, ignore=shutil.ignore_patterns("serve.json", "pairs.jsonl"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(ServerInfo(pid=dead.pid, host="127.0.0.1", port=1, index=str(copy.resolve())))
    assert find_server(copy) is None  # a dead pid
    mute = socket.socket()  # alive and listening, but never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(1)
    try:
        port = mute.getsockname()[1]
        write_state(ServerInfo(pid=os.getpid(), host="127.0.0.1", port=port, index=str(copy)))
        start = time.perf_counter()
        assert find_server(copy) is None
        assert time.perf_counter() - start < 1.0
        r = cli("search", "a red circle", "--index", copy, "-k", "2", "--json")
        assert r.exit_code == 0 and len(json.loads(r.stdout)["hits"]) == 2  # local search
    finally:
        mute.close()
    state_file(copy).write_text("{not json")
    assert find_server(copy) is None


def test_a_server_older_than_the_index_is_not_used(tmp_path, corpus, cli, monkeypatch):
    """After a `grape index` run the server's vectors are stale: `grape search` answers
    locally (the same output as always), and /api/health says so for the page."""
    idx, _ = corpus
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(idx, copy, ignore=shutil.ignore_patterns("serve.json", "pairs.jsonl"))
    with running(Service(copy), advertise=True) as server:
        calls = []
        original = Service.search
        monkeypatch.setattr(
            Service, "search", lambda self, *a, **kw: calls.append(a) or original(self, *a, **kw)
        )
        args = ("search", "a red circle", "--index", copy, "-k", "3")
        assert cli(*args).exit_code == 0 and len(calls) == 1
        assert request(server, "/api/health")[2]["index_changed"] is False
        Store.open(copy).write_manifest(updated="2099-01-01T00:00:00+0000")  # as grape index
        assert request(server, "/api/health")[2]["index_changed"] is True
        r = cli(*args)
        assert r.exit_code == 0 and len(calls) == 1 and "a red circle" in r.stdout


def test_serve_command_end_to_end(corpus, tmp_path, cli):
    """`grape serve` as a process: it writes serve.json, answers, refuses a second server
    on the same index, and removes the file when stopped by Ctrl-C or SIGTERM."""
    idx, _ = corpus
    copy = tmp_path / "index"
    import shutil

    shutil.copytree(idx, copy, ignore=shutil.ignore_patterns("serve.json", "pairs.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            [sys.executable, "-m", "grape_cli", "serve", "--index", str(copy), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            deadline = time.time() + 120
            while find_server(copy, timeout=1.0) is None:
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline, "grape serve did not start"
                time.sleep(0.2)
            info = read_state(copy)
            assert info.pid == proc.pid and oct(state_file(copy).stat().st_mode)[-3:] == "600"
            r = cli("serve", "--index", copy, "--port", "0")
            assert r.exit_code == 2 and "already running" in r.stderr
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{info.port}" in out and "24 images" in out
        assert "stopped" in err and "Traceback" not in err
        assert not state_file(copy).exists()


def test_serve_help_explains(cli):
    r = cli("serve", "--help")
    assert r.exit_code == 0
    for word in ("--host", "--port", "--rewriter", "--token", '"this is the one"', "/api/search"):
        assert word in r.stdout
    assert cli("pairs", "--help").exit_code == 0


def test_port_in_use_is_one_line_error_before_loading(cli, tmp_path, tiny_clip, monkeypatch):
    Store.open_for_write(tmp_path / "idx", canonical_clip_spec(str(tiny_clip)), 32)
    monkeypatch.setattr("grape_cli.serve.Service", None)  # never reached
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = cli("serve", "--index", tmp_path / "idx", "--port", busy.getsockname()[1])
    finally:
        busy.close()
    assert r.exit_code == 2 and "already in use" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 2
