"""The run folder's description: one type writes, reads, validates and versions it."""

from __future__ import annotations

import json

import pytest

from grape_cli.errors import ModelError
from grape_cli.prompt import PromptTemplate
from grape_cli.runfolder import PUBLIC_SETTINGS, LocalFacts, RunInfo


def test_round_trip_keeps_local_facts_out_of_grape_json(tmp_path):
    base = tmp_path / "models" / "my-lm"
    base.mkdir(parents=True)
    info = RunInfo.for_models(
        str(base),
        str(tmp_path / "models" / "my-clip"),
        reward="rank-top",
        prompt=PromptTemplate(system="", user="q: {query}"),
        settings={"steps": 10, "pairs": "/home/ann/pairs.jsonl", "loss_type": "dapo"},
        metrics={"tuned": {"recall@10": 0.5, "n": 4, "secret": "x"}, "best_step": 10},
        local=LocalFacts(pairs="/home/ann/pairs.jsonl", out=str(tmp_path / "run")),
    )
    info.write(tmp_path)
    back = RunInfo.read(tmp_path)
    written = (tmp_path / "grape.json").read_text()
    assert str(tmp_path) not in written and "/home/ann" not in written
    assert back.settings == {"steps": 10, "loss_type": "dapo"}  # only shareable settings
    assert back.local == info.local and back.prompt == info.prompt and back.reward == "rank-top"
    assert back.base_model == "my-lm" and back.base_model_ref(tmp_path) == str(base)
    assert back.retriever == "my-clip" and back.retriever_spec.endswith("models/my-clip")

    public = back.public()
    assert set(public["settings"]) == {"steps", "loss_type"} <= set(PUBLIC_SETTINGS)
    assert public["metrics"] == {"tuned": {"recall@10": 0.5, "n": 4}, "best_step": 10}
    assert "local" not in public and "/home/ann" not in json.dumps(public)
    assert str(tmp_path) not in json.dumps(public)


def test_a_local_base_that_is_gone_is_one_clear_error(tmp_path):
    info = RunInfo.for_models(str(tmp_path / "lm"), "ViT-B-32:openai", reward="rank")
    with pytest.raises(ModelError, match="was a local folder"):
        info.base_model_ref(tmp_path / "run")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "cannot read"),
        ('{"format": "other"}', "not a grape rewriter description"),
        ('{"format": "grape-rewriter", "format_version": 9}', "format version 9"),
        ('{"format": "grape-rewriter", "format_version": 2}', "incomplete or malformed"),
    ],
)
def test_bad_descriptions_fail_with_one_line(tmp_path, text, words):
    (tmp_path / "grape.json").write_text(text)
    with pytest.raises(ModelError, match=words):
        RunInfo.read(tmp_path)
    assert not (tmp_path / "grape.local.json").exists()


def test_vision_flag_round_trips_and_old_files_read_as_text(tmp_path):
    info = RunInfo.for_models("Qwen/Qwen2.5-VL-3B-Instruct", "ViT-B-32:openai", reward="rank")
    assert info.vision is False
    info.vision = True
    info.examples = [
        {"query": "but red", "rewrite": "a red dress", "image": "/home/ann/photos/ref.jpg"},
        {"query": "same, at night", "rewrite": "a street at night", "image": "C:\\me\\st.png"},
        {"query": "a cat", "rewrite": "a cat"},
    ]
    info.write(tmp_path)
    assert json.loads((tmp_path / "grape.json").read_text())["vision"] is True
    back = RunInfo.read(tmp_path)
    assert back.vision is True
    public = back.public()
    assert public["vision"] is True
    assert [e.get("image") for e in public["examples"]] == ["ref.jpg", "st.png", None]
    assert "/home/ann" not in json.dumps(public) and "me\\\\" not in json.dumps(public)

    data = json.loads((tmp_path / "grape.json").read_text())
    del data["vision"]  # a grape.json written before the field existed
    (tmp_path / "grape.json").write_text(json.dumps(data))
    old = RunInfo.read(tmp_path)
    assert old.vision is False and old.public()["vision"] is False
