"""Crash loop: SIGKILL a real `grape index` at random moments, re-run it, compare.

Each try starts `python -m grape_cli index` on a fresh index over a few hundred small
images (a tiny random CLIP, small commits so that a run has many), kills the process at a
random moment with SIGKILL, runs the same indexing again without --model (the index must
know its model from the moment it exists), and compares the result with an index built
in one clean run: the same paths, ids, hashes, sizes, failures and allclose vectors, no
duplicate ids, and a third run that finds everything unchanged.

Start-up (imports, model load) takes most of a run's time, so kill moments are drawn
relative to the moment the index folder appears: one try in six is killed during start-up
(no index yet), the others between the folder's appearance and a little after the end of
a calibration run, drawn towards the start (where the commits are), so most land during
the work and a few after the end. The loop stops
after --tries or --max-seconds, whichever comes first.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/crash_loop.py            # 24 tries
    ... --tries 10 --images 200 --max-seconds 120                          # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_photos(folder: Path, n: int, seed: int) -> Path:
    """n small distinct images in a few sub-folders, plus two bad files."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:04d}.{'png' if i % 5 == 0 else 'jpg'}")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a picture\n")
    return folder


def grape_index(folder: Path, idx: Path, model: Path | None, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grape_cli", "index", str(folder), "--index", str(idx)]
    cmd += ["--batch-size", "4", "--commit-every", "4", "--workers", "1", "--json"]
    if model is not None:
        cmd += ["--model", str(model)]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: its decode worker goes with it
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def contents(idx: Path) -> tuple[dict, np.ndarray, dict]:
    """(metadata sorted by path, vectors in that order, failures) of an index."""
    from grape_cli.store import Store

    store = Store.open(idx)
    meta, matrix = store.load_matrix(("id", "path", "hash", "size", "mtime_ns"))
    if len(set(meta["id"])) != len(meta["id"]):
        raise AssertionError("duplicate ids")
    order = np.argsort(meta["path"])
    sorted_meta = {c: [meta[c][i] for i in order] for c in meta}
    failures = {p: f["reason"] for p, f in store.failures().items()}
    return sorted_meta, matrix[order], failures


def same_as(idx: Path, reference) -> str | None:
    """None if `idx` holds exactly the reference's rows, else what differs."""
    meta, vectors, failures = contents(idx)
    ref_meta, ref_vectors, ref_failures = reference
    if meta != ref_meta:
        return f"rows differ ({len(meta['path'])} vs {len(ref_meta['path'])})"
    if not np.allclose(vectors, ref_vectors, atol=1e-5):
        return "vectors differ"
    if failures != ref_failures:
        return f"failures differ ({sorted(failures)} vs {sorted(ref_failures)})"
    return None


def wait_for_folder(proc: subprocess.Popen, idx: Path) -> None:
    while proc.poll() is None and not idx.exists():
        time.sleep(0.002)


def one_try(folder, idx, model, env, after_folder: bool, delay: float, reference) -> dict:
    """Kill a run `delay` s after its start (or after its index folder appeared), re-run
    it, compare; what happened, as a dict."""
    from grape_cli.index import index_folders
    from grape_cli.store import Store

    shutil.rmtree(idx, ignore_errors=True)
    proc = grape_index(folder, idx, model, env)
    if after_folder:
        wait_for_folder(proc, idx)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
    proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    state = "no index" if not idx.exists() else ("index" if Store.exists(idx) else "no manifest")
    rows = None
    if state == "index" and killed:
        try:
            rows = Store.open(idx).count()
        except Exception as e:  # what a reader would say of the index the kill left
            state = f"unreadable ({type(e).__name__})"
    result = {"delay": delay, "killed": killed, "state": state, "rows_at_kill": rows}
    result["phase"] = "work" if after_folder else "start-up"
    if not killed and proc.returncode != 0:
        result["error"] = f"run ended with {proc.returncode}: {stderr.strip()[-300:]}"
        kill_group(proc)
        return result
    try:
        # No --model when the index exists: it must know its model already.
        rerun = index_folders([folder], idx, None if idx.exists() else str(model), workers=1)
        result["rerun_added"] = rerun.added
        result["repaired"] = rerun.repaired
        result["mismatch"] = same_as(idx, reference)
        again = index_folders([folder], idx, workers=1)
        if (again.added, again.updated, again.removed) != (0, 0, 0):
            result["mismatch"] = result["mismatch"] or "third run was not unchanged"
    except Exception as e:  # a crash here is what the loop is looking for
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        kill_group(proc)  # an orphaned decode worker, if any
    return result


def calibrate(folder, work, model, env) -> tuple[float, float]:
    """(seconds until the index folder appears, seconds until the run ends)."""
    idx = work / "calibration"
    shutil.rmtree(idx, ignore_errors=True)
    t0 = time.monotonic()
    proc = grape_index(folder, idx, model, env)
    appeared = None
    while proc.poll() is None:
        if appeared is None and idx.exists():
            appeared = time.monotonic() - t0
        time.sleep(0.005)
    ended = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"calibration run failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return appeared or ended, ended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=24)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/grape-crash-loop"))
    args = ap.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from grape_cli.index import index_folders
    from grape_cli.tiny import build_tiny_clip

    torch.set_num_threads(1)
    started = time.monotonic()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    model = build_tiny_clip(work / "tiny-clip", "test", seed=0)
    folder = make_photos(work / "photos", args.images, args.seed)
    env = {**os.environ, "GRAPE_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])

    index_folders([folder], work / "reference", str(model), workers=1)
    reference = contents(work / "reference")
    appeared, ended = calibrate(folder, work, model, env)
    work_s = ended - appeared
    print(
        f"{args.images} images + 2 bad files; a clean run: index folder after {appeared:.2f} s, "
        f"done after {ended:.2f} s"
    )

    rng = random.Random(args.seed)
    results = []
    for i in range(args.tries):
        if time.monotonic() - started > args.max_seconds:
            print(f"stopping after {i} tries: --max-seconds {args.max_seconds:g} reached")
            break
        after_folder = i % 6 != 5
        # Skewed early: the commits come first, then a longer finish (compaction).
        u = rng.random()
        delay = work_s * 1.1 * u * u if after_folder else rng.uniform(0.3, 1) * appeared
        r = one_try(folder, work / "idx", model, env, after_folder, delay, reference)
        results.append(r)
        outcome = r.get("error") or r.get("mismatch") or "exact"
        print(
            f"try {i + 1:2d}: kill {delay:5.2f} s into {r['phase']:8s}  "
            f"{'killed' if r['killed'] else 'had ended':9s}  {r['state']:11s}  "
            f"rows at kill {'-' if r['rows_at_kill'] is None else r['rows_at_kill']:>4}  "
            f"re-run added {r.get('rerun_added', '-'):>4}  "
            f"{'repaired: ' + '; '.join(r['repaired']) + '  ' if r.get('repaired') else ''}"
            f"-> {outcome}",
            flush=True,
        )

    killed = [r for r in results if r["killed"]]
    mid_run = [r for r in killed if r["rows_at_kill"] not in (None, 0, args.images)]
    exact = [r for r in results if not r.get("error") and not r.get("mismatch")]
    print(
        f"\ntries {len(results)}; killed {len(killed)} "
        f"(with rows committed and more to do: {len(mid_run)}; before the index existed: "
        f"{sum(r['state'] == 'no index' for r in killed)}); ended before the kill "
        f"{len(results) - len(killed)}; exact rows after the re-run {len(exact)}/{len(results)}; "
        f"{time.monotonic() - started:.0f} s"
    )
    sys.exit(0 if len(exact) == len(results) else 1)


if __name__ == "__main__":
    main()
