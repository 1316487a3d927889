"""The bundled example, end to end: `python -m examples.shapes.run [--quick] [--workdir DIR]`.

Builds the shapes world, trains its tiny CLIP retriever and tiny base rewriter, then runs
grape's own commands on it, as a user would: `grape index`, `grape train` (rank,
rank-top and similarity rewards), `grape eval` on held-out pairs in seen and unseen
phrasings, and one `grape search` in Chinese. The third shift, composed queries (a
reference image plus an edit), gets a tiny base vision-language rewriter, GRPO with the
rank and similarity rewards, and its own eval and search; `--only compose` runs just
that on an existing work folder. Writes RESULTS.md (tables, settings, seeds, timings,
machine) into the work folder.

Work folder layout (default examples/shapes/work/):
  corpus/ (images + scenes.jsonl)  retriever/  index/  rewriter-base/  rewriter-vlm-base/
  runs/rank/  runs/rank-top/  runs/similarity/  runs/compose-rank/  runs/compose-similarity/
  pairs/  eval/  logs/  results.json  RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Held-out pair files evaluated: each shift in the phrasings training used and in unseen ones.
SHIFTS = ("zh", "long", "zh-unseen", "long-unseen")
# GRPO runs, one per reward: the paper's linear rank reward, the top-weighted rank-top,
# and the naive similarity reward (the ablation).
REWARDS = ("rank", "rank-top", "similarity")
# Composed queries: the two rewards, the paper's rank and the naive similarity.
COMPOSE_REWARDS = ("rank", "similarity")
COMPOSE_SHIFTS = ("compose", "compose-unseen")

# Settings of a full run and of the CI smoke run (<= 5 minutes). The full run took 38-40
# minutes on one 2-core machine and about 70 on a slower one (examples/shapes/README.md,
# Time); the issues ask for 45.
FULL = {
    "scenes": 2000,
    "retriever_steps": 1000,
    "sft_steps": None,
    "grpo_steps": 300,
    # 8 x 8 completions a step. 16 x 4 (the same compute) was measured worse: rank-top
    # held-out R@1 / R@10 long .258 / .580 against .320 / .600, zh .755 / .912 against
    # .828 / .927.
    "group_size": 8,
    "queries_per_step": 8,
    # Text GRPO. On the c2fdcfa world, rank-top seed 0, held-out R@1 zh / zh-unseen / long:
    # 1e-4 .818 / .757 / .302, 2e-4 .858 / .828 / .333, 4e-4 .877 / .715 / .318 (unseen
    # Chinese phrasings fell). `rank` at 2e-4: .575 -> .802 on zh. A KL term held the
    # policy back instead (beta 0.04: zh R@1 .698; 0.2: .430). examples/shapes/README.md.
    "learning_rate": 2e-4,
    # The composed GRPO keeps 1e-4: at 2e-4 its held-out R@10 was 0.25 at step 500
    # against 0.40 (4e-4: 0.07). Again on the e58765a run's world (`rank`, checkpoint
    # set R@10 at step 300): 2e-4 0.48 against 0.72.
    "compose_learning_rate": 1e-4,
    "beta": 0.0,
    "eval_every": 50,
    "comprehension_scenes": 400,
    "vlm_sft_steps": None,
    # 400 steps stopped while held-out R@10 still rose (best checkpoint: the last, for
    # both rewards). 800 on the same world and base VLM (2026-12-04): held-out R@10 rank
    # 0.355 -> 0.465, similarity 0.383 -> 0.555; best checkpoints 700 and 750. 1,000
    # `rank` steps on the e58765a run's world: held-out R@10 0.752 (800: 0.755), though
    # the checkpoint set rose to 0.81 (0.775); and 3.5 more minutes.
    "compose_grpo_steps": 800,
}
QUICK = {
    "scenes": 160,
    "retriever_steps": 20,
    "sft_steps": 20,
    "grpo_steps": 4,
    "group_size": 4,
    "queries_per_step": 4,
    "learning_rate": 2e-4,
    "compose_learning_rate": 1e-4,
    "beta": 0.0,
    "eval_every": 2,
    "comprehension_scenes": 16,
    "vlm_sft_steps": 10,
    "compose_grpo_steps": 4,
}

STAGE_DIRS = ("corpus", "pairs", "retriever", "index", "rewriter-base", "runs", "eval", "logs")
SEARCH_QUERY = "一个小的红色圆形在左边，蓝色背景"
SEARCH_REWARD = "rank-top"  # the run `grape search` shows: grape's default reward
COMPOSE_SEARCH = "和这张一样，但是换成红色"  # with the first held-out pair's reference image


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _grape_cmd(args) -> list[str]:
    log("$ grape " + " ".join(map(str, args)))
    return [sys.executable, "-m", "grape_cli", *map(str, args)]


def _result(proc: subprocess.Popen | subprocess.CompletedProcess, stdout: str, what: str):
    if proc.returncode != 0:
        sys.stderr.write(stdout)
        raise SystemExit(f"grape {what} failed with exit code {proc.returncode}")
    return stdout


def grape(*args, json_out: bool = True) -> dict | str:
    """Run a grape command in a subprocess, exactly as a user would; JSON result."""
    cmd = _grape_cmd([*args, *(["--json"] if json_out else [])])
    # stderr goes straight to the log: grape's progress lines (one every 10 s when it is
    # not a terminal) show how a long GRPO run is going.
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    out = _result(proc, proc.stdout, args[0])
    return json.loads(out) if json_out else out


def grape_parallel(jobs: dict[str, list], logs: Path) -> dict[str, dict]:
    """Run several grape commands at once, one CPU thread each; their JSON results.

    GRPO runs on one thread each, side by side, finish sooner than one after the other on
    two threads (a tiny model's matrices are too small to keep two threads busy), and on
    one thread a run repeats exactly. Its figures do not depend on how many run at once
    (nothing in it is timed), only its wall time.
    Each run's progress goes to `logs/<name>.log`.
    """
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, args in jobs.items():
        with open(logs / f"{name}.log", "w", encoding="utf-8") as err:
            procs[name] = subprocess.Popen(
                _grape_cmd([*args, "--json"]),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        log(f"  ({name}: progress in {logs / f'{name}.log'})")
    return {name: json.loads(_result(p, p.communicate()[0], name)) for name, p in procs.items()}


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                log(f"== {name}")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = time.perf_counter() - self.t

        return _Stage()


def prompt_file(work: Path, kind: str) -> Path:
    """The example's prompt for its text or its vision rewriters, as a `--prompt-file`."""
    from examples.shapes.rewriter import PROMPT
    from examples.shapes.vlm import PROMPT as VISION_PROMPT

    path = work / f"prompt-{kind}.json"
    prompt = {"text": PROMPT, "vision": VISION_PROMPT}[kind]
    path.write_text(json.dumps(prompt.to_dict(), indent=1), encoding="utf-8")
    return path


def train_args(pairs, work: Path, base, reward: str, steps: int, cfg: dict, seed, out,
               kind: str = "text") -> list:  # fmt: skip
    """`grape train` arguments for one GRPO run of the example."""
    return [
        "train", pairs, "--index", work / "index", "--base-model", base, "--reward", reward,
        "--prompt-file", prompt_file(work, kind),
        "--steps", steps, "--group-size", cfg["group_size"],
        "--queries-per-step", cfg["queries_per_step"], "--learning-rate", cfg["learning_rate"],
        "--beta", cfg["beta"], "--eval-every", cfg["eval_every"], "--seed", seed, "--out", out,
    ]  # fmt: skip


def run_compose(work: Path, cfg: dict, seed: int, quick: bool, timer, results: dict) -> None:
    """The composed-query shift on a work folder whose corpus and index exist: pairs, the
    base VLM, GRPO with each of COMPOSE_REWARDS (side by side), eval and one search."""
    from examples.shapes.vlm import reading_report, train_base_vlm
    from examples.shapes.world import load_scenes, split_scenes, write_compose_pairs
    from grape_cli.train.rundir import run_dirs

    # An interrupted earlier run leaves its partial folders, which `grape train` would
    # refuse to start over: this run rebuilds the base VLM, so they are stale too.
    old = [
        run_dirs(work / f"runs/compose-{r}", False, work / "index", check=False)
        for r in COMPOSE_REWARDS
    ]
    for stale in (work / "rewriter-vlm-base", *(d.out for d in old), *(d.work for d in old)):
        shutil.rmtree(stale, ignore_errors=True)
    scenes = load_scenes(work / "corpus")
    train, held = split_scenes(scenes, seed=seed)
    with timer("compose pairs + base VLM"):
        pairs = write_compose_pairs(work / "corpus", work / "pairs", scenes, train, held, seed)
        base = train_base_vlm(
            work / "rewriter-vlm-base", scenes, train, work / "rewriter-base", work / "corpus",
            seed=seed,
            steps=cfg["vlm_sft_steps"], quick=quick, log=log,
        )  # fmt: skip
    runs = {r: work / "runs" / f"compose-{r}" for r in COMPOSE_REWARDS}
    with timer("grpo compose " + " + ".join(COMPOSE_REWARDS)):
        steps = cfg["compose_grpo_steps"]
        vision_cfg = {**cfg, "learning_rate": cfg["compose_learning_rate"]}
        jobs = {
            f"compose-{r}": train_args(
                pairs["train-compose"], work, base, r, steps, vision_cfg, seed, runs[r], "vision"
            )
            for r in COMPOSE_REWARDS
        }
        results.update({f"train_{k}": v for k, v in grape_parallel(jobs, work / "logs").items()})
    names = {"none": "blend", "image-only": "image only", "text-only": "text only"}
    names |= {str(base): "base VLM", **{str(runs[r]): f"grpo-{r}" for r in COMPOSE_REWARDS}}
    results["compose_names"] = names
    with timer("eval compose"):
        (work / "eval").mkdir(exist_ok=True)
        for shift in COMPOSE_SHIFTS:
            per_query = work / "eval" / f"per-query-{shift}.jsonl"
            args = [pairs[f"heldout-{shift}"], "--index", work / "index", "--per-query", per_query,
                    "--prompt-file", prompt_file(work, "vision")]  # fmt: skip
            for r in ["none", base, *(runs[r] for r in COMPOSE_REWARDS)]:
                args += ["--rewriter", r]
            results.setdefault("eval", {})[shift] = grape("eval", *args)
        results["eval"]["compose-oracle"] = grape(
            "eval", pairs["heldout-compose-oracle"], "--index", work / "index", "--rewriter", "none"
        )
        results["compose_reading"] = reading_report(
            base, scenes, held[: cfg["comprehension_scenes"]], seed, work / "corpus"
        )
    with timer("search compose"):
        first = json.loads(pairs["heldout-compose"].read_text(encoding="utf-8").splitlines()[0])
        image = (pairs["heldout-compose"].parent / first["image"]).resolve()
        results["compose_search"] = {"query": COMPOSE_SEARCH, "image": str(image)}
        results["compose_search"]["output"] = grape(
            "search", COMPOSE_SEARCH, "--image", image, "--index", work / "index",
            "--rewriter", runs["rank"], "-k", 5, json_out=False,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    p.add_argument("--quick", action="store_true", help="tiny world, few steps (CI smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only", choices=["compose"], help="run one shift on an existing work folder's world"
    )
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if a.only == "compose":
        return only_compose(a)
    from examples.shapes.retriever import encode_corpus, evaluate_retriever, train_retriever
    from examples.shapes.rewriter import train_base_rewriter, usage_report
    from examples.shapes.world import (
        caption_en,
        make_scenes,
        query_long,
        query_zh,
        split_scenes,
        write_corpus,
        write_pairs,
    )

    cfg = QUICK if a.quick else FULL
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # A re-run rebuilds everything: the retriever is retrained into the same folder, so an
    # index (keyed by that folder's path) or a run folder left from before would be stale.
    for stage in STAGE_DIRS:
        shutil.rmtree(work / stage, ignore_errors=True)
    timer = Timer()
    results: dict = {"settings": cfg, "seed": a.seed, "quick": a.quick}

    with timer("world"):
        scenes = make_scenes(cfg["scenes"], a.seed)
        train, held = split_scenes(scenes, seed=a.seed)
        write_corpus(work / "corpus", scenes, seed=a.seed)
        pairs = write_pairs(work / "corpus", work / "pairs", train, held, seed=a.seed)
        mixed = work / "pairs" / "train-mixed.jsonl"
        mixed.write_text(
            pairs["train-zh"].read_text(encoding="utf-8")
            + pairs["train-long"].read_text(encoding="utf-8"),
            encoding="utf-8",
        )

    with timer("retriever"):
        retriever = train_retriever(
            work / "retriever",
            train,
            seed=a.seed,
            quick=a.quick,
            exclude=held,
            steps=cfg["retriever_steps"],
            log=log,
        )
        from grape_cli.models import load_clip

        clip = load_clip(str(retriever), device="cpu")
        corpus = encode_corpus(clip, work / "corpus")
        results["retriever"] = {
            name: evaluate_retriever(retriever, work / "corpus", held, a.seed, fn, clip, corpus)
            for name, fn in {"en": caption_en, "zh": query_zh, "long": query_long}.items()
        }

    with timer("index"):
        results["index"] = grape(
            "index", work / "corpus", "--index", work / "index", "--model", retriever
        )

    with timer("base rewriter"):
        base = train_base_rewriter(
            work / "rewriter-base",
            train,
            seed=a.seed,
            steps=cfg["sft_steps"],
            quick=a.quick,
            log=log,
        )

    runs = {r: work / "runs" / r for r in REWARDS}
    jobs = {
        r: train_args(mixed, work, base, r, cfg["grpo_steps"], cfg, a.seed, runs[r])
        for r in REWARDS
    }
    # All three side by side on one thread each (see grape_parallel). One thread is also
    # what makes a run repeat: `similarity` on two threads, run after the other two,
    # moved by up to 0.018 between runs of the same seed on one machine.
    with timer("grpo " + " + ".join(REWARDS)):
        done = grape_parallel(jobs, work / "logs")
        results.update({f"train_{r}": v for r, v in done.items()})

    rewriters = ["none", base, *(runs[r] for r in REWARDS)]
    names = {"none": "none", str(base): "base", **{str(runs[r]): f"grpo-{r}" for r in REWARDS}}
    results["names"] = names
    with timer("eval"):
        (work / "eval").mkdir(exist_ok=True)
        results["eval"] = {}
        for shift in SHIFTS:
            args = [
                pairs[f"heldout-{shift}"],
                "--index",
                work / "index",
                "--per-query",
                work / "eval" / f"per-query-{shift}.jsonl",
                "--prompt-file",
                prompt_file(work, "text"),
            ]
            for r in rewriters:
                args += ["--rewriter", r]
            results["eval"][shift] = grape("eval", *args)
        results["eval"]["en"] = grape(
            "eval", pairs["heldout-en"], "--index", work / "index", "--rewriter", "none"
        )
        # How the base rewriter reads held-out queries (greedy): colour mix-ups, drops.
        results["comprehension"] = usage_report(
            base, held[: cfg["comprehension_scenes"]], seed=a.seed, samples=0
        )

    with timer("search"):
        results["search_reward"] = SEARCH_REWARD
        results["search"] = grape(
            "search",
            SEARCH_QUERY,
            "--index",
            work / "index",
            "--rewriter",
            runs[SEARCH_REWARD],
            "-k",
            5,
            json_out=False,
        )

    run_compose(work, cfg, a.seed, a.quick, timer, results)
    results["stages_s"] = timer.stages
    finish(work, results, clip)


def finish(work: Path, results: dict, clip) -> None:
    (work / "results.json").write_text(
        json.dumps(results, indent=1, ensure_ascii=False, default=str)
    )
    from examples.shapes.report import write_results

    write_results(work, results, results["names"], clip)
    log(f"wrote {work / 'RESULTS.md'}")
    print((work / "RESULTS.md").read_text())


def only_compose(a) -> None:
    """`--only compose`: the composed shift on the world, index and results of an earlier
    run in the same work folder; the other shifts' figures are kept as they were."""
    from grape_cli.models import load_clip

    work = a.workdir.resolve()
    try:
        results = json.loads((work / "results.json").read_text(encoding="utf-8"))
    except OSError:
        raise SystemExit(f"{work} has no results.json: run the whole example first") from None
    if results["quick"] != a.quick or results["seed"] != a.seed:
        raise SystemExit(f"{work} was built with other settings (quick, seed); run it whole")
    timer = Timer()
    cfg = QUICK if a.quick else FULL
    run_compose(work, cfg, a.seed, a.quick, timer, results)
    stages = {k: v for k, v in results["stages_s"].items() if "compose" not in k}
    results["stages_s"] = {**stages, **timer.stages}
    results["compose_rerun"] = True
    finish(work, results, load_clip(str(work / "retriever"), device="cpu"))


if __name__ == "__main__":
    main()
