"""`grape index --engine ray` against the local engine: same folder, same model, one run.

Prints, for a tiny model and for ViT-B-32 (random weights):
  local     images/s of a fresh `index_folders` run (walk, model load, decode, embed,
            commits, compaction, search cache: the whole command)
  ray       the same with engine="ray" on a local cluster started once beforehand (its
            start is printed apart), and the ratio ray / local
  where the Ray time goes: pipeline start (until the first batch is back: actor start,
            model load in the actor, first decode), then worker-seconds summed over the
            tasks and actors of each stage (decode, embed, write) and the driver's commits
then the decode rate of one process (one core) on these JPEGs, the figure the N-node
estimate below rests on.

Usage (inputs cached under --cache, /tmp/grape-bench by default; the same 640x480 JPEGs
as benchmarks/index_throughput.py):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_index.py
    ... --tiny-count 500 --skip-vit        # quicker
Figures depend on what else runs on the machine: quote them with the header it prints.

Measured here (tiny: three runs, ViT: two), 2 cores shared with a 40-minute job (load average 3.5-5.9),
2,000 JPEGs of 640x480 (tiny model) and 200 (ViT-B-32, random weights, CPU), batch 64:
  tiny      local 123-137 images/s, ray 75-103 (ray/local 0.55-0.83); the Ray run spent
            16-22 s before its first batch came back (worker processes importing torch,
            torchvision and open_clip, the actor loading the model), then about 4-5
            worker-seconds decoding, 0.3-0.5 embedding, 0.4-0.5 writing, 0.1 committing
  ViT-B-32  local 6.9-8.3 images/s, ray 4.8-5.2 (0.58-0.76); 27-29 s to the first batch
            (its embedding on one CPU thread included), 17.5-20 worker-seconds embedding
  decode    one core: 127-142 images/s of these JPEGs at 224 px, 318-470 at the tiny
            model's 32 px; 19-20 images/s of a 12 MP (4000x3000, 2.9 MB) JPEG at 224 px,
            draft mode included (all on cores shared with other jobs: idle ones are faster)

Estimate for N GPU nodes (ViT-B-32, 224 px). Each node embeds min(c * d, g) images/s,
c decoding cores at d images/s each, g the GPU's rate for the image tower; the nodes
share nothing but the driver's commits (fragment metadata every 512 rows: tens of
milliseconds each here, so over 10,000 rows/s) and the file system. Public figures for g:
clip-retrieval reports about 1,500 images/s on one RTX 3080 and about 7,000 on 8 A100s,
the latter limited by decoding, not by the GPUs. So:
  * 0.3 MP images (d about 130-250): 12 cores already feed a 3080, N nodes give about
    1,500 N images/s, more with faster GPUs;
  * 12 MP camera photos (d about 20 on a shared core, more on an idle one): a 32-core
    node decodes about 640 images/s or more, below one 3080; N such nodes give roughly
    650 N images/s, and more cores per node, not more GPUs, is what helps (8 nodes: about
    5,000 images/s, the order of clip-retrieval's decode-bound 7,000).
  Reading 2.9 MB per photo at 1,000 images/s is 2.9 GB/s from the shared file system per
  node: the storage must keep up too. Add the run's start-up (10-30 s) once.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_throughput import list_jpegs, make_folder

STAGES = ("decode_s", "embed_s", "write_s", "commit_s")


def fresh_copy(paths: list[str], work: Path) -> Path:
    """`paths` hard-linked into a new folder (the same files without copying bytes)."""
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    src.mkdir(parents=True)
    for p in paths:
        os.link(p, src / Path(p).name)
    return src


def run(engine: str, spec: str, paths: list[str], work: Path, batch_size: int):
    from grape_cli.index import index_folders

    src = fresh_copy(paths, work)
    t0 = time.perf_counter()
    summary = index_folders(
        [src], work / "index", spec, batch_size=batch_size, engine=engine, commit_every=512
    )
    assert summary.encoded == len(paths), summary
    return summary, time.perf_counter() - t0


def decode_per_core(spec: str, paths: list[str], batch_size: int) -> float:
    """Images/s of one process reading, decoding and preprocessing (no model)."""
    from grape_cli.embed import decoded_batches
    from grape_cli.models import load_clip

    clip = load_clip(spec, device="cpu")
    t0 = time.perf_counter()
    n = sum(
        len(b.positions)
        for b in decoded_batches(paths, clip.preprocess, clip.image_size, batch_size, 0)
    )
    return n / (time.perf_counter() - t0)


def decode_camera_photo(cache: Path, seconds: float = 8.0) -> float:
    """Images/s of one core reading and decoding a 12 MP (4000x3000) JPEG for a 224 px
    model: draft mode, resize, crop, tensor; what a camera's photos cost to decode."""
    import io

    from index_throughput import picture
    from open_clip import image_transform

    from grape_cli.embed import decode_image, read_file

    path = cache / "camera-12mp.jpg"
    if not path.exists():
        import numpy as np

        buf = io.BytesIO()
        picture(np.random.default_rng(0), (4000, 3000)).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    preprocess = image_transform(224, is_train=False)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        image, _ = decode_image(io.BytesIO(read_file(str(path))), 224)
        preprocess(image)
        n += 1
    return n / (time.perf_counter() - t0)


def compare(label: str, spec: str, paths: list[str], args) -> dict:
    print(f"\n== {label}: {spec} ({len(paths)} images, batch {args.batch_size})", flush=True)
    _, local_s = run("local", spec, paths, args.cache / f"ray-{label}-local", args.batch_size)
    print(f"  local   {len(paths) / local_s:8.1f} images/s  ({local_s:.1f} s)", flush=True)
    ray_sum, ray_s = run("ray", spec, paths, args.cache / f"ray-{label}-ray", args.batch_size)
    ratio = local_s / ray_s
    print(f"  ray     {len(paths) / ray_s:8.1f} images/s  ({ray_s:.1f} s)  ray/local {ratio:.2f}")
    st = ray_sum.stages
    busy = ", ".join(f"{k[:-2]} {st.get(k, 0):.1f}" for k in STAGES)
    print(
        f"  ray time: pipeline start {st.get('first_result_s', 0):.1f} s (to the first batch "
        f"back), pipeline {st.get('pipeline_s', 0):.1f} s, driver model load "
        f"{st.get('driver_model_s', 0):.1f} s, rest of the run (walk, compaction, search "
        f"cache) {ray_s - st.get('total_s', 0):.1f} s"
    )
    print(
        f"  worker-seconds per stage: {busy} (driver); actor start {st.get('actor_init_s', 0):.1f}"
        " (imports and model load, summed over actors)",
        flush=True,
    )
    decode = decode_per_core(spec, paths[:300], args.batch_size)
    print(f"  decode per core {decode:6.1f} images/s (one process, at this model's input size)")
    return {"local": len(paths) / local_s, "ray": len(paths) / ray_s, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/grape-bench"))
    ap.add_argument("--tiny-count", type=int, default=2000)
    ap.add_argument("--vit-count", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--object-store-mb", type=int, default=500)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from grape_cli.tiny import build_tiny_clip

    load = os.getloadavg()
    print(
        f"grape index, ray vs local | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs | load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at "
        "start (other processes share these CPUs: figures are lower bounds)"
    )
    folder = make_folder(
        args.cache / "jpeg-640x480", max(args.tiny_count, args.vit_count), (640, 480), seed=1
    )
    tiny = args.cache / "tiny-clip-test"
    if not (tiny / "open_clip_config.json").exists():
        build_tiny_clip(tiny, "test", seed=0)

    t0 = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=args.object_store_mb << 20,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    print(f"local Ray cluster started in {time.perf_counter() - t0:.1f} s (not in the runs)")
    try:
        results = {"tiny": compare("tiny", str(tiny), list_jpegs(folder, args.tiny_count), args)}
        if not args.skip_vit:
            paths = list_jpegs(folder, args.vit_count)
            results["vit"] = compare("vit-b-32", "ViT-B-32:random", paths, args)
    finally:
        ray.shutdown()
    import torch

    torch.set_num_threads(1)
    rate = decode_camera_photo(args.cache)
    print(f"\ndecode per core, 12 MP camera JPEG for a 224 px model: {rate:.1f} images/s")
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(", ".join(f"{k}: ray/local {v['ray'] / v['local']:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
