"""How close `grape index` gets to its slower half: decoding or the model.

Prints, in one run, for a tiny model and for ViT-B-32 (random weights):
  decode-only   images/s through grape_cli.embed's loader (same workers, same batch)
  model-only    images/s of the image tower on pre-decoded tensors
  end-to-end    images/s of a fresh `index_folders` run (model load, walk, hashing, commits
                and compaction included), and of its embedding phase alone
  ratio         end-to-end / min(decode-only, model-only); target >= 0.8
then the time to re-index an unchanged 10,000-file folder (target < 2 s), as a library
call and as a whole `grape index` process.

Usage (cached inputs live under --cache, /tmp/grape-bench by default):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/index_throughput.py
    ... --tiny-count 3000 --vit-count 200 --skip-unchanged    # quicker
Figures depend on what else runs on the machine: quote them with the header it prints.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DISTINCT = 200  # distinct pictures; copies differ by a JPEG comment, so each hash is new


def picture(rng, size=(640, 480)) -> Image.Image:
    """Smooth colour fields, a few shapes and sensor-like noise: JPEG-compresses like a photo."""
    grid = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(10, 80)
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same image with a COM segment after SOI: new bytes, identical decoding work."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def make_folder(folder: Path, count: int, size: tuple[int, int], seed: int) -> Path:
    """`count` distinct JPEGs of `size`, 500 per sub-folder; only missing files are written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"d{i // 500:03d}" / f"{i:06d}.jpg" for i in range(count)]
    if all(p.exists() for p in paths):
        return folder
    rng = np.random.default_rng(seed)
    bases = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        picture(rng, size).save(buf, format="JPEG", quality=90)
        bases.append(buf.getvalue())
    for i, p in enumerate(paths):
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(with_comment(bases[i % DISTINCT], f"grape-bench {seed} {i}"))
    return folder


def list_jpegs(folder: Path, count: int) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.jpg"))[:count]


# ----------------------------------------------------------------------------- measurements


def decode_only(clip, paths: list[str], batch_size: int, workers: int | None) -> float:
    from grape_cli.embed import decoded_batches

    t0 = time.perf_counter()
    n = 0
    for batch in decoded_batches(paths, clip.preprocess, clip.image_size, batch_size, workers):
        n += len(batch.positions)
    assert n == len(paths), f"only {n} of {len(paths)} decoded"
    return n / (time.perf_counter() - t0)


def model_only(clip, paths, batch_size: int, count: int, budget_s: float = 15.0) -> dict:
    """The image tower alone on `count` images or for `budget_s` seconds (from a few batches
    decoded beforehand), at torch's default thread count and at 1 thread: {threads: img/s}."""
    import torch

    from grape_cli.embed import decoded_batches

    batches = []
    for batch in decoded_batches(
        paths[: batch_size * 4], clip.preprocess, clip.image_size, batch_size, 0
    ):
        batches.append(batch.pixels)
    default = torch.get_num_threads()
    rates = {}
    try:
        for threads in dict.fromkeys([default, 1]):
            torch.set_num_threads(threads)
            clip.encode_images(batches[0][:2])  # warm-up
            t0 = time.perf_counter()
            done = 0
            while done < count and time.perf_counter() - t0 < budget_s:
                pixels = batches[(done // batch_size) % len(batches)][: count - done]
                clip.encode_images(pixels)
                done += len(pixels)
            rates[threads] = done / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(default)
    return rates


class PhaseTimer:
    """A Progress that notes when embedding starts and ends."""

    def __init__(self):
        self.phase, self.t_start, self.t_end, self.done = None, None, None, 0

    def start(self, total: int, description: str) -> None:
        self.phase = description
        if description == "embedding":
            self.t_start = time.perf_counter()

    def advance(self, n: int) -> None:
        if self.phase == "embedding":
            self.done += n
            self.t_end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.done / (self.t_end - self.t_start) if self.t_end else 0.0


def end_to_end(spec: str, folder: Path, paths: list[str], work: Path, batch_size, workers):
    """A fresh index of exactly `paths` (linked into their own folder): (summary, phase rate)."""
    from grape_cli.index import index_folders

    src = work / "src"
    shutil.rmtree(work, ignore_errors=True)
    src.mkdir(parents=True)
    for p in paths:  # hard links: the same files without copying bytes
        os.link(p, src / Path(p).name)
    timer = PhaseTimer()
    summary = index_folders(
        [src], work / "index", spec, batch_size=batch_size, workers=workers, progress=timer
    )
    assert summary.encoded == len(paths), summary
    return summary, timer.rate


def measure(label: str, spec: str, folder: Path, count: int, args) -> dict:
    import torch

    from grape_cli.models import load_clip

    paths = list_jpegs(folder, count)
    clip = load_clip(spec, device="cpu")
    print(
        f"\n== {label}: {spec}  ({len(paths)} images, {clip.image_size}px input, "
        f"batch {args.batch_size}, workers {args.workers or 'default'}, "
        f"torch threads {torch.get_num_threads()})",
        flush=True,
    )
    decode = decode_only(clip, paths, args.batch_size, args.workers)
    print(f"  decode-only  {decode:9.1f} images/s", flush=True)
    rates = model_only(clip, paths, args.batch_size, len(paths))
    model = max(rates.values())  # the bound is the best the model alone can do
    each = ", ".join(f"{r:.1f} with {n} thread{'s' * (n > 1)}" for n, r in rates.items())
    print(f"  model-only   {model:9.1f} images/s  (best of: {each})", flush=True)
    del clip
    summary, phase = end_to_end(
        spec, folder, paths, args.cache / f"e2e-{label}", args.batch_size, args.workers
    )
    e2e = summary.images_per_s
    bound = min(decode, model)
    print(
        f"  end-to-end   {e2e:9.1f} images/s  ({summary.seconds:.1f} s for the whole run; "
        f"embedding phase alone {phase:.1f} images/s)"
    )
    ok = "ok" if e2e / bound >= 0.8 else "MISSED"
    print(
        f"  ratio        {e2e / bound:9.2f}  end-to-end / min(decode, model)  "
        f"[target >= 0.8: {ok}]; embedding phase {phase / bound:.2f}",
        flush=True,
    )
    return {"decode": decode, "model": model, "e2e": e2e, "phase": phase, "ratio": e2e / bound}


def unchanged_reindex(args, tiny_spec: str) -> None:
    from grape_cli.index import index_folders
    from grape_cli.store import SNAPSHOT

    folder = make_folder(args.cache / "unchanged-10k", 10_000, (64, 48), seed=2)
    idx = args.cache / "unchanged-10k-index"
    t0 = time.perf_counter()
    first = index_folders([folder], idx, tiny_spec, batch_size=256, workers=args.workers)
    if first.encoded:
        print(f"\n(first index of the 10,000-file folder: {time.perf_counter() - t0:.1f} s)")

    def timed_library_call() -> float:
        t0 = time.perf_counter()
        again = index_folders([folder], idx)
        assert again.unchanged == 10_000 and again.encoded == 0, again
        return time.perf_counter() - t0

    (idx / SNAPSHOT).unlink(missing_ok=True)  # as after any change: the full comparison
    full = timed_library_call()  # (it writes the snapshot again)
    quick = timed_library_call()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "grape_cli", "index", str(folder), "--index", str(idx), "--json"]
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t0)
    proc = min(runs)
    print("\n== re-index of an unchanged 10,000-file folder (target < 2 s)")
    print(
        f"  library call  {quick:6.2f} s   [{'ok' if quick < 2 else 'MISSED'}]  (from the snapshot)"
    )
    print(f"  library call  {full:6.2f} s   (full comparison in LanceDB, as after any change)")
    print(
        f"  grape process {proc:6.2f} s   [{'ok' if proc < 2 else 'MISSED'}]  "
        f"(best of 3: {', '.join(f'{r:.2f}' for r in runs)}; includes Python start-up)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/grape-bench"))
    ap.add_argument("--tiny-count", type=int, default=8000, help="images for the tiny model")
    ap.add_argument("--vit-count", type=int, default=300, help="images for ViT-B-32")
    ap.add_argument("--tiny-preset", default="test", help="grape_cli.tiny preset")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="default: grape's default")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--skip-unchanged", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from grape_cli.embed import default_workers
    from grape_cli.tiny import build_tiny_clip

    load = os.getloadavg()
    print(
        f"grape index throughput | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, default workers {default_workers()} | load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start "
        "(other processes share these CPUs: figures are lower bounds)"
    )
    t0 = time.perf_counter()
    folder = make_folder(
        args.cache / "jpeg-640x480", max(args.tiny_count, args.vit_count), (640, 480), seed=1
    )
    print(f"inputs: {folder} ({time.perf_counter() - t0:.1f} s to check or generate)")
    tiny = args.cache / f"tiny-clip-{args.tiny_preset}"
    if not (tiny / "open_clip_config.json").exists():
        build_tiny_clip(tiny, args.tiny_preset, seed=0)

    results = {"tiny": measure("tiny", str(tiny), folder, args.tiny_count, args)}
    if not args.skip_vit:
        results["vit"] = measure("vit-b-32", "ViT-B-32:random", folder, args.vit_count, args)
    if not args.skip_unchanged:
        unchanged_reindex(args, str(tiny))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    summary = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in results.items())
    print(f"ratios: {summary}")


if __name__ == "__main__":
    main()
