"""Rewriters: every kind through the one loader, batched greedy and sampled generation,
tuned folders (merged weights and LoRA adapters), and the errors a bad rewriter gives."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch

from grape_cli.errors import ModelError
from grape_cli.prompt import PromptTemplate, render_prompt
from grape_cli.rewrite import (
    REWRITER_KINDS,
    IdentityRewriter,
    LMRewriter,
    generate_rewrites,
    load_rewriter,
)
from grape_cli.runfolder import RunInfo

# A short prompt keeps the taught sequences short: the tiny LM memorises them in seconds.
SHORT = PromptTemplate(system="", user="find: {query}")
TAUGHT = {
    "red thing left": "a red circle on the left",
    "狗 海滩": '"a dog on a beach"\nSure! Anything else?',  # cleaned to its first line
    "a very long rambling query about my cat who sleeps all day on the old sofa": (
        "a cat sleeping on a sofa"
    ),
    "blank": "",  # an empty generation: the query is used instead, and counted
}
CLEAN = {
    "red thing left": "a red circle on the left",
    "狗 海滩": "a dog on a beach",
    "a very long rambling query about my cat who sleeps all day on the old sofa": (
        "a cat sleeping on a sofa"
    ),
    "blank": "blank",
}


@pytest.fixture(scope="module")
def taught(tiny_lm, tmp_path_factory, teach_lm):
    return teach_lm(tiny_lm, tmp_path_factory.mktemp("lm") / "taught", TAUGHT, SHORT)


def tuned_folder(src, dst, retriever="ViT-B-32:laion2b_s34b_b79k", **raw):
    """A run folder around taught weights (whose exact outputs the tests know), described
    by the run folder's own writer; `raw` overrides fields in the written JSON."""
    shutil.copytree(src, dst)
    info = RunInfo.for_models(
        "Qwen/Qwen2.5-0.5B-Instruct", retriever, reward="rank", prompt=SHORT, max_new_tokens=24
    )
    info.write(dst)
    if raw:
        data = {**json.loads((dst / "grape.json").read_text()), **raw}
        (dst / "grape.json").write_text(json.dumps(data))
    return dst


# --------------------------------------------------------------------------- kinds


def test_none_is_the_query_as_is():
    for spec in (None, "none", "None", ""):
        r = load_rewriter(spec)
        assert isinstance(r, IdentityRewriter) and r.name == "none"
    assert IdentityRewriter().rewrite(["狗 海滩", "x"], n=4) == [["狗 海滩"], ["x"]]


def test_local_folder_batched_greedy_equals_one_by_one_and_is_cleaned(taught, caplog):
    r = load_rewriter(str(taught), prompt=SHORT)
    assert isinstance(r, LMRewriter) and r.prompt == SHORT and r.name == str(taught)
    queries = list(TAUGHT)  # prompts of very different lengths: left padding matters
    with caplog.at_level(logging.WARNING, logger="grape"):
        batched = r.rewrite(queries)
    assert batched == [[CLEAN[q]] for q in queries]
    assert r.fallbacks == 1 and "1 empty rewrite" in caplog.text
    r.batch_size = 1
    assert [r.rewrite([q])[0] for q in queries] == batched


def test_generate_rewrites_raw_and_padding_side_restored(taught):
    from grape_cli.models import load_causal_lm

    model, tok = load_causal_lm(str(taught), "cpu")
    tok.padding_side = "right"  # a caller's tokenizer set up for training
    prompts = [render_prompt(tok, SHORT, q) for q in ("blank", "狗 海滩")]
    assert generate_rewrites(model, tok, prompts) == [[""], ["a dog on a beach"]]
    assert tok.padding_side == "right"
    assert generate_rewrites(model, tok, []) == []


def test_hub_id_loads_through_the_hub_cache(taught, tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub's cache exactly as a download would."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--grape-test--tiny-rewriter"
    shutil.copytree(taught, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    r = load_rewriter("grape-test/tiny-rewriter", prompt=SHORT)
    assert r.name == "grape-test/tiny-rewriter"
    assert r.rewrite(["red thing left"]) == [["a red circle on the left"]]

    start = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_rewriter("grape-test/not-there")
    assert time.perf_counter() - start < 2  # no network retries


def test_sampling_gives_n_per_query_reproducibly(taught):
    r = load_rewriter(str(taught), prompt=SHORT)
    queries = ["red thing left", "狗 海滩"]
    torch.manual_seed(3)
    first = r.rewrite(queries, n=4, temperature=1.5)
    torch.manual_seed(3)
    assert r.rewrite(queries, n=4, temperature=1.5) == first
    assert [len(g) for g in first] == [4, 4]
    assert all(t and "\n" not in t for g in first for t in g)
    # temperature 0 is greedy: n copies of the greedy rewrite
    assert r.rewrite(queries, n=3, temperature=0) == [[CLEAN[q]] * 3 for q in queries]


# --------------------------------------------------------------------------- tuned


def test_tuned_folder_uses_its_own_prompt_and_settings(taught, tmp_path, caplog):
    folder = tuned_folder(taught, tmp_path / "run")
    r = load_rewriter(str(folder), retriever="ViT-B-32:laion2b_s34b_b79k")
    assert r.prompt == SHORT and r.max_new_tokens == 24
    assert r.retriever == "ViT-B-32:laion2b_s34b_b79k"
    assert r.rewrite(["red thing left"]) == [["a red circle on the left"]]
    assert "tuned for" not in caplog.text

    with caplog.at_level(logging.WARNING, logger="grape"):
        r = load_rewriter(str(folder), prompt=PromptTemplate())
    assert "prompt file is ignored" in caplog.text
    assert r.prompt == SHORT


def test_tuned_for_another_retriever_warns_naming_both(taught, tmp_path, tiny_clip, caplog):
    folder = tuned_folder(taught, tmp_path / "run", retriever=str(tiny_clip))
    with caplog.at_level(logging.WARNING, logger="grape"):
        load_rewriter(str(folder), retriever=str(tiny_clip))
    assert "tuned for" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="grape"):
        load_rewriter(str(folder), retriever="ViT-B-32:openai")
    assert str(tiny_clip) in caplog.text and "ViT-B-32:openai" in caplog.text


def test_tuned_lora_adapter_is_applied_to_its_base(tiny_lm, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )  # random B: the adapter changes the output
    folder = tmp_path / "run"
    get_peft_model(base, config).save_pretrained(folder)
    tuned_folder(tiny_lm, tmp_path / "tok")  # tokenizer files come with the run too
    for f in (tmp_path / "tok").glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    (folder / "grape.json").write_text(
        json.dumps(
            {
                "format": "grape-rewriter",
                "format_version": 1,
                "adapter": True,
                "base_model": str(tiny_lm),
                "prompt": SHORT.to_dict(),
            }
        )
    )

    r = load_rewriter(str(folder))
    assert r.base_model == str(tiny_lm)
    ids = r.tokenizer(render_prompt(r.tokenizer, SHORT, "red thing left"), return_tensors="pt")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    with torch.inference_mode():
        got = r.model(**ids).logits
        base_logits = fresh(**ids).logits
        want = PeftModel.from_pretrained(fresh, str(folder))(**ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)


# --------------------------------------------------------------------------- errors


def test_bad_rewriters_fail_with_one_clear_error(taught, tmp_path):
    with pytest.raises(ModelError, match="neither a folder nor a Hub id"):
        load_rewriter(str(tmp_path / "nope"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelError, match="safetensors"):
        load_rewriter(str(pickled))

    wrong = tuned_folder(taught, tmp_path / "wrong", format="something-else")
    with pytest.raises(ModelError, match="not a grape rewriter description"):
        load_rewriter(str(wrong))
    future = tuned_folder(taught, tmp_path / "future", format_version=99)
    with pytest.raises(ModelError, match="format version 99"):
        RunInfo.read(future)
    orphan = tuned_folder(taught, tmp_path / "orphan", adapter=True)
    data = json.loads((orphan / "grape.json").read_text())
    del data["base_model"]
    (orphan / "grape.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="incomplete or malformed"):
        load_rewriter(str(orphan))


def test_every_kind_is_registered_once_and_tried_in_order(taught, tmp_path):
    assert [k.name for k in REWRITER_KINDS] == ["tuned", "vlm", "causal-lm"]
    assert isinstance(load_rewriter("none"), IdentityRewriter)
    run = tuned_folder(taught, tmp_path / "run")
    assert next(k.name for k in REWRITER_KINDS if k.matches(run)) == "tuned"
    assert [k.name for k in REWRITER_KINDS if k.matches(taught)] == ["causal-lm"]


def test_a_real_run_folder_loads_with_its_prompt_and_retriever(trained_run):
    r = load_rewriter(str(trained_run["run"]), retriever=trained_run["retriever"])
    info = RunInfo.read(trained_run["run"])
    assert r.prompt == info.prompt == trained_run["prompt"]
    assert r.retriever == trained_run["retriever"] and r.max_new_tokens == 12
    assert len(r.rewrite(["query 3: a cat on a sofa"])[0]) == 1


def test_remote_code_is_not_run_unless_trusted(taught, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(taught, folder)
    marker = tmp_path / "code-ran"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_type="grape_custom",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelError) as err:
        load_rewriter(str(folder))
    assert "--trust-remote-code" in err.value.hint
    assert not marker.exists()
