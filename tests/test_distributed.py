"""Training across processes: `accelerate launch --cpu --num_processes 2 ... grape train`
writes one run folder from the main process, logs each step once, and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _launch(world, out, *extra, wait=True):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "grape_cli", "train", world["pairs"], "--index", world["index"],
        "--base-model", world["lm"], "--steps", 4, "--eval-every", 2, "--group-size", 4,
        "--queries-per-step", 2, "--max-new-tokens", 12, "--eval-split", 0.25,
        "--prompt-file", world["prompt"], "--out", out, *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run if wait else subprocess.Popen
    kw = {"capture_output": True, "text": True, "timeout": 600} if wait else {}
    return run([str(c) for c in cmd], env=env, start_new_session=True, **kw)


def _steps(folder) -> list[int]:
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_write_one_run_folder_and_resume(train_world, tmp_path):
    out = tmp_path / "run"
    proc = _launch(train_world, out, wait=False)
    metrics = tmp_path / ".run.partial" / "metrics.jsonl"
    checkpoint = tmp_path / ".run.partial" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes
    proc.wait()
    assert not out.exists()

    done = _launch(train_world, out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("grape train:") == 1, "one summary, from the main process"
    assert _steps(out) == [0, 1, 2, 3, 4]
    assert (out / "model.safetensors").is_file() and (out / "grape.json").is_file()
    assert not list(tmp_path.glob(".*.partial"))
