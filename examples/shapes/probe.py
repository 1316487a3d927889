"""What the retriever pays for each way of naming the background:
`python -m examples.shapes.probe [WORK]`.

GRPO's rewrites of Chinese queries often give the object's colour to the background too
("a large green square in the middle, green background" for a yellow background; the
base rewriter never does). To see whether the reward pays for that, this writes the
retriever's own caption of every held-out zh target with the background named five ways
and evaluates each with `grape eval --rewriter none` on the run's index:

- exact: the right colour; copy: the object's colour; synonym: the base rewriter's
  habit for the right colour (golden for yellow); none: no background; other: a wrong
  colour that is neither the object's nor the background's.

Needs a work folder from `make example` (default examples/shapes/work).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from examples.shapes.rewriter import SYNONYMS
from examples.shapes.run import HERE, grape
from examples.shapes.world import (
    COLORS,
    EN_TEMPLATES,
    Scene,
    fill_template,
    load_scenes,
)

VARIANTS = ("exact", "copy", "synonym", "none", "other")


def background_variants(scene: Scene, rng: random.Random) -> dict[str, str]:
    """The scene in the retriever's first caption template, its background named each way."""
    template = EN_TEMPLATES[0]
    other = rng.choice([c for c in COLORS if c not in (scene.color, scene.background)])
    named = {
        "exact": scene.background,
        "copy": scene.color,
        "synonym": SYNONYMS[scene.background][0],
        "other": other,
    }
    out = {k: fill_template(template, replace(scene, background=v)) for k, v in named.items()}
    out["none"] = fill_template(template.split(",")[0], scene)
    return out


def main(argv: list[str] | None = None) -> None:
    work = Path((argv or sys.argv[1:] or [HERE / "work"])[0]).resolve()
    scenes = {s.file: s for s in load_scenes(work / "corpus")}
    pairs = work / "pairs" / "heldout-zh.jsonl"
    out = work / "probe"
    out.mkdir(exist_ok=True)
    rows: dict[str, list[str]] = {k: [] for k in VARIANTS}
    rng = random.Random(0)
    for line in pairs.read_text(encoding="utf-8").splitlines():
        target = (pairs.parent / json.loads(line)["target"]).resolve()
        for k, query in background_variants(scenes[target.name], rng).items():
            rows[k].append(json.dumps({"query": query, "target": str(target)}))
    for k, lines in rows.items():
        (out / f"background-{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{'background':10s} {'R@1':>6s} {'R@10':>6s} {'MRR':>6s}  (held-out zh targets)")
    for k in VARIANTS:
        report = grape("eval", out / f"background-{k}.jsonl", "--index", work / "index",
                       "--rewriter", "none")  # fmt: skip
        m = report["rows"][0]["metrics"]
        print(f"{k:10s} {m['recall@1']:6.3f} {m['recall@10']:6.3f} {m['mrr']:6.3f}")


if __name__ == "__main__":
    main()
