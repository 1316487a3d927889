"""Progress where no terminal is attached (a log file, CI, nohup): plain lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from grape_cli.cli.progress import LineProgress


def test_line_progress_reports_counts_rate_stats_and_eta():
    out = io.StringIO()
    with LineProgress("step", interval=0, stream=out) as p:
        p.start(4, "training")
        p.advance(1)
        p.update({"step": 1, "reward": 0.5, "rank": 3.25, "heldout_r10": None})
        p.advance(3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("training: 0/4 step (0%)")
    assert any("1/4 step (25%)" in x and "eta" in x for x in lines)
    assert any("reward 0.500, rank 3.2" in x for x in lines)
    assert lines[-1].startswith("training: 4/4 step (100%)") and "eta" not in lines[-1]
    assert sum("4/4 step" in x for x in lines) == 1, "the finished stage is printed once"


def test_line_progress_is_quiet_between_intervals():
    out = io.StringIO()
    p = LineProgress("img", interval=3600, stream=out)
    p.start(1000, "embed")
    for _ in range(999):
        p.advance(1)
    assert len(out.getvalue().splitlines()) == 1  # the start line only, until the end
    p.advance(1)
    p.__exit__(None, None, None)
    assert len(out.getvalue().splitlines()) == 2
    assert out.getvalue().splitlines()[-1].startswith("embed: 1,000/1,000 img (100%)")


def test_grape_index_prints_progress_lines_into_a_log(tmp_path, tiny_clip, photos):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPE_PROGRESS_INTERVAL": "0"}
    log = tmp_path / "index.log"
    with open(log, "w") as f:  # stderr is a file, as under nohup or CI
        r = subprocess.run(
            [sys.executable, "-m", "grape_cli", "index", str(photos), "--model", str(tiny_clip),
             "--index", str(tmp_path / "idx"), "--workers", "0"],
            env=env, stdout=subprocess.DEVNULL, stderr=f,
        )  # fmt: skip
    assert r.returncode == 0, log.read_text()
    assert re.search(r": 16/16 img \(100%\)", log.read_text()), log.read_text()
