"""Approximate search at scale: which ANN index grape builds past `--ann-threshold`.

    python benchmarks/ann_search.py [--n 1000000] [--queries 500] [--workdir DIR]
        [--kinds grape,ivf-flat,ivf-sq8,ivf-pq,hnsw,lance] [--hnsw-n 200000] [--out FILE]

The README's table came from four runs on one --workdir (the vectors are generated once):
`--kinds grape,ivf-flat,ivf-sq8,ivf-pq`, `--kinds hnsw --hnsw-n 1000000`, `--kinds lance`
and `--kinds grape` again; about 35 minutes in all on 2 loaded cores.

Data (synthetic, seeded; no network): `--n` unit vectors of dimension 512 drawn from a
two-level mixture, meant to look more like CLIP image embeddings than uniform noise:
`--topics` topic directions, each with its sub-clusters (`--clusters` in all, sizes
log-normal, so some topics are crowded and some rare), every vector sharing one mean
direction (the narrow cone real CLIP embeddings sit in) plus noise with a decaying
spectrum in a random basis (so that neighbourhoods are not round islands one IVF list
holds whole). Queries stand in for text queries: the same sub-cluster centres, another
shared mean direction (CLIP's modality gap) and more noise, so their best cosines are
about 0.45, not 0.9. The script prints the cosine statistics it produced.

For each kind it builds the index, then times single queries (k=10, one at a time, the
way `grape search` asks them) and measures Recall@10 against exact search (faiss
IndexFlatIP over the same vectors) for a sweep of its search parameter:

* `grape`: what `grape index` builds (grape_cli.ann: IVF-Flat, calibrated nprobe), read
  back memory-mapped from disk and searched through grape_cli.ann, as `grape search` does;
* `ivf-flat`, `ivf-sq8`, `ivf-pq`: faiss IVF with full vectors, 8-bit scalar-quantised
  vectors, PQ64 codes (one coarse quantizer trained once, shared by the three);
* `hnsw`: faiss IndexHNSWFlat (M=32, efConstruction 40) on the first `--hnsw-n` vectors
  (default 200,000 to keep a run short: `--hnsw-n 1000000` took over 10 minutes on 2
  loaded cores; recall is measured against exact search over that subset, and the build
  time is also reported per vector);
* `lance`: LanceDB's IVF-PQ (`create_index`, cosine) on a table of the same vectors,
  without and with `refine_factor` (which re-reads full vectors to rescore).

Memory is the index's size as faiss serialises it (what a process holds when it loads
it whole; the file grape memory-maps is the same size, of which a search touches only
the probed lists) or, for LanceDB, the index files on disk. Every run prints the CPU
count and the load average, which move these figures a lot on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512
K = 10
TARGET = 0.95
CHUNK = 50_000


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}]", *args, flush=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- data


class World:
    """The mixture: topic and sub-cluster centres, their weights, a noise spectrum and
    rotation, and the two mean directions."""

    IMAGE_CONE = 0.9  # weight of the mean direction every image shares
    IMAGE_NOISE = 1.5
    TEXT_GAP = 0.9  # weight of the text-side mean direction (another one)
    QUERY_NOISE = 2.0
    TOPIC_SPREAD = 0.5  # sub-cluster centre = topic + this x its own direction
    SPECTRUM = 1.0  # noise variance along the i-th principal direction ~ i ** -SPECTRUM

    def __init__(self, clusters: int, topics: int, dim: int = DIM, seed: int = 0):
        rng = np.random.default_rng(seed)
        topic_dirs = unit(rng.standard_normal((topics, dim)))
        topic_of = rng.integers(0, topics, clusters)
        own = unit(rng.standard_normal((clusters, dim)))
        self.centres = unit(topic_dirs[topic_of] + self.TOPIC_SPREAD * own)
        weights = rng.lognormal(0.0, 1.0, clusters)
        self.weights = weights / weights.sum()
        self.image_mean, self.text_mean = unit(rng.standard_normal((2, dim)))
        # Anisotropic noise (a decaying spectrum in a random basis), as real embeddings
        # have: neighbourhoods are not round islands that one IVF list holds whole.
        spectrum = np.arange(1, dim + 1, dtype=np.float32) ** (-self.SPECTRUM / 2)
        self.spectrum = spectrum / np.sqrt((spectrum**2).sum())
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.dim = dim

    def _draw(self, n: int, seed: int, mean: np.ndarray, noise: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.choice(len(self.centres), n, p=self.weights)
        z = rng.standard_normal((n, self.dim), dtype=np.float32) * self.spectrum
        return unit(self.IMAGE_CONE * mean + self.centres[labels] + noise * (z @ self.rotation))

    def images(self, n: int, seed: int) -> np.ndarray:
        return self._draw(n, seed, self.image_mean, self.IMAGE_NOISE)

    def queries(self, n: int, seed: int) -> np.ndarray:
        return self._draw(n, seed, self.text_mean, self.QUERY_NOISE)


def corpus(work: Path, n: int, clusters: int, topics: int, seed: int = 0) -> np.ndarray:
    """The n vectors as a read-only memory map (generated once per workdir)."""
    path = work / f"corpus-{n}-{clusters}-{topics}-{seed}.npy"
    if not path.exists():
        world = World(clusters, topics, seed=seed)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, DIM))
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            out[start:stop] = world.images(stop - start, seed=seed * 1_000_003 + start)
        out.flush()
        del out
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int = K) -> tuple:
    """(scores, rows) of the exact top k, by faiss IndexFlatIP in chunks of the corpus."""
    import faiss

    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(data), 200_000):
        block = np.ascontiguousarray(data[start : start + 200_000])
        flat = faiss.IndexFlatIP(DIM)
        flat.add(block)
        s, i = flat.search(queries, k)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, i + start], axis=1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(s_all, order, axis=1)
        best_i = np.take_along_axis(i_all, order, axis=1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    """Mean fraction of the exact top k found in the approximate top k."""
    hits = [
        len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits) / k)


def per_query(search, queries: np.ndarray) -> tuple[np.ndarray, dict]:
    """Rows found for each query, asked one at a time, and the latency percentiles."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one thread per query: what `grape search` gets under load
    try:
        search(queries[:1])  # first call pays one-off allocations
        rows, times = [], []
        for q in queries:
            t = time.perf_counter()
            rows.append(search(q[None])[0])
            times.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(before)
    ms = sorted(1000 * t for t in times)
    stats = {
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 3),
    }
    return np.stack([np.pad(r, (0, K - len(r)), constant_values=-1) for r in rows]), stats


def faiss_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


# --------------------------------------------------------------------------- kinds


def sweep(name: str, setter, search, queries, truth, values, extra: dict) -> list[dict]:
    """Recall and latency for each value of a search parameter; stops once recall is ~1."""
    rows = []
    for value in values:
        setter(value)
        found, lat = per_query(search, queries)
        r = recall_at_k(found, truth)
        rows.append({"kind": name, "param": value, "recall@10": round(r, 4), **lat, **extra})
        log(f"{name} {value}: recall@10 {r:.4f}, p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms")
        if r >= 0.999:
            break
    return rows


def ivf_family(data, queries, truth, nlist: int, kinds: list[str], train_n: int) -> list[dict]:
    """IVF-Flat, IVF-SQ8 and IVF-PQ64 on one coarse quantizer (trained once)."""
    import faiss

    rng = np.random.default_rng(7)
    sample = np.ascontiguousarray(data[np.sort(rng.choice(len(data), train_n, replace=False))])
    t = time.perf_counter()
    km = faiss.Clustering(DIM, nlist)
    km.niter, km.spherical, km.max_points_per_centroid = 10, True, 10**9
    quantizer = faiss.IndexFlatIP(DIM)
    km.train(sample, quantizer)
    coarse_s = time.perf_counter() - t
    log(f"coarse quantizer IVF{nlist}: {coarse_s:.1f} s on {train_n:,} vectors")
    factories = {
        "ivf-flat": lambda q: faiss.IndexIVFFlat(q, DIM, nlist, faiss.METRIC_INNER_PRODUCT),
        "ivf-sq8": lambda q: faiss.IndexIVFScalarQuantizer(
            q, DIM, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        ),
        "ivf-pq": lambda q: faiss.IndexIVFPQ(q, DIM, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT),
    }
    t = time.perf_counter()
    assign = np.concatenate(
        [quantizer.search(np.ascontiguousarray(data[i : i + 100_000]), 1)[1].ravel()
         for i in range(0, len(data), 100_000)]
    )  # fmt: skip
    assign_s = time.perf_counter() - t
    log(f"assigned {len(data):,} vectors to lists in {assign_s:.1f} s (shared by the kinds)")
    results = []
    for kind in kinds:
        q = faiss.IndexFlatIP(DIM)
        q.add(quantizer.reconstruct_n(0, nlist))
        index = factories[kind](q)
        t = time.perf_counter()
        index.train(sample)  # the coarse quantizer is trained: only SQ/PQ train here
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        for start in range(0, len(data), 100_000):
            block = np.ascontiguousarray(data[start : start + 100_000])
            ids = np.ascontiguousarray(assign[start : start + len(block)])
            index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(ids))
        add_s = assign_s + time.perf_counter() - t
        build_s = coarse_s + train_s + add_s
        size = faiss_bytes(index)
        log(
            f"{kind} IVF{nlist}: build {build_s:.1f} s (coarse {coarse_s:.1f}, train {train_s:.1f}, add {add_s:.1f}), {size / 2**20:.0f} MiB"
        )
        extra = {"nlist": nlist, "build_s": round(build_s, 1), "memory_mib": round(size / 2**20)}

        def setter(v, index=index):
            index.nprobe = v

        results += sweep(
            f"{kind} IVF{nlist}", setter, lambda x, index=index: index.search(x, K)[1],
            queries, truth, [4, 8, 16, 32, 64, 128, 256], extra,
        )  # fmt: skip
        del index
    return results


def hnsw(data, queries, n: int) -> list[dict]:
    import faiss

    sub = np.ascontiguousarray(data[:n])
    _, truth = exact_top_k(sub, queries)
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    t = time.perf_counter()
    for start in range(0, n, 50_000):
        index.add(sub[start : start + 50_000])
        log(f"hnsw: {min(n, start + 50_000):,} added, {time.perf_counter() - t:.0f} s")
    build_s = time.perf_counter() - t
    size = faiss_bytes(index)
    extra = {
        "n": n,
        "build_s": round(build_s, 1),
        "build_us_per_vector": round(1e6 * build_s / n, 1),
        "memory_mib": round(size / 2**20),
        "bytes_per_vector": round(size / n),
    }

    def setter(v):
        index.hnsw.efSearch = v

    return sweep(
        f"hnsw M32 (n={n:,})", setter, lambda x: index.search(x, K)[1], queries, truth,
        [16, 32, 64, 128, 256], extra,
    )  # fmt: skip


def lance(data, queries, truth, work: Path, partitions: int) -> list[dict]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(work / f"lance-{len(data)}"))
    if not (work / f"lance-{len(data)}" / "v.lance").is_dir():
        t = time.perf_counter()
        table = None
        for start in range(0, len(data), 100_000):
            block = np.ascontiguousarray(data[start : start + 100_000])
            batch = pa.table(
                {
                    "row": pa.array(np.arange(start, start + len(block))),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM),
                }
            )
            table = db.create_table("v", batch) if table is None else table
            if start:
                table.add(batch)
        log(f"lance: wrote {len(data):,} rows in {time.perf_counter() - t:.1f} s")
    table = db.open_table("v")
    t = time.perf_counter()
    if not table.list_indices():
        table.create_index(
            "vector",
            config=lancedb.index.IvfPq(
                distance_type="cosine", num_partitions=partitions, num_sub_vectors=64
            ),
        )
    build_s = time.perf_counter() - t
    size = sum(
        f.stat().st_size
        for f in (work / f"lance-{len(data)}" / "v.lance" / "_indices").rglob("*")
        if f.is_file()
    )
    log(f"lance IVF{partitions}-PQ64: build {build_s:.1f} s, {size / 2**20:.0f} MiB")
    extra = {"nlist": partitions, "build_s": round(build_s, 1), "memory_mib": round(size / 2**20)}
    results = []
    for refine in (None, 10):
        state = {}

        def setter(v, state=state):
            state["nprobes"] = v

        def search(x, state=state, refine=refine):
            query = table.search(x[0]).distance_type("cosine").nprobes(state["nprobes"]).limit(K)
            if refine:
                query = query.refine_factor(refine)
            return [query.select(["row", "_distance"]).to_arrow().column("row").to_numpy()]

        name = f"lance IVF{partitions}-PQ64" + (f" refine {refine}" if refine else "")
        results += sweep(name, setter, search, queries[:200], truth[:200], [10, 20, 40, 80], extra)
    return results


def grape_ann(data, queries, truth, work: Path) -> list[dict]:
    """What `grape index` builds and `grape search` reads (grape_cli.ann), from disk."""
    import resource

    from grape_cli import ann

    t = time.perf_counter()
    built = ann.build(data)
    build_s = time.perf_counter() - t
    path = work / "grape-ann.faiss"
    ann.write_index(built.index, path)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = ann.read_index(path, built.nprobe)
    log(
        f"grape: {built.kind}, nprobe {built.nprobe} (calibrated), build {build_s:.1f} s = {built.timings}"
    )
    found, lat = per_query(lambda x: loaded.search(x, K, threads=1)[1], queries)
    r = recall_at_k(found, truth)
    log(f"grape: recall@10 {r:.4f}, p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms")
    return [
        {
            "kind": f"grape ({built.kind}, memory-mapped)",
            "param": built.nprobe,
            "recall@10": round(r, 4),
            **lat,
            "nlist": built.nlist,
            "build_s": round(build_s, 1),
            "build_stages_s": built.timings,
            "memory_mib": round(path.stat().st_size / 2**20),
            "max_rss_mib_before_search": round(rss / 1024),
        }
    ]


# --------------------------------------------------------------------------- main


def describe(data, queries, truth_scores) -> dict:
    rng = np.random.default_rng(3)
    a = np.asarray(data[np.sort(rng.choice(len(data), 2000, replace=False))])
    pair = float(np.mean(np.sum(a[:1000] * a[1000:], axis=1)))
    return {
        "mean_cos_random_pair": round(pair, 3),
        "mean_query_top1_cos": round(float(truth_scores[:, 0].mean()), 3),
        "mean_query_top10_cos": round(float(truth_scores[:, K - 1].mean()), 3),
        "mean_query_random_cos": round(float((queries @ a.T).mean()), 3),
    }


def exact_latency(data, queries) -> dict:
    """What grape's exact search costs per query (faiss IndexFlatIP, one thread)."""
    import faiss

    flat = faiss.IndexFlatIP(DIM)
    for start in range(0, len(data), 200_000):
        flat.add(np.ascontiguousarray(data[start : start + 200_000]))
    _, lat = per_query(lambda x: flat.search(x, K)[1], queries[:30])
    return {
        "kind": "exact (faiss IndexFlatIP)",
        "recall@10": 1.0,
        **lat,
        "memory_mib": round(faiss_bytes(flat) / 2**20),
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'kind':<44} {'param':>6} {'R@10':>7} {'p50 ms':>8} {'p95 ms':>8} {'build s':>8} {'MiB':>6}"
    )
    for r in rows:
        print(
            f"{r['kind']:<44} {r.get('param', '-')!s:>6} {r['recall@10']:>7.4f} {r['p50_ms']:>8.2f} "
            f"{r['p95_ms']:>8.2f} {r.get('build_s', '-')!s:>8} {r.get('memory_mib', '-')!s:>6}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--topics", type=int, default=64)
    ap.add_argument("--kinds", default="grape,ivf-flat,ivf-sq8,ivf-pq,hnsw,lance")
    ap.add_argument("--nlist", default="1024,4096", help="IVF lists to try (comma-separated)")
    ap.add_argument("--hnsw-n", type=int, default=200_000)
    ap.add_argument("--lance-partitions", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, help="keeps the vectors between runs (default: temp)")
    ap.add_argument("--out", type=Path, help="append the results as JSON lines")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import faiss

    work = args.workdir or Path(tempfile.mkdtemp(prefix="grape-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    kinds = args.kinds.split(",")
    log(f"{os.cpu_count()} CPUs; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    t = time.perf_counter()
    data = corpus(work, args.n, args.clusters, args.topics)
    queries = World(args.clusters, args.topics).queries(args.queries, seed=99)
    log(f"{args.n:,} x {DIM} vectors ready in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    truth_scores, truth = exact_top_k(data, queries)
    log(
        f"exact top-{K} of {args.queries} queries in {time.perf_counter() - t:.1f} s; {describe(data, queries, truth_scores)}"
    )
    rows = [exact_latency(data, queries)]
    log(f"exact: p50 {rows[0]['p50_ms']} ms")
    if "grape" in kinds:
        rows += grape_ann(data, queries, truth, work)
    ivf = [k for k in kinds if k.startswith("ivf-")]
    for nlist in [int(x) for x in args.nlist.split(",")] if ivf else []:
        rows += ivf_family(data, queries, truth, nlist, ivf, min(args.n, 40 * nlist))
    if "hnsw" in kinds:
        rows += hnsw(data, queries, min(args.n, args.hnsw_n))
    if "lance" in kinds:
        rows += lance(data, queries, truth, work, args.lance_partitions)
    print_table(rows)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average now {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.out:
        with open(args.out, "a") as f:
            meta = {
                "n": args.n,
                "cpus": os.cpu_count(),
                "load_avg_end": load,
                **describe(data, queries, truth_scores),
            }
            f.write(json.dumps({"meta": meta, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
