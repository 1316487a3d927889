"""`grape eval`: pairs files (JSONL, CSV, TSV) and their bad lines, targets missing from
the index, metrics checked against independent implementations, and the side-by-side
report of several rewriters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from grape_cli.errors import InputError
from grape_cli.evaluate import evaluate, evaluate_rewriter
from grape_cli.index import index_folders
from grape_cli.models import load_clip
from grape_cli.pairs import Pair, load_pairs, match_targets, read_pairs
from grape_cli.query import Query
from grape_cli.ranking import (
    fused_target_ranks,
    reciprocal_rank_fusion,
    retrieval_metrics,
    target_ranks,
)
from grape_cli.store import Store


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------- pairs


def test_jsonl_pairs_resolve_paths_relative_to_the_file(tmp_path):
    p = write(
        tmp_path / "data" / "pairs.jsonl",
        '{"query": "a cat", "target": "photos/cat.jpg"}\n'
        "\n"
        '{"query": " 两只狗 ", "targets": ["dog1.jpg", "/abs/dog2.jpg"]}\n',
    )
    assert load_pairs(p) == [
        Pair(Query("a cat"), (str(tmp_path / "data" / "photos" / "cat.jpg"),), 1),
        Pair(Query("两只狗"), (str(tmp_path / "data" / "dog1.jpg"), "/abs/dog2.jpg"), 3),
    ]


def test_csv_and_tsv_pairs(tmp_path):
    csv = write(
        tmp_path / "pairs.csv",
        'query,target\n"a cat, sleeping",cat.jpg\n\n"two\nlines",b.jpg\ndog,dog.jpg\n',
    )
    pairs = load_pairs(csv)
    assert [(p.query.text, p.line) for p in pairs] == [
        ("a cat, sleeping", 2),
        ("two\nlines", 4),
        ("dog", 6),
    ]
    assert pairs[0].targets == (str(tmp_path / "cat.jpg"),)
    tsv = write(tmp_path / "pairs.tsv", "Query\tTargets\ncat\ta.jpg|sub/b.jpg\n")
    assert load_pairs(tsv)[0].targets == (str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.jpg"))
    sniffed = write(tmp_path / "pairs.txt", "query\ttarget\ncat\ta.jpg\n")  # no known suffix
    assert load_pairs(sniffed)[0].query.text == "cat"


@pytest.mark.parametrize(
    ("name", "text", "where", "what"),
    [
        ("p.jsonl", '{"query": "a", "target": "x"}\n{"query": "b", target}\n', ":2", "not valid"),
        ("p.jsonl", '{"query": "a", "target": "x"}\n\n["a", "x"]\n', ":3", "JSON object"),
        ("p.jsonl", '{"target": "x"}\n', ":1", "'query'"),
        ("p.jsonl", '{"query": "", "target": "x"}\n', ":1", "'query'"),
        ("p.jsonl", '{"query": "a"}\n', ":1", "exactly one"),
        ("p.jsonl", '{"query": "a", "target": "x", "targets": ["y"]}\n', ":1", "exactly one"),
        ("p.jsonl", '{"query": "a", "targets": []}\n', ":1", "'targets' is an empty list"),
        ("p.jsonl", '{"query": 123, "target": "x"}\n', ":1", "'query' must be text, not a number"),
        ("p.jsonl", '{"query": "a", "target": "x", "image": "nope.png"}\n', ":1", "no such file"),
        ("p.jsonl", '{"query": "a", "target": 3}\n', ":1", "non-empty list"),
        ("p.csv", "query,path\na,x\n", ":1", "'target'"),
        ("p.csv", "query,target\na,x\nb,y,z\n", ":3", "3 fields"),
        ("p.csv", "query,target\na,x\n,y\n", ":3", "'query'"),
    ],
)
def test_malformed_line_is_reported_with_its_number(tmp_path, name, text, where, what):
    p = write(tmp_path / name, text)
    with pytest.raises(InputError) as err:
        load_pairs(p)
    assert f"{p}{where}:" in err.value.message and what in err.value.message


def test_a_byte_that_is_not_utf8_is_reported_by_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"query": "a", "target": "x"}\n{"query": "caf\xe9", "target": "y"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        load_pairs(p)


def test_duplicate_pairs_are_counted_once_and_reported(tmp_path, caplog):
    line = '{"query": "a cat", "target": "cat.jpg"}\n'
    p = write(tmp_path / "p.jsonl", line + '{"query": "dog", "target": "d.jpg"}\n' + line * 2)
    read = read_pairs(p)
    assert [x.line for x in read.pairs] == [1, 2]
    assert read.duplicates == {3: 1, 4: 1}
    assert "2 line(s) repeat an earlier pair" in caplog.text


def test_composed_pairs_carry_their_reference_image(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ref.png")  # checked: it must be an image
    p = write(tmp_path / "p.jsonl", '{"query": "but red", "image": "ref.png", "target": "t.jpg"}\n')
    (pair,) = load_pairs(p)
    assert pair.query == Query("but red", image=str(tmp_path / "ref.png"))
    assert pair.query.composed
    csv = write(tmp_path / "p.csv", "query,image,target\nbut red,ref.png,t.jpg\nplain,,u.jpg\n")
    assert [x.query.image for x in load_pairs(csv)] == [str(tmp_path / "ref.png"), None]


def test_empty_or_missing_pairs_file(tmp_path):
    for text in ("", "\n  \n"):
        with pytest.raises(InputError, match="is empty"):
            load_pairs(write(tmp_path / "e.jsonl", text))
    with pytest.raises(InputError, match="has no pairs"):
        load_pairs(write(tmp_path / "h.csv", "query,target\n\n"))
    with pytest.raises(InputError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")


def test_match_targets_lists_missing_and_honours_strict(tmp_path):
    real = tmp_path / "photos"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    index_paths = [str(real / f"{i}.jpg") for i in range(4)]
    pairs = [
        Pair("a", (str(real / "2.jpg"),), 1),
        Pair("b", (str(real / "9.jpg"), str(real / "0.jpg")), 2),  # one of two indexed
        Pair("c", (str(real / "8.jpg"),), 3),  # none indexed: left out
        Pair("d", (str(tmp_path / "link" / "3.jpg"),), 4),  # found through the link
    ]
    matched, missing = match_targets(pairs, index_paths)
    assert [(p.line, rows) for p, rows in matched] == [(1, [2]), (2, [0]), (4, [3])]
    assert missing == [str(real / "9.jpg"), str(real / "8.jpg")]
    with pytest.raises(InputError, match=r"2 target\(s\) are not in the index: .*9\.jpg"):
        match_targets(pairs, index_paths, strict=True)


# --------------------------------------------------------------------------- metrics


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ranks_and_recall_match_an_argsort_reference():
    rng = np.random.default_rng(0)
    corpus, queries = _unit(rng, 300), _unit(rng, 40)
    targets = [list(rng.choice(300, size=rng.integers(1, 4), replace=False)) for _ in range(40)]
    ranks = target_ranks(queries, corpus, targets)
    order = np.argsort(-(queries @ corpus.T), axis=1)  # independent: position in a full sort
    want = [1 + min(int(np.where(order[i] == t)[0][0]) for t in ts) for i, ts in enumerate(targets)]
    assert ranks.tolist() == want
    metrics = retrieval_metrics(ranks, ks=(1, 5, 10, 50))
    for k in (1, 5, 10, 50):
        hits = [bool(set(order[i, :k]) & set(ts)) for i, ts in enumerate(targets)]
        assert metrics[f"recall@{k}"] == pytest.approx(np.mean(hits))
    assert metrics["mrr"] == pytest.approx(np.mean([1 / r for r in want]))
    assert metrics["median_rank"] == np.median(want) and metrics["n"] == 40


def test_recall_matches_clip_benchmark():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    rng = np.random.default_rng(1)
    corpus, queries = _unit(rng, 200), _unit(rng, 30)
    targets = [list(rng.choice(200, size=rng.integers(1, 3), replace=False)) for _ in range(30)]
    positives = torch.zeros(30, 200, dtype=torch.bool)
    for i, ts in enumerate(targets):
        positives[i, ts] = True
    scores = torch.from_numpy(queries @ corpus.T)
    metrics = retrieval_metrics(target_ranks(queries, corpus, targets), ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        # clip_benchmark's own reduction: a text counts if any positive is in its top k
        theirs = (zr.recall_at_k(scores, positives, k) > 0).float().mean().item()
        assert metrics[f"recall@{k}"] == pytest.approx(theirs)


def test_ties_count_against_the_target():
    rng = np.random.default_rng(2)
    corpus = _unit(rng, 50)
    corpus[10] = corpus[3]  # a duplicate of the target scores exactly the same
    q = corpus[3:4] + 0.01
    assert target_ranks(q, corpus, [[3]])[0] == target_ranks(q, corpus, [[10]])[0] == 2
    assert target_ranks(q, corpus, [[3, 10]])[0] == 1  # both right: no tie against itself
    queries = _unit(rng, 9)
    targets = [[i] for i in range(9)]
    with pytest.raises(ValueError):
        target_ranks(queries, corpus, targets[:3])


def test_fused_ranks_match_rrf_over_full_rankings():
    rng = np.random.default_rng(3)
    corpus = _unit(rng, 120)
    groups = [_unit(rng, 2) for _ in range(15)]
    targets = [[int(rng.integers(120))] for _ in range(15)]
    got = fused_target_ranks(groups, corpus, targets)
    for i, (vecs, ts) in enumerate(zip(groups, targets, strict=True)):
        lists = [np.argsort(-(v @ corpus.T), kind="stable").tolist() for v in vecs]
        fused = dict(reciprocal_rank_fusion(lists))
        assert got[i] == 1 + sum(s > fused[ts[0]] for s in fused.values())
    # one vector per query: fusion changes nothing
    single = [g[:1] for g in groups]
    assert (
        fused_target_ranks(single, corpus, targets)
        == target_ranks(np.concatenate(single), corpus, targets)
    ).all()


def test_metrics_of_nothing():
    assert retrieval_metrics(np.array([]))["n"] == 0
    assert retrieval_metrics(np.array([]))["recall@1"] is None


# --------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(4)
    (root / "photos").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            root / "photos" / f"p{i:02d}.png"
        )
    index_folders([root / "photos"], root / "index", str(tiny_clip), workers=0)
    return root


QUERIES = ["a red circle", "two dogs on a beach", "我的猫", "a long rambling query " * 2 + "end"]
CAPTIONS = {q: f"caption {i}" for i, q in enumerate(QUERIES)}


def pairs_file(root):
    records = [{"query": q, "target": f"photos/p{3 * i:02d}.png"} for i, q in enumerate(QUERIES)]
    records[1] = {"query": QUERIES[1], "targets": ["photos/p05.png", "photos/p07.png"]}
    records.append({"query": "gone", "target": "photos/deleted.png"})
    return jsonl(root / "pairs.jsonl", records)


class Captioner:
    name = "captioner"
    fallbacks = 0

    def rewrite(self, queries, n=1, temperature=None):
        return [[CAPTIONS[q.text]] for q in queries]


def reference_ranks(root, clip, texts, targets):
    meta, corpus = Store.open(root / "index").load_matrix(("path",))
    rows = [[meta["path"].index(str(root / "photos" / t)) for t in ts] for ts in targets]
    scores = clip.encode_texts(texts).numpy() @ corpus.T
    return [int(1 + (s > s[r].max()).sum()) for s, r in zip(scores, rows, strict=True)]


def test_evaluate_side_by_side_with_the_baseline(corpus, tiny_clip, monkeypatch, tmp_path):
    import grape_cli.rewrite

    real = grape_cli.rewrite.load_rewriter
    monkeypatch.setattr(
        grape_cli.rewrite,
        "load_rewriter",
        lambda spec, **kw: Captioner() if spec == "captioner" else real(spec, **kw),
    )
    per_query = tmp_path / "per-query.jsonl"
    report = evaluate(pairs_file(corpus), corpus / "index", ["captioner"], per_query_path=per_query)
    assert [r.rewriter for r in report.rows] == ["none", "captioner"]  # baseline first
    assert (report.n_pairs, report.n_evaluated) == (5, 4)
    assert report.missing == [str(corpus / "photos" / "deleted.png")]
    assert report.skipped_lines == [5]

    clip = load_clip(str(tiny_clip), "cpu")
    targets = [["p00.png"], ["p05.png", "p07.png"], ["p06.png"], ["p09.png"]]
    want_none = reference_ranks(corpus, clip, QUERIES, targets)
    want_cap = reference_ranks(corpus, clip, [CAPTIONS[q] for q in QUERIES], targets)
    assert report.rows[0].metrics == retrieval_metrics(np.array(want_none))
    assert report.rows[1].metrics == retrieval_metrics(np.array(want_cap))
    delta = report.deltas(report.rows[1])
    assert delta["mrr"] == pytest.approx(
        np.mean([1 / r for r in want_cap]) - np.mean([1 / r for r in want_none])
    )
    assert report.to_dict()["rows"][1]["delta_vs_none"] == delta
    assert all(r.rewrite_ms_per_query >= 0 for r in report.rows)

    lines = [json.loads(x) for x in per_query.read_text(encoding="utf-8").splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5]
    assert lines[2]["rewrites"] == {"none": ["我的猫"], "captioner": ["caption 2"]}
    assert lines[2]["rank"] == {"none": want_none[2], "captioner": want_cap[2]}
    assert lines[4]["skipped"] == "no target in the index"


class TwoCaptions:
    name = "two"

    def rewrite(self, queries, n=1, temperature=None):
        return [[CAPTIONS[q], q.upper()][:n] for q in queries]


def test_several_rewrites_per_query_are_fused(corpus, tiny_clip):
    _, matrix = Store.open(corpus / "index").load_matrix(("path",))
    clip = load_clip(str(tiny_clip), "cpu")
    targets = [[0], [4, 5], [9], [2]]
    row, texts, ranks = evaluate_rewriter(
        TwoCaptions(), clip, QUERIES, matrix, targets, rewrites=2, batch_size=3
    )
    assert texts == [[CAPTIONS[q], q.upper()] for q in QUERIES] and row.rewrites_per_query == 2
    groups = [clip.encode_texts(t).numpy() for t in texts]
    assert ranks.tolist() == fused_target_ranks(groups, matrix, targets).tolist()
    assert row.metrics == retrieval_metrics(ranks)


def test_eval_cli_table_json_and_lm_rewriter(corpus, tiny_lm, cli):
    pairs = pairs_file(corpus)
    r = cli("eval", pairs, "--index", corpus / "index", "-r", tiny_lm, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [row["rewriter"] for row in out["rows"]] == ["none", str(tiny_lm)]
    assert set(out["rows"][1]["delta_vs_none"]) == {
        "recall@1",
        "recall@5",
        "recall@10",
        "mrr",
        "median_rank",
    }
    assert "1 target(s) not in the index" in r.stderr and "deleted.png" in r.stderr

    r = cli("eval", pairs, "--index", corpus / "index")
    assert r.exit_code == 0, r.output
    for column in ("R@1", "R@5", "R@10", "MRR", "median rank", "rewrite ms/q"):
        assert column in r.stdout
    assert "4 of 5 pairs" in r.stdout


def test_eval_bad_input_is_one_clear_error(corpus, tmp_path, cli):
    idx = corpus / "index"
    r = cli("eval", pairs_file(corpus), "--index", idx, "--strict")
    assert r.exit_code == 2 and "1 target(s) are not in the index" in r.stderr
    r = cli("eval", write(tmp_path / "e.jsonl", ""), "--index", idx)
    assert r.exit_code == 2 and "is empty" in r.stderr
    bad = write(tmp_path / "b.jsonl", '{"query": "a", "target": "x"}\n{oops}\n')
    r = cli("eval", bad, "--index", idx)
    assert r.exit_code == 2 and f"{bad}:2:" in r.stderr
    lost = jsonl(tmp_path / "lost.jsonl", [{"query": "a", "target": "nowhere.png"}])
    r = cli("eval", lost, "--index", idx)
    assert r.exit_code == 2 and "none of the 1 pairs" in r.stderr
    r = cli("eval", pairs_file(corpus), "--index", tmp_path / "no-index")
    assert r.exit_code == 4 and "no grape index" in r.stderr
