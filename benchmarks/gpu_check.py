"""GPU figures for grape, printed so they can be quoted (run through gpu_check.sh).

Sections, each skipped with a reason when what it needs is missing:
  1. indexing on CUDA with ViT-B-32 (random weights) in fp16: decode-only, model-only
     (fp16 and fp32) and end-to-end `index_folders` images/s
  2. exact search over 100,000 x 512 vectors: faiss on the GPU (if faiss-gpu is
     installed), faiss on the CPU, and a torch matmul + topk on the GPU
  3. a few GRPO steps through `grape train` (bf16 on GPU), if that command exists
  4. the same for composed queries: a tiny Qwen2-VL rewriter given a reference image and an
     edit, through the same command (TRL's vision-language GRPO)

Sizes come from the environment (see gpu_check.sh); GPU_CHECK_ALLOW_CPU=1 runs it all on
the CPU with a tiny model, as a dry run of the code paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # index_throughput's helpers

FIGURES: list[str] = []


def figure(name: str, value: str) -> None:
    line = f"FIGURE {name}: {value}"
    FIGURES.append(line)
    print(line, flush=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def section_index(device: str, work: Path, spec: str, count: int, batch: int) -> Path:
    """Returns the index folder it built (section 3 trains against it)."""
    import torch
    from index_throughput import PhaseTimer, list_jpegs, make_folder

    from grape_cli.embed import decoded_batches, default_workers
    from grape_cli.index import index_folders
    from grape_cli.models import load_clip

    print(
        f"\n== 1. indexing: {spec} on {device}, {count} JPEGs 640x480, batch {batch}, "
        f"{default_workers()} decode workers",
        flush=True,
    )
    t0 = time.perf_counter()
    folder = make_folder(work / "jpeg-640x480", count, (640, 480), seed=1)
    paths = list_jpegs(folder, count)
    print(f"   inputs ready in {time.perf_counter() - t0:.1f} s")

    clip = load_clip(spec, device=device)
    t0 = time.perf_counter()
    n = sum(
        len(b.positions) for b in decoded_batches(paths, clip.preprocess, clip.image_size, batch)
    )
    figure("decode-only images/s", f"{n / (time.perf_counter() - t0):.0f}")

    pixels = next(iter(decoded_batches(paths[:batch], clip.preprocess, clip.image_size, batch, 0)))
    pixels = pixels.pixels
    for precision in ("fp16", "fp32") if device != "cpu" else ("fp32",):
        model = load_clip(spec, device=device, precision=precision)
        model.encode_images(pixels)  # warm-up: kernels, cuDNN autotune
        sync(device)
        reps = max(3, count // batch)
        t0 = time.perf_counter()
        for _ in range(reps):
            x = pixels.to(device, non_blocking=True)
            model.encode_images(x)  # includes the copy back to the CPU, as indexing does
        sync(device)
        figure(
            f"model-only images/s ({precision})",
            f"{reps * len(pixels) / (time.perf_counter() - t0):.0f}",
        )
        del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    idx = work / "index"
    shutil.rmtree(idx, ignore_errors=True)
    timer = PhaseTimer()
    summary = index_folders([folder], idx, spec, batch_size=batch, device=device, progress=timer)
    figure("end-to-end grape index images/s (whole run)", f"{summary.images_per_s:.0f}")
    figure("end-to-end embedding phase images/s", f"{timer.rate:.0f}")
    print(
        f"   {summary.encoded} embedded in {summary.seconds:.1f} s (model load, hashing, "
        "commits and compaction included)"
    )
    t0 = time.perf_counter()
    again = index_folders([folder], idx)
    figure(f"re-index unchanged {again.unchanged} files (s)", f"{time.perf_counter() - t0:.2f}")
    return idx


def section_search(device: str, n: int, dim: int = 512, queries: int = 1000, k: int = 10) -> None:
    import numpy as np

    print(f"\n== 2. exact search: {n} x {dim} vectors, {queries} queries, top {k}", flush=True)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = base[rng.integers(0, n, queries)] + 0.01 * rng.standard_normal(
        (queries, dim), dtype=np.float32
    )

    try:
        import faiss
    except ImportError:
        print("   faiss is not installed: no faiss figures")
        faiss = None
    if faiss is not None:
        cpu = faiss.IndexFlatIP(dim)
        cpu.add(base)
        t0 = time.perf_counter()
        _, cpu_ids = cpu.search(q, k)
        figure(
            "faiss CPU flat search, 1000 queries (ms)", f"{(time.perf_counter() - t0) * 1e3:.1f}"
        )
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if gpus and hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
            gpu.search(q[:8], k)  # warm-up
            t0 = time.perf_counter()
            _, gpu_ids = gpu.search(q, k)
            figure(
                "faiss GPU flat search, 1000 queries (ms)",
                f"{(time.perf_counter() - t0) * 1e3:.1f}",
            )
            t0 = time.perf_counter()
            gpu.search(q[:1], k)
            figure("faiss GPU flat search, 1 query (ms)", f"{(time.perf_counter() - t0) * 1e3:.2f}")
            figure(
                "faiss GPU top-1 agrees with CPU", f"{(gpu_ids[:, 0] == cpu_ids[:, 0]).mean():.3f}"
            )
        else:
            print("   faiss-gpu is not installed (faiss has no GPU support here): CPU figure only")

    if device.startswith("cuda"):
        import torch

        b = torch.from_numpy(base).to(device, torch.float16)
        qs = torch.from_numpy(q).to(device, torch.float16)
        (qs[:8] @ b.T).topk(k)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        ids = (qs @ b.T).topk(k).indices
        sync(device)
        figure(
            "torch fp16 matmul+topk on GPU, 1000 queries (ms)",
            f"{(time.perf_counter() - t0) * 1e3:.1f}",
        )
        del ids


# Every `grape` subprocess: a Hub miss fails at once instead of waiting on the network.
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def grape_train_ready() -> bool:
    """Whether sections 3 and 4 can run; says why not once."""
    helped = subprocess.run(
        [sys.executable, "-m", "grape_cli", "train", "--help"], capture_output=True, env=OFFLINE
    )
    if helped.returncode != 0:
        print("\n== 3-4. `grape train` is not available in this checkout: skipped")
        return False
    try:
        import trl  # noqa: F401
    except ImportError:
        print("\n== 3-4. trl is not installed: `grape train` sections skipped")
        return False
    return True


def run_grape_train(label: str, pairs: Path, idx: Path, model: Path, out: Path, steps: int,
                    extra: list[str]) -> None:  # fmt: skip
    """`grape train` as a user runs it (bf16 mixed precision on CUDA is its own choice), and
    its whole-command seconds and median step seconds as figures."""
    for stale in (out, out.with_name(f".{out.name}.partial")):  # a failed earlier check's
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "grape_cli", "train", str(pairs), "--index", str(idx),
           "--base-model", str(model), "--steps", str(steps), "--out", str(out), *extra]  # fmt: skip
    print("   $ grape " + " ".join(cmd[4:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"   grape train failed (exit {r.returncode}); last lines:")
        print("   " + "\n   ".join((r.stdout + r.stderr).strip().splitlines()[-15:]))
        return
    figure(f"{label}: grape train {steps} GRPO steps, whole command (s)", f"{elapsed:.1f}")
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    times = [r["step_seconds"] for r in rows if isinstance(r.get("step_seconds"), (int, float))]
    if times:
        figure(f"{label}: GRPO seconds per step (median)", f"{sorted(times)[len(times) // 2]:.3f}")
    print(f"   {len(rows)} metric rows; last: {rows[-1] if rows else '-'}")


def section_train(device: str, work: Path, idx: Path, steps: int) -> None:
    print(f"\n== 3. GRPO steps through `grape train` ({steps} steps)", flush=True)
    from grape_cli.store import Store
    from grape_cli.tiny import build_tiny_lm

    store = Store.open(idx)
    meta, _ = store.load_matrix(("path",))
    words = ["red", "blue", "green", "circle", "square", "photo", "dog", "beach", "sunset"]
    pairs = work / "pairs.jsonl"
    with pairs.open("w") as f:
        for i, path in enumerate(meta["path"][:64]):
            query = f"a {words[i % 9]} {words[(i * 5) % 9]} picture number {i}"
            f.write(json.dumps({"query": query, "target": path}) + "\n")
    lm = build_tiny_lm(
        work / "tiny-lm",
        [json.loads(x)["query"] for x in pairs.open()] * 4,
        preset="small" if device != "cpu" else "test",
        vocab_size=400,
    )
    extra = ["--group-size", "4", "--max-new-tokens", "24"]
    run_grape_train("text", pairs, idx, lm, work / "run", steps, extra)


def section_compose(device: str, work: Path, idx: Path, steps: int) -> None:
    print(f"\n== 4. composed-query GRPO through `grape train` ({steps} steps)", flush=True)
    from grape_cli.store import Store
    from grape_cli.tiny import build_tiny_vlm

    # Reference image i, target image i+1 of the index built in section 1: the pairs file
    # names both by absolute path, as a user's composed pairs may.
    meta, _ = Store.open(idx).load_matrix(("path",))
    paths = list(meta["path"][:65])
    edits = ["like this but red", "the same in blue", "make it a circle", "on a beach"]
    pairs = work / "compose.jsonl"
    with pairs.open("w") as f:
        for i in range(64):
            rec = {"query": edits[i % 4], "image": paths[i], "target": paths[i + 1]}
            f.write(json.dumps(rec) + "\n")
    vlm = build_tiny_vlm(
        work / "tiny-vlm",
        edits * 16 + ["a red circle on a beach", "a blue square"] * 16,
        preset="small" if device != "cpu" else "test",
        vocab_size=400,
    )
    extra = ["--group-size", "4", "--queries-per-step", "4", "--max-new-tokens", "16"]
    run_grape_train("compose", pairs, idx, vlm, work / "run-compose", steps, extra)


def main() -> None:
    import torch

    allow_cpu = os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/grape-gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        device = "cuda"
        print(
            f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, {os.cpu_count()} CPUs"
        )
        # `grape train` trains in bf16 mixed precision exactly when this holds (trainer.py).
        print(f"bf16 supported (grape train uses bf16 when so): {torch.cuda.is_bf16_supported()}")
        spec = os.environ.get("GPU_CHECK_MODEL", "ViT-B-32:random")
    elif allow_cpu:
        device = "cpu"
        print(
            f"device: CPU dry run (GPU_CHECK_ALLOW_CPU=1), torch {torch.__version__}: "
            "figures are not GPU figures"
        )
        from grape_cli.tiny import build_tiny_clip

        tiny = work / "tiny-clip"
        if not (tiny / "open_clip_config.json").exists():
            build_tiny_clip(tiny, "test", seed=0)
        spec = os.environ.get("GPU_CHECK_MODEL", str(tiny))
    else:
        sys.exit("no CUDA device: this is a GPU check (GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)")

    gpu = device != "cpu"
    images = env_int("GPU_CHECK_IMAGES", 8000 if gpu else 300)
    batch = env_int("GPU_CHECK_BATCH", 256 if gpu else 32)
    t_all = time.perf_counter()
    idx = section_index(device, work, spec, images, batch)
    section_search(device, env_int("GPU_CHECK_SEARCH_N", 100_000 if gpu else 5_000))
    steps = env_int("GPU_CHECK_STEPS", 5 if gpu else 2)
    if grape_train_ready():
        section_train(device, work, idx, steps)
        section_compose(device, work, idx, steps)
    print(f"\n== all figures ({time.perf_counter() - t_all:.0f} s in all)")
    print("\n".join(FIGURES))


if __name__ == "__main__":
    main()
