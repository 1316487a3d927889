"""The command line itself: help, `python -m grape_cli`, fast start-up, `grape info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from grape_cli.errors import IndexNotFound, InputError


def test_help_lists_commands(cli):
    r = cli("--help")
    assert r.exit_code == 0
    assert "index" in r.stdout and "info" in r.stdout
    assert "2509.23370" in r.stdout


def test_index_help_documents_options(cli):
    r = cli("index", "--help")
    assert r.exit_code == 0
    for option in ("--index", "--model", "--batch-size", "--workers", "--exclude"):
        assert option in r.stdout, option
    for option in ("--keep-missing", "--device", "--json"):
        assert option in r.stdout, option
    assert "--commit-every" not in r.stdout  # a testing knob, hidden


def test_python_m_grape_cli_starts_without_heavy_imports():
    """`grape --help` must stay fast: no torch, LanceDB or open_clip at start-up."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['grape', '--help']\n"
        "try:\n"
        "    runpy.run_module('grape_cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = {'torch', 'lancedb', 'open_clip', 'transformers', 'trl', 'faiss', 'pyarrow'}\n"
        "print('HEAVY:', sorted(heavy & set(sys.modules)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "index" in r.stdout
    assert "HEAVY: []" in r.stdout


def test_info_after_index(cli, photos, tmp_path, tiny_clip):
    idx = tmp_path / "idx"
    r = cli("index", photos, "--index", idx, "--model", tiny_clip, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    r = cli("info", "--index", idx, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model"] == str(tiny_clip)
    assert (info["dim"], info["schema_version"], info["images"], info["failures"]) == (32, 1, 16, 0)
    assert info["roots"] == [str(photos)]
    assert info["size_bytes"] > 0 and info["updated"]

    r = cli("info", "--index", idx)
    assert r.exit_code == 0
    assert str(tiny_clip) in r.stdout and "16" in r.stdout and "size on disk" in r.stdout


def test_info_uses_grape_index_env(cli, photos, tmp_path, tiny_clip, monkeypatch):
    monkeypatch.setenv("GRAPE_INDEX", str(tmp_path / "via-env"))
    assert cli("index", photos, "--model", tiny_clip, "--json").exit_code == 0
    info = json.loads(cli("info", "--json").stdout)
    assert info["index"] == str(tmp_path / "via-env") and info["images"] == 16


def test_info_without_an_index_names_the_fix(cli, tmp_path):
    r = cli("info", "--index", tmp_path / "nothing-here")
    assert r.exit_code == IndexNotFound.exit_code
    assert "no grape index at" in r.stderr and "grape index PHOTOS_DIR" in r.stderr
    assert "Traceback" not in r.output + r.stderr


def test_index_text_summary(cli, photos, tmp_path, tiny_clip):
    r = cli("index", photos, "--index", tmp_path / "idx", "--model", tiny_clip)
    assert r.exit_code == 0, r.stderr
    for word in ("added", "updated", "moved", "removed", "unchanged", "failed", "images/s"):
        assert word in r.stdout, word
    assert "16" in r.stdout


def test_index_of_a_missing_folder_is_a_usage_error(cli, tmp_path):
    r = cli("index", tmp_path / "no-such-folder", "--index", tmp_path / "idx")
    assert r.exit_code == InputError.exit_code
    assert "is not a folder" in r.stderr
    assert not (tmp_path / "idx").exists()
