"""Search latency on a 100,000-image index: warm per-query time and cold process time.

    HF_HUB_OFFLINE=1 python benchmarks/search_latency.py [--n 100000] [--queries 200]

Builds a real grape index (LanceDB, via grape_cli.store) of random L2-normalised
512-d vectors, then measures

* warm: per-query time of one exact search (faiss IndexFlatIP, k=10) over all vectors,
  p50/p95 over `--queries` random queries; also a full warm text query (tiny CLIP text
  encoder + search), and faiss with every thread on one query, for comparison;
* cold: wall time of a fresh `grape search ... --json` process, with a tiny CLIP of
  dimension 512 and with ViT-B-32 (random weights), broken down into the stages grape
  reports (import, index open, model load, index load, encode, search) plus the rest
  (interpreter start-up, CLI import, output).

No network: both models are built locally. Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 512
IMPORTS = ("import_torch", "import_open_clip", "import_lancedb", "import_faiss")
STAGES = (*IMPORTS, "index_open", "rewriter_load", "model_load", "index_load", "encode", "search")


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 2),
        "n": len(ms),
    }


def build_index(root: Path, n: int, model: str, seed: int = 0) -> Path:
    """A grape index of n random unit vectors, written through grape's Store."""
    import numpy as np
    import pyarrow as pa

    from grape_cli.store import Store, image_schema, path_id

    rng = np.random.default_rng(seed)
    store = Store.open_for_write(root, model, DIM)
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        vecs = rng.standard_normal((m, DIM), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        paths = [f"/bench/photos/img_{i:06d}.jpg" for i in range(start, start + m)]
        table = pa.Table.from_arrays(
            [
                pa.array([path_id(p) for p in paths]),
                pa.array(paths),
                pa.array(["/bench/photos"] * m),
                pa.array(np.full(m, 100_000), pa.int64()),
                pa.array(np.full(m, 1), pa.int64()),
                pa.array([f"{i:032x}" for i in range(start, start + m)]),
                pa.array(np.full(m, 640), pa.int32()),
                pa.array(np.full(m, 480), pa.int32()),
                pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), DIM),
            ],
            schema=image_schema(DIM),
        )
        store.images.add(table)  # plain appends: the rows are new, no merge needed
    store.compact()
    store.write_manifest(roots=["/bench/photos"])
    return root


def warm(index_dir: Path, n_queries: int, seed: int = 1) -> dict:
    import faiss
    import numpy as np

    from grape_cli.search import Searcher

    searcher = Searcher(index_dir, backend="faiss")
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((n_queries, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def timed(fn, qs) -> list[float]:
        fn(qs[:1])  # first call pays one-off allocation
        out = []
        for q in qs:
            t = time.perf_counter()
            fn(q[None])
            out.append(time.perf_counter() - t)
        return out

    result = {
        "vectors": searcher.size,
        "faiss_threads_available": faiss.omp_get_max_threads(),
        "search": percentiles(timed(lambda q: searcher.search_vectors(q, 10), queries)),
    }
    # every thread on one query: faiss's own default, what grape deliberately avoids
    raw = searcher._index._index
    result["faiss_all_threads"] = percentiles(timed(lambda q: raw.search(q, 10), queries[:50]))
    matrix = np.ascontiguousarray(raw.reconstruct_n(0, raw.ntotal))
    result["numpy_brute_force"] = percentiles(
        timed(lambda q: np.argpartition(-(matrix @ q[0]), 10)[:10], queries[:50])
    )
    texts = [f"a photo of thing number {i}" for i in range(50)]
    full = []
    for text in texts:
        t = time.perf_counter()
        searcher.search(text, 10)
        full.append(time.perf_counter() - t)
    result["text_query_end_to_end"] = percentiles(full[1:])
    return result


def cold(index_dir: Path, runs: int) -> dict:
    """Median over `runs` fresh processes of wall time and grape's own stage timings."""
    cmd = [sys.executable, "-m", "grape_cli", "search", "a photo of a dog on a beach"]
    cmd += ["--index", str(index_dir), "-k", "10", "--json"]
    walls, stages = [], []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - t)
        if proc.returncode:
            raise SystemExit(f"grape search failed: {proc.stderr.strip()}")
        stages.append(json.loads(proc.stdout)["timings"])
    out = {"wall_s": round(statistics.median(walls), 3), "runs": runs}
    for name in STAGES:
        out[f"{name}_s"] = round(statistics.median(s.get(name, 0.0) for s in stages), 3)
    out["import_s"] = round(sum(out[f"{name}_s"] for name in IMPORTS), 3)
    out["startup_and_output_s"] = round(out["wall_s"] - sum(out[f"{name}_s"] for name in STAGES), 3)
    return out


def process_time(args: list[str], runs: int = 3) -> float:
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
    return round(statistics.median(walls), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    ap.add_argument("--queries", type=int, default=200, help="warm queries")
    ap.add_argument("--runs", type=int, default=2, help="cold processes per model")
    ap.add_argument("--workdir", type=Path, help="keep the indexes here (default: temp)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args()

    from grape_cli.tiny import CLIP_PRESETS, build_tiny_clip

    work = args.workdir or Path(tempfile.mkdtemp(prefix="grape-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    try:
        tiny = build_tiny_clip(work / "tiny-clip-512", {**CLIP_PRESETS["test"], "embed_dim": DIM})
        t = time.perf_counter()
        tiny_index = build_index(work / "index-tiny", args.n, str(tiny))
        report["index_build_s"] = round(time.perf_counter() - t, 2)
        vit_index = work / "index-vit"
        shutil.copytree(tiny_index, vit_index, dirs_exist_ok=True)
        manifest = json.loads((vit_index / "grape-index.json").read_text())
        manifest["model"] = "ViT-B-32:random"
        (vit_index / "grape-index.json").write_text(json.dumps(manifest))

        report["warm"] = warm(tiny_index, args.queries)
        report["python_startup_s"] = process_time(["-c", "pass"])
        report["grape_help_s"] = process_time(["-m", "grape_cli", "--help"])
        report["cold_tiny"] = cold(tiny_index, args.runs)
        report["cold_vit_b_32"] = cold(vit_index, args.runs)
        report["load_avg_at_end"] = os.getloadavg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    w = report["warm"]
    print(
        f"index: {w['vectors']:,} x {DIM} (built in {report['index_build_s']} s), "
        f"{report['cpus']} CPUs, load average {report['load_avg_at_start'][0]:.1f}"
    )
    print(
        f"warm search, k=10, one query at a time: p50 {w['search']['p50_ms']} ms, "
        f"p95 {w['search']['p95_ms']} ms ({w['search']['n']} queries)"
    )
    print(
        f"  faiss with all {w['faiss_threads_available']} threads on one query: "
        f"p50 {w['faiss_all_threads']['p50_ms']} ms; numpy brute force: "
        f"p50 {w['numpy_brute_force']['p50_ms']} ms"
    )
    print(
        f"  text query end to end (tiny encoder + search): "
        f"p50 {w['text_query_end_to_end']['p50_ms']} ms"
    )
    print(
        f"python start-up {report['python_startup_s']} s; `grape --help` {report['grape_help_s']} s"
    )
    for key, label in (("cold_tiny", "tiny CLIP"), ("cold_vit_b_32", "ViT-B-32 random")):
        c = report[key]
        parts = ", ".join(f"{n} {c[f'{n}_s']}" for n in STAGES if c[f"{n}_s"] >= 0.0005)
        print(
            f"cold `grape search` ({label}): {c['wall_s']} s = {parts}, "
            f"start-up+output {c['startup_and_output_s']}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
