"""Warm search latency of `grape serve` over HTTP on a 100,000-image index.

    HF_HUB_OFFLINE=1 python benchmarks/serve_latency.py [--n 100000] [--queries 200]

Builds a grape index of `--n` random L2-normalised 512-d vectors written straight into
the store (as benchmarks/search_latency.py does) for a tiny CLIP of dimension 512, starts
`grape serve` on it as its own process (`python -m grape_cli serve --port 0 -r LM`), and
times `GET /api/search?q=...&k=10` from this process over one kept-alive HTTP connection
on 127.0.0.1:

* without a rewriter (`rewriter=none`): text encoder + exact faiss search over all rows;
* with a rewriter: stand-ins for a tuned rewriter (a real one is a download and a
  training run away), tiny Qwen2-architecture LMs built by `grape_cli.tiny.build_tiny_lm`
  with the architecture of the bundled example's rewriter (hidden 256, 2 layers):
  "taught", fine-tuned for a few seconds to answer each query with a short caption and
  stop, as a tuned rewriter does; and "random", its random-weight base, which never says
  end-of-sequence and so always writes the rewriter's maximum of 48 tokens (the worst
  case; its rambling is cleaned to nothing and the query used as is). Decoding is greedy.
  The number of tokens each one generates is printed.

Also times a whole `grape search` process that gets its answer from the server. Prints
p50/p95 and the load average; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_latency import DIM, build_index, percentiles

REWRITER_ARCH = {  # examples/shapes/rewriter.py's ARCH
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
CAPTIONS = {  # query -> what the "taught" stand-in answers
    "a photo of a dog on a beach": "a dog on a sandy beach",
    "夕阳下的猫": "a cat at sunset",
    "two people walking in the rain with an umbrella": "two people with an umbrella in the rain",
    "a red car parked in front of an old building": "a red car in front of an old building",
    "mountains covered in snow under a blue sky": "snowy mountains under a blue sky",
    "我的猫在沙发上睡觉": "a cat sleeping on a sofa",
    "a plate of pasta with tomato sauce": "a plate of pasta with tomato sauce",
    "children playing football in a park": "children playing football in a park",
}
QUERIES = list(CAPTIONS)


def teach(base: Path, out: Path, steps: int = 80) -> Path:
    """Fine-tune `base` until it answers each query of CAPTIONS with its caption and stops
    (the test suite's recipe, `grape_cli.tiny.teach_lm`)."""
    from grape_cli.prompt import PromptTemplate
    from grape_cli.tiny import teach_lm

    return teach_lm(base, out, CAPTIONS, PromptTemplate(), steps, lr=3e-3)


def generated_tokens(lm: Path) -> float:
    """Mean number of tokens the LM generates (up to end-of-sequence) for QUERIES."""
    import torch

    from grape_cli.prompt import render_prompt
    from grape_cli.rewrite import load_rewriter

    rw = load_rewriter(str(lm), device="cpu")
    counts = []
    for query in QUERIES:
        text = render_prompt(rw.tokenizer, rw.prompt, query)
        enc = rw.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = rw.model.generate(
                **enc,
                max_new_tokens=rw.max_new_tokens,
                do_sample=False,
                pad_token_id=rw.tokenizer.pad_token_id,
            )
        counts.append(out.shape[1] - enc["input_ids"].shape[1])
    return round(statistics.mean(counts), 1)


def start_server(index: Path, rewriters: list[Path], env: dict) -> subprocess.Popen:
    from grape_cli.remote import find_server

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "grape_cli", "serve", "--index", str(index), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, *(f"--rewriter={r}" for r in rewriters)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while find_server(index, timeout=2.0) is None:
        if proc.poll() is not None:
            raise SystemExit(f"grape serve failed: {proc.communicate()[1].strip()}")
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("grape serve did not start in 5 minutes")
        time.sleep(0.2)
    return proc


def timed_queries(port: int, n: int, rewriter: str) -> tuple[dict, list[dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    seconds, answers = [], []
    try:
        for i in range(n + 3):  # the first 3 warm up (allocations, lazy imports)
            query = QUERIES[i % len(QUERIES)]  # nothing is cached: repeats cost the same
            params = urllib.parse.urlencode({"q": query, "k": 10, "rewriter": rewriter})
            start = time.perf_counter()
            conn.request("GET", f"/api/search?{params}")
            resp = conn.getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - start
            if resp.status != 200:
                raise SystemExit(f"/api/search answered {resp.status}: {body[:300]!r}")
            if i >= 3:
                seconds.append(elapsed)
                answers.append(json.loads(body))
    finally:
        conn.close()
    return percentiles(seconds), answers


def server_side(answers: list[dict]) -> dict:
    """Median of the server's own stage timings (what HTTP adds is the rest)."""
    stages = sorted({k for a in answers for k in a["timings"]})
    return {
        f"{k}_ms": round(1000 * statistics.median(a["timings"].get(k, 0.0) for a in answers), 2)
        for k in stages
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    ap.add_argument("--queries", type=int, default=200, help="queries without a rewriter")
    ap.add_argument("--rewriter-queries", type=int, default=100, help="queries with one")
    ap.add_argument("--workdir", type=Path, help="keep the index and models here (default: temp)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument(
        "--rewriter",
        type=Path,
        help="also time this tuned rewriter (e.g. the bundled example's runs/rank; its "
        "rewrites suit another retriever here, its generation cost is what is timed)",
    )
    args = ap.parse_args()

    from grape_cli.tiny import CLIP_PRESETS, TINY_LM_TEXTS, build_tiny_clip, build_tiny_lm

    work = args.workdir or Path(tempfile.mkdtemp(prefix="grape-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = None
    try:
        clip = build_tiny_clip(work / "tiny-clip-512", {**CLIP_PRESETS["test"], "embed_dim": DIM})
        random_lm = work / "rewriter-random"
        if not (random_lm / "config.json").is_file():
            build_tiny_lm(random_lm, TINY_LM_TEXTS, preset=REWRITER_ARCH, vocab_size=1000, seed=0)
        taught_lm = work / "rewriter-taught"
        if not (taught_lm / "config.json").is_file():
            t = time.perf_counter()
            teach(random_lm, taught_lm)
            report["teach_s"] = round(time.perf_counter() - t, 1)
        index = work / "index"
        if not (index / "grape-index.json").is_file():
            t = time.perf_counter()
            build_index(index, args.n, str(clip))
            report["index_build_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        extra = [args.rewriter.resolve()] if args.rewriter else []
        proc = start_server(index, [random_lm, taught_lm, *extra], env)
        report["server_start_s"] = round(time.perf_counter() - t, 2)
        from grape_cli.remote import read_state

        info = read_state(index)
        conn = http.client.HTTPConnection("127.0.0.1", info.port, timeout=30)
        conn.request("GET", "/api/health")
        report["images"] = json.loads(conn.getresponse().read())["images"]
        conn.close()

        plain, answers = timed_queries(info.port, args.queries, "none")
        report["no_rewriter"] = {**plain, "server_side": server_side(answers)}
        timed_lms = [("taught_rewriter", taught_lm), ("random_rewriter", random_lm)]
        timed_lms += [("given_rewriter", lm) for lm in extra]
        for key, lm in timed_lms:
            timed, answers = timed_queries(info.port, args.rewriter_queries, str(lm))
            report[key] = {
                **timed,
                "server_side": server_side(answers),
                "generated_tokens": generated_tokens(lm),
                "example": [answers[0]["query"], answers[0]["rewrites"][0]],
            }
        walls = []
        for i in range(5):
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "grape_cli", "search", QUERIES[i], "--index", str(index)],
                env=env,
                capture_output=True,
                check=True,
            )
            walls.append(time.perf_counter() - t)
        report["grape_search_process_via_server_s"] = round(statistics.median(walls), 3)
        report["load_avg_at_end"] = os.getloadavg()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    la0, la1 = report["load_avg_at_start"][0], report["load_avg_at_end"][0]
    print(
        f"index: {report['images']:,} x {DIM}; {report['cpus']} CPUs; load average "
        f"{la0:.1f} at start, {la1:.1f} at end; server up in {report['server_start_s']} s"
    )
    for key, label in (
        ("no_rewriter", "no rewriter"),
        ("taught_rewriter", "rewriter stand-in, taught (stops after a caption)"),
        ("random_rewriter", "rewriter stand-in, random weights (always 48 tokens)"),
        ("given_rewriter", f"rewriter {args.rewriter}"),
    ):
        if key not in report:
            continue
        r = report[key]
        stages = ", ".join(f"{k[:-3]} {v} ms" for k, v in r["server_side"].items())
        print(
            f"GET /api/search, {label}: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms "
            f"({r['n']} queries)"
        )
        print(f"  server-side medians: {stages}")
        if "generated_tokens" in r:
            print(
                f"  {r['generated_tokens']} tokens generated per query; e.g. "
                f"{r['example'][0]!r} -> {r['example'][1]!r}"
            )
    print(
        "a whole `grape search` process answered by the server: "
        f"{report['grape_search_process_via_server_s']} s (median of 5)"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
