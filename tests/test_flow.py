"""The three-command flow as the README writes it: index, train, search, with no flag
naming a run: the trained rewriter becomes the index's default and search uses it."""

from __future__ import annotations

import json

from grape_cli.errors import IndexMismatch
from grape_cli.reward import DEFAULT_REWARD
from grape_cli.runfolder import RunInfo


def test_index_train_search_uses_the_trained_rewriter(train_world, tiny_clip, cli, tmp_path):
    w = train_world
    r = cli("index", w["root"] / "photos", "--model", tiny_clip)
    assert r.exit_code == 0, r.output
    r = cli(
        "train", w["pairs"], "--base-model", w["lm"], "--steps", 4, "--eval-every", 2,
        "--group-size", 4, "--queries-per-step", 4, "--max-new-tokens", 12,
        "--eval-split", 0.25, "--prompt-file", w["prompt"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "now the index's default" in r.stdout

    r = cli("search", "夕阳下的猫", "-k", 3)
    assert r.exit_code == 0, r.output
    assert "the index's default" in r.stderr and "rewrite (2" in r.stdout.replace("\n", " ")

    r = cli("search", "夕阳下的猫", "-k", 3, "--rewriter", "none", "--json")
    assert json.loads(r.stdout)["rewriter"] == "none"

    r = cli("rewriters", "--json")
    (entry,) = json.loads(r.stdout)
    assert entry["default"] and entry["reward"] == DEFAULT_REWARD
    assert entry["recall_at_10"] is not None
    assert "*" in cli("rewriters").stdout

    # eval without --rewriter: none and the default, side by side
    r = cli("eval", w["pairs"], "--json")
    assert [row["rewriter"] for row in json.loads(r.stdout)["rows"]] == ["none", entry["path"]]

    # A default tuned for another retriever is refused in one line.
    info = RunInfo.read(entry["path"])
    info.retriever, info.local.retriever_path = "ViT-B-32:openai", None
    info.write(entry["path"])
    r = cli("search", "a cat")
    assert r.exit_code == IndexMismatch.exit_code and "tuned for ViT-B-32:openai" in r.stderr
    assert "Traceback" not in r.output

    assert cli("rewriters", "use", "none").exit_code == 0
    r = cli("search", "a cat", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rewriter"] == "none"
    assert cli("rewriters", "use", "nope").exit_code == 2
    r = cli("rewriters", "rm", entry["name"])
    assert r.exit_code == 0 and not (tmp_path / "x").exists()
    assert json.loads(cli("rewriters", "--json").stdout) == []


def test_train_without_pairs_uses_the_pairs_collected_by_serve(train_world, tiny_clip, cli):
    from grape_cli.feedback import pairs_file
    from grape_cli.store import default_index_dir

    assert cli("index", train_world["root"] / "photos", "--model", tiny_clip).exit_code == 0
    r = cli("train", "--base-model", train_world["lm"])
    assert r.exit_code == 2 and "no collected pairs yet" in r.stderr and "grape serve" in r.stderr
    collected = pairs_file(default_index_dir().resolve())
    collected.write_text(train_world["pairs"].read_text())
    r = cli(
        "train", "--base-model", train_world["lm"], "--steps", 1, "--eval-every", 1,
        "--group-size", 4, "--queries-per-step", 4, "--max-new-tokens", 12,
        "--eval-split", 0.25, "--prompt-file", train_world["prompt"], "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train_pairs"] == 12
