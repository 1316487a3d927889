"""Composed queries (a reference image plus an edit) and vision-language rewriters: the VLM
kind through the same loader as the others, what it is given, search and eval with the
baselines a user has without grape, GRPO training end to end, resume, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from grape_cli.errors import InputError, UsageError
from grape_cli.query import Query
from grape_cli.rewrite import VLMRewriter, encode_vision_prompts, load_rewriter, reads_images
from grape_cli.train import TrainConfig, TrainingInterrupted, train_rewriter

from .conftest import FAST, TRAIN_PROMPT, fake_hub_cache
from .test_train import Recorder

REPO = "someone/tiny-vlm"


def composed(w, i: int) -> Query:
    return Query(f"like this but {['a red circle', 'a green square'][i % 2]}", str(w["refs"][i]))


def test_vlm_loads_as_a_folder_a_hub_id_and_a_run(compose_world, vlm_run, hub_cache):
    w = compose_world
    folder = load_rewriter(str(w["vlm"]), prompt=TRAIN_PROMPT)
    assert isinstance(folder, VLMRewriter) and folder.sees_images
    fake_hub_cache(hub_cache, REPO, w["vlm"])
    hub = load_rewriter(REPO, prompt=TRAIN_PROMPT)  # offline, from the cache stand-in
    assert isinstance(hub, VLMRewriter)
    queries = [composed(w, i) for i in range(3)] + [Query("a red circle")]  # text-only too
    assert hub.rewrite(queries) == folder.rewrite(queries)
    assert folder.rewrite(queries)[0] == ["a red circle"]  # what it was taught
    run = load_rewriter(str(vlm_run["run"]))
    assert isinstance(run, VLMRewriter) and run.prompt == TRAIN_PROMPT
    assert reads_images(str(w["vlm"])) and reads_images(REPO) and reads_images(str(vlm_run["run"]))


def test_the_vlm_is_given_the_reference_image_and_the_text(compose_world, tiny_lm):
    w = compose_world
    rewriter = load_rewriter(str(w["vlm"]), prompt=TRAIN_PROMPT)
    processor = rewriter.tokenizer
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    enc = encode_vision_prompts(processor, TRAIN_PROMPT, [composed(w, 0), Query("plain text")])
    per_row = (enc["input_ids"] == pad).sum(dim=1).tolist()
    merge = processor.image_processor.merge_size**2
    assert per_row == [int(enc["image_grid_thw"].prod()) // merge, 0]  # the image's patches
    assert len(enc["pixel_values"]) == int(enc["image_grid_thw"].prod())
    assert not reads_images(str(tiny_lm))
    with pytest.raises(InputError, match=r"no-such\.png"):
        rewriter.rewrite([Query("x", str(w["root"] / "no-such.png"))])


def test_search_with_a_vlm_searches_its_caption_alone(compose_world):
    from grape_cli.search import Searcher

    w = compose_world
    searcher = Searcher(w["index"], rewriter=str(w["vlm"]), prompt=TRAIN_PROMPT)
    result = searcher.search(composed(w, 0), k=3)
    assert result.rewrites == ["a red circle"] and result.image_weight is None
    caption = searcher.clip.encode_texts(result.rewrites).numpy()[0]
    from grape_cli.store import Store

    _, matrix = Store.open(w["index"]).load_matrix(("path",))
    assert result.hits[0].score == pytest.approx(float((matrix @ caption).max()), abs=1e-5)
    blended = Searcher(w["index"], rewriter="none").search(composed(w, 0), k=1)
    assert blended.image_weight == 1.0  # `none` still blends the image with the text


def test_eval_of_composed_pairs_adds_the_baselines_and_refuses_a_text_rewriter(
    compose_world, vlm_run, tiny_lm, cli
):
    w = compose_world
    r = cli("eval", w["pairs"], "--index", w["index"], "--rewriter", "none",
            "--rewriter", vlm_run["run"], "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {row["rewriter"]: row["metrics"] for row in json.loads(r.stdout)["rows"]}
    assert list(rows) == ["image-only", "text-only", "none", str(vlm_run["run"])]
    assert all(m["n"] == 16 for m in rows.values())
    # image-only is the reference image's own embedding: check one rank by hand.
    from grape_cli.models import load_clip
    from grape_cli.query import encode_image_file
    from grape_cli.ranking import retrieval_metrics, target_ranks
    from grape_cli.store import Store

    store = Store.open(w["index"])
    meta, matrix = store.load_matrix(("path",))
    clip = load_clip(store.model, "cpu")
    vecs = np.concatenate([encode_image_file(clip, str(p)) for p in w["refs"]])
    rows_of = [[meta["path"].index(str(p))] for p in w["photos"]]
    assert rows["image-only"] == retrieval_metrics(target_ranks(vecs, matrix, rows_of))

    r = cli("eval", w["pairs"], "--index", w["index"], "--rewriter", tiny_lm)
    assert r.exit_code == 2 and "reads text only" in r.stderr and "vision-language" in r.stderr


def train_config(w, out, **kw) -> TrainConfig:
    args = dict(pairs=w["pairs"], index=w["index"], base_model=str(w["vlm"]), out=out,
                eval_split=0.25, prompt=TRAIN_PROMPT, learning_rate=1e-3, **FAST)  # fmt: skip
    return TrainConfig(**{**args, **kw})


def test_vlm_grpo_changes_weights_and_writes_a_complete_run(vlm_run):
    run, base = vlm_run["run"], vlm_run["vlm"]
    for name in ("grape.json", "model.safetensors", "metrics.jsonl", "heldout.jsonl",
                 "processor_config.json", "chat_template.jinja", "tokenizer.json"):  # fmt: skip
        assert (run / name).is_file(), name
    info = json.loads((run / "grape.json").read_text())
    assert info["vision"] is True and info["prompt"] == TRAIN_PROMPT.to_dict()
    before, after = load_file(base / "model.safetensors"), load_file(run / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("visual" in k for k in changed) and any(
        k.startswith("model.layers") for k in changed
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(1 <= r["rank_mean"] <= 16 for r in rows[1:])
    held = [json.loads(x) for x in (run / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all("image" in h for h in held)


def test_vlm_training_resumes_after_an_interrupt(compose_world, tmp_path):
    out = tmp_path / "runs" / "r"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3"):
        train_rewriter(train_config(compose_world, out), Recorder(stop_at=3))
    result = train_rewriter(train_config(compose_world, out, resume=True))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and result.best_step in (2, 4)
    assert (out / "processor_config.json").is_file()


def test_vlm_lora_run_loads_on_its_base(compose_world, tmp_path):
    out = tmp_path / "lora"
    train_rewriter(train_config(compose_world, out, lora=True, steps=2, eval_every=2))
    assert (out / "adapter_model.safetensors").is_file()
    rewriter = load_rewriter(str(out))
    assert isinstance(rewriter, VLMRewriter)
    assert len(rewriter.rewrite([composed(compose_world, 0)])[0]) == 1


def test_training_refuses_what_it_cannot_train(compose_world, train_world, tmp_path):
    w = compose_world
    with pytest.raises(UsageError, match="reads text only") as e:
        train_rewriter(train_config(w, tmp_path / "a", base_model=str(train_world["lm"])))
    assert "Qwen2.5-VL" in e.value.hint and not (tmp_path / "a").exists()
    mixed = w["root"] / "mixed.jsonl"  # beside the pairs: the same relative paths
    lines = w["pairs"].read_text().splitlines()
    plain = [
        json.dumps({k: v for k, v in json.loads(x).items() if k != "image"}) for x in lines[:4]
    ]
    mixed.write_text("\n".join(lines[4:] + plain) + "\n")
    with pytest.raises(UsageError, match=r"12 of 16 pairs"):
        train_rewriter(train_config(w, tmp_path / "b", pairs=mixed))


def test_push_dry_run_of_a_vlm_run_loads_like_a_hub_download(vlm_run, tmp_path, hub_cache):
    from huggingface_hub import ModelCard

    from grape_cli.hub import push_rewriter

    push_rewriter(vlm_run["run"], REPO, dry_run=tmp_path / "up")
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert (tmp_path / "up" / "processor_config.json").is_file()
    pngs = {p.name for p in (tmp_path / "up").rglob("*.png")}
    assert pngs <= {"training.png"}, pngs  # the training curve, never a reference image
    fake_hub_cache(hub_cache, REPO, tmp_path / "up")
    hub, local = load_rewriter(REPO), load_rewriter(str(vlm_run["run"]))
    queries = [composed(vlm_run, i) for i in range(4)]
    assert isinstance(hub, VLMRewriter) and hub.rewrite(queries) == local.rewrite(queries)

    # The card's transformers snippet runs as written against the download, and writes
    # what grape's own rewriter writes for the same reference image and edit.
    from PIL import Image

    card_text = (tmp_path / "up" / "README.md").read_text()
    code = card_text.split("```python\n")[1].split("```")[0]
    snapshot = hub_cache / ("models--" + REPO.replace("/", "--")) / "snapshots"
    code = code.replace(f'"{REPO}"', repr(str(next(snapshot.iterdir()))))
    code = code.replace('"ref.jpg"', repr(str(tmp_path / "ref.jpg"))).replace("print(", "out = (")
    Image.open(vlm_run["refs"][0]).convert("RGB").save(tmp_path / "ref.jpg")
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)
    query = Query(scope["query"], str(tmp_path / "ref.jpg"))
    assert scope["out"] == local.rewrite([query])[0][0]
