"""Search latency on a 100,000-image index: warm per-query time and cold process time.

    HF_HUB_OFFLINE=1 python benchmarks/search_latency.py [--n 100000] [--queries 200]
    HF_HUB_OFFLINE=1 python benchmarks/search_latency.py --mode cold [--n 10000] [--runs 7]

Builds a real grape index (LanceDB, via grape_cli.store) of random L2-normalised
512-d vectors, then measures

* warm: per-query time of one exact search (faiss IndexFlatIP, k=10) over all vectors,
  p50/p95 over `--queries` random queries; also a full warm text query (tiny CLIP text
  encoder + search), and faiss with every thread on one query, for comparison;
* cold: wall time of a fresh `grape search ... --json` process, with a tiny CLIP of
  dimension 512 and with ViT-B-32 (random weights), broken down into the stages grape
  reports (import, index open, model load, index load, encode, search) plus the rest
  (interpreter start-up, CLI import, output). These indexes are written straight through
  the Store, without the search cache `grape index` leaves: this is the full path.

`--mode cold` compares a cold `grape search "a red star" --rewriter none` before and
after the search cache (grape_cli.quick) on a ViT-B-32 index (random weights saved as a
local open_clip folder, so every process loads the same ones): the full path (the cache
moved aside) and the fast path, run alternately, median of `--runs` processes each, with
the stages (process start and CLI imports, other imports, tokenizer, text encoder, vector
load, search, output) and a check that both give the same top-k (cosines within 1e-4).

No network: both models are built locally. Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


# --------------------------------------------------------------------------- --mode cold

QUERY = "a red star"
REPO = Path(__file__).resolve().parents[1]
# What each path's stages are summed into for the breakdown; the rest of the wall time
# is process start-up and the CLI's own imports (Python, typer, rich, grape_cli).
FULL_PATH = {
    "imports (torch, open_clip, lancedb, faiss)": IMPORTS,
    "index open": ("index_open",),
    "model load (whole CLIP)": ("model_load",),
    "vector load (LanceDB -> faiss)": ("index_load",),
    "tokenize + text encode": ("encode",),
    "search": ("search",),
}
FAST_PATH = {
    "imports (numpy, onnxruntime)": ("import_numpy", "import_onnxruntime"),
    "tokenizer (load + tokenize)": ("tokenizer_load", "tokenize"),
    "text encoder (ONNX session + run)": ("model_load", "encode"),
    "vector load (.npy + paths)": ("index_load",),
    "search (numpy)": ("search",),
}


def build_vit_b_32(folder: Path, seed: int = 0) -> Path:
    """ViT-B-32 with seeded random weights, saved as an open_clip local folder."""
    import copy

    import open_clip
    import torch

    from grape_cli.models import save_clip_folder
    from grape_cli.tiny import CLIP_PREPROCESS

    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-32"))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    return save_clip_folder(model, cfg, CLIP_PREPROCESS, folder)


def cold_search(index_dir: Path) -> tuple[float, dict]:
    """One fresh `grape search` process: (wall seconds, its JSON with an `output` stage)."""
    cmd = [sys.executable, "-m", "grape_cli", "search", QUERY, "--index", str(index_dir)]
    cmd += ["-k", "10", "--rewriter", "none", "--json", "--timings"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"grape search failed: {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    # --timings prints "name 12 ms  name 3 ms ..." on stderr, wrapped at the console width
    stages = " ".join(proc.stderr.split())
    result["timings"]["output"] = float(re.search(r"output (\d+) ms", stages)[1]) / 1000
    return wall, result


def summarize(runs: list[tuple[float, dict]], groups: dict[str, tuple[str, ...]]) -> dict:
    """Median wall time and median of each stage group over the runs."""
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    walls = [w for w, _ in runs]
    out = {"wall_s": med(walls), "wall_min_s": round(min(walls), 3), "runs": len(runs)}
    out["backend"] = runs[0][1]["backend"]
    grouped = {**groups, "output (rendering)": ("output",)}
    rest = []
    for wall, r in runs:
        rest.append(wall - sum(r["timings"].get(s, 0.0) for ss in grouped.values() for s in ss))
    out["process start + CLI imports"] = med(rest)
    for name, stages in grouped.items():
        out[name] = med([sum(r["timings"].get(s, 0.0) for s in stages) for _, r in runs])
    return out


def same_top_k(a: dict, b: dict, atol: float = 1e-4) -> dict:
    paths_a, paths_b = [h["path"] for h in a["hits"]], [h["path"] for h in b["hits"]]
    diff = max(abs(x["score"] - y["score"]) for x, y in zip(a["hits"], b["hits"], strict=True))
    return {
        "same_paths_in_order": paths_a == paths_b,
        "max_score_diff": diff,
        "scores_allclose_1e-4": diff <= atol,
        "k": len(paths_a),
    }


def cold_compare(index_dir: Path, runs: int) -> dict:
    """Full path (search cache moved aside) and fast path, alternately, `runs` each."""
    from grape_cli.store import SEARCH_CACHE

    cache, parked = index_dir / SEARCH_CACHE, index_dir / (SEARCH_CACHE + ".parked")
    cold_search(index_dir)  # warms the page cache for both paths' files
    full, fast = [], []
    for _ in range(runs):
        cache.rename(parked)
        try:
            full.append(cold_search(index_dir))
        finally:
            parked.rename(cache)
        fast.append(cold_search(index_dir))
    if {r["backend"] for _, r in full} != {"faiss"} or {r["backend"] for _, r in fast} != {"numpy"}:
        raise SystemExit("a run did not take the path it was meant to")
    return {
        "before_full_path": summarize(full, FULL_PATH),
        "after_fast_path": summarize(fast, FAST_PATH),
        "top_k_check": same_top_k(full[0][1], fast[0][1]),
    }


def main_cold(args, work: Path) -> None:
    from grape_cli.quick import refresh_cache

    report: dict = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    model = build_vit_b_32(work / "vit-b-32-random")
    index_dir = build_index(work / "index-vit-b-32", args.n, str(model))
    t = time.perf_counter()
    refresh_cache(index_dir)  # what the end of `grape index` does
    report["cache_build_s"] = round(time.perf_counter() - t, 1)
    report["python_startup_s"] = process_time(["-c", "pass"], 5)
    report["cli_import_s"] = process_time(["-c", "import grape_cli.cli"], 5)
    report.update(cold_compare(index_dir, args.runs))
    report["load_avg_at_end"] = os.getloadavg()

    print(
        f"cold `grape search {QUERY!r} --rewriter none`, ViT-B-32 (random weights), "
        f"{args.n:,} images, {report['cpus']} CPUs, load average "
        f"{report['load_avg_at_start'][0]:.2f} -> {report['load_avg_at_end'][0]:.2f}"
    )
    print(
        f"python start-up {report['python_startup_s']} s; `import grape_cli.cli` process "
        f"{report['cli_import_s']} s; cache build (vectors + text export) {report['cache_build_s']} s"
    )
    for key, label in (
        ("before_full_path", "before (full path)"),
        ("after_fast_path", "after (fast path)"),
    ):
        c = report[key]
        print(
            f"{label}: median {c['wall_s']} s (min {c['wall_min_s']}, {c['runs']} runs), medians:"
        )
        for name, value in c.items():
            if name not in ("wall_s", "wall_min_s", "runs", "backend"):
                print(f"    {name:<45} {value * 1000:8.0f} ms")
    check = report["top_k_check"]
    print(
        f"top-{check['k']}: same paths in order {check['same_paths_in_order']}, "
        f"max |cosine difference| {check['max_score_diff']:.2g}"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("full", "cold"), default="full")
    ap.add_argument("--n", type=int, help="vectors in the index (100,000; cold mode 10,000)")
    ap.add_argument("--queries", type=int, default=200, help="warm queries")
    ap.add_argument("--runs", type=int, help="cold processes per model or path (2; cold mode 7)")
    ap.add_argument("--workdir", type=Path, help="keep the indexes here (default: temp)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args()
    cold_mode = args.mode == "cold"
    args.n = args.n or (10_000 if cold_mode else 100_000)
    args.runs = args.runs or (7 if cold_mode else 2)

    from grape_cli.tiny import CLIP_PRESETS, build_tiny_clip

    work = args.workdir or Path(tempfile.mkdtemp(prefix="grape-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if cold_mode:
        try:
            return main_cold(args, work)
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
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
