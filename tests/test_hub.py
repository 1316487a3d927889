"""`grape push` and loading pushed rewriters: the upload folder, its card, auth failures.

No test reaches the real Hub: failures come from a local HTTP server standing in for it
(or a closed port), a successful push from a recording stand-in for HfApi, and downloads
from a Hub cache laid out on disk exactly as huggingface_hub writes it.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import ModelCard

from grape_cli.card import COMPOSED_EXAMPLE
from grape_cli.errors import HubError, InputError, UsageError
from grape_cli.hub import build_upload_folder, push_rewriter
from grape_cli.runfolder import RunInfo

from .conftest import fake_hub_cache

TOKEN = "hf_grapeTestToken0123456789abcdef"
REPO = "alice/grape-shapes"
MERGED_FILES = {
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "grape.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training.png",
}


def make_run(tmp_path: Path, trained_run: dict, **changes) -> Path:
    """A copy of the real `grape train` run folder, plus what else a run folder may hold
    (none of which may be published); `changes` are set on its RunInfo."""
    run = tmp_path / "runs" / "shapes-rank"
    shutil.copytree(trained_run["run"], run)
    config = json.loads((run / "config.json").read_text())
    config["_name_or_path"] = str(trained_run["lm"])
    (run / "config.json").write_text(json.dumps(config))
    (run / "README.md").write_text(f"base_model: {trained_run['lm']}\n")  # e.g. PEFT's own card
    (run / "pytorch_model.bin").write_bytes(b"pickle")
    (run / "checkpoint-40").mkdir()
    (run / "checkpoint-40" / "model.safetensors").write_bytes(b"x")
    if changes:
        info = RunInfo.read(run)
        for key, value in changes.items():
            setattr(info, key, value)
        info.write(run)
    return run


def queries_of(trained_run: dict) -> list[str]:
    lines = trained_run["pairs"].read_text().splitlines()
    return [json.loads(x)["query"] for x in lines]


def assert_nothing_private(folder: Path, tmp_path: Path, trained_run: dict) -> None:
    secrets = (str(tmp_path), str(trained_run["root"]), *queries_of(trained_run))
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{f.name} leaks {secret!r}"


# --------------------------------------------------------------------------- dry run


def test_dry_run_folder_is_complete_public_and_parses(tmp_path, trained_run):
    run = make_run(tmp_path, trained_run)
    out = tmp_path / "upload"
    result = push_rewriter(run, REPO, dry_run=out)

    assert result.dry_run and result.url is None
    assert {p for p, _ in result.files} == MERGED_FILES
    assert {f.name for f in out.iterdir()} == MERGED_FILES  # exactly the listed files
    assert all(size == (out / p).stat().st_size for p, size in result.files)
    assert_nothing_private(out, tmp_path, trained_run)

    meta = json.loads((out / "grape.json").read_text())
    info = RunInfo.read(run)
    assert meta == info.public()  # exactly the allow-listed public view
    assert meta["base_model"] == "lm" and meta["base_model_local"] is True
    assert meta["retriever"] == "tiny-clip" and meta["retriever_local"] is True
    assert set(meta["settings"]) <= {"reward", "steps", "group_size", "queries_per_step",
        "beta", "learning_rate", "temperature", "max_completion_length", "loss_type", "lora",
        "lora_rank", "eval_split", "eval_every", "negatives", "format_weight", "max_words",
        "seed"}  # fmt: skip
    assert meta["settings"]["steps"] == 4 and meta["settings"]["group_size"] == 4
    assert set(meta["metrics"]) >= {"none", "base", "tuned", "best_step"}
    assert meta["prompt"] == trained_run["prompt"].to_dict()
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "lm"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"grape", "query-rewriting", "clip", "grpo"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local base has no Hub id to point at
    tuned = trained_run["result"]["after"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["recall@10"] == tuned["recall@10"] and results["mrr"] == tuned["mrr"]
    text = card.text
    assert f"| this rewriter | {tuned['recall@1']:.3f} | {tuned['recall@5']:.3f} |" in text
    assert "grape search" in text and f"--rewriter {REPO}" in text
    assert "AutoModelForCausalLM.from_pretrained(repo)" in text
    assert "2509.23370" in text and "Limitations" in text
    assert "tiny-clip" in text and "not on the Hub" in text


def test_a_version_1_run_folder_still_loads_and_publishes_nothing_local(tmp_path, trained_run):
    """grape 0.1.0 wrote local paths into grape.json; they are moved aside on read."""
    run = make_run(tmp_path, trained_run)
    lm, pairs = str(trained_run["lm"]), str(trained_run["pairs"])
    v1 = {
        "format": "grape-rewriter",
        "format_version": 1,
        "grape_version": "0.1.0",
        "base_model": lm,
        "adapter": False,
        "retriever": trained_run["retriever"],
        "reward": "rank",
        "prompt": {"system": "Rewrite the query as a caption.", "user": "Query: {query}"},
        "generation": {"max_new_tokens": 8},
        "settings": {"pairs": pairs, "out": str(run), "steps": 60, "learning_rate": 1e-4},
        "metrics": {
            "before": {"none": {"recall@10": 0.4, "n": 3}, lm: {"recall@10": 0.5, "n": 3}},
            "after": {str(run): {"recall@10": 1.0, "n": 3}},
            "best_step": 40,
        },
    }
    (run / "grape.json").write_text(json.dumps(v1))
    (run / "grape.local.json").unlink()
    info = RunInfo.read(run)
    assert info.base_model == "lm" and info.base_model_local
    assert info.local.base_model_path == lm and info.local.pairs == pairs
    assert info.metrics["tuned"] == {"recall@10": 1.0, "n": 3}
    assert info.metrics["base"]["recall@10"] == 0.5 and info.max_new_tokens == 8
    assert "pairs" not in info.settings and "pairs" not in info.public()["settings"]
    push_rewriter(run, REPO, dry_run=tmp_path / "up")
    assert_nothing_private(tmp_path / "up", tmp_path, trained_run)
    from grape_cli.rewrite import load_rewriter

    assert load_rewriter(str(run)).max_new_tokens == 8


def test_card_metadata_for_a_hub_base_inherits_its_license(tmp_path, trained_run, hub_cache):
    card = "---\nlicense: apache-2.0\n---\n# Qwen\n"
    seed = tmp_path / "qwen-card"
    seed.mkdir()
    (seed / "README.md").write_text(card)
    fake_hub_cache(hub_cache, "Qwen/Qwen2.5-0.5B-Instruct", seed)
    run = make_run(
        tmp_path, trained_run, base_model="Qwen/Qwen2.5-0.5B-Instruct", base_model_local=False
    )

    build_upload_folder(run, tmp_path / "up", REPO, revision="v2")
    data = ModelCard.load(tmp_path / "up" / "README.md").data
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert data.license == "apache-2.0"
    assert data.to_dict()["base_model_relation"] == "finetune"
    meta = json.loads((tmp_path / "up" / "grape.json").read_text())
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and not meta["base_model_local"]
    assert f"--rewriter {REPO}@v2" in (tmp_path / "up" / "README.md").read_text()


def test_adapter_run_uploads_the_adapter_with_its_base_id(tmp_path, trained_run, caplog):
    import numpy as np
    from safetensors.numpy import save_file

    run = make_run(tmp_path, trained_run, adapter=True)
    (run / "model.safetensors").unlink()
    save_file(
        {"lora_A": np.zeros((2, 2), dtype=np.float32)}, str(run / "adapter_model.safetensors")
    )
    (run / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "base_model_name_or_path": str(trained_run["lm"])})
    )
    files = {p for p, _ in build_upload_folder(run, tmp_path / "up", REPO)}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files
    adapter_cfg = json.loads((tmp_path / "up" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "lm"
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "cannot be loaded without it" in card.text
    assert "base model is a local folder" in caplog.text
    assert_nothing_private(tmp_path / "up", tmp_path, trained_run)


def test_examples_only_when_asked(tmp_path, trained_run):
    run = make_run(tmp_path, trained_run)
    build_upload_folder(run, tmp_path / "up", REPO, include_examples=2)
    meta = json.loads((tmp_path / "up" / "grape.json").read_text())
    held = [json.loads(x)["query"] for x in (run / "heldout.jsonl").read_text().splitlines()]
    assert [e["query"] for e in meta["examples"]] == held[:2]
    assert all(isinstance(e["rewrite"], str) and e["rewrite"] for e in meta["examples"])
    card = (tmp_path / "up" / "README.md").read_text()
    assert "## Examples" in card and held[0] in card
    assert str(tmp_path) not in card


def test_privacy_scan_refuses_what_slipped_through(tmp_path, trained_run):
    from grape_cli.prompt import PromptTemplate

    prompt = PromptTemplate(system=f"Files live in {tmp_path}/photos.", user="Query: {query}")
    run = make_run(tmp_path, trained_run, prompt=prompt)
    with pytest.raises(
        HubError, match=r"refusing to publish: (grape.json|README.md) contains the local path"
    ):
        build_upload_folder(run, tmp_path / "up", REPO)
    assert not (tmp_path / "up").exists() and not list(tmp_path.glob(".up.*"))

    query = queries_of(trained_run)[0]
    prompt = PromptTemplate(system=f"Like: {query}", user="Query: {query}")
    run2 = make_run(tmp_path / "b", trained_run, prompt=prompt)
    with pytest.raises(HubError, match="contains a query from your pairs"):
        build_upload_folder(run2, tmp_path / "up", REPO)


def test_bad_inputs(tmp_path, trained_run, tiny_lm):
    run = make_run(tmp_path, trained_run)
    with pytest.raises(UsageError, match="not a Hub repo id"):
        build_upload_folder(run, tmp_path / "up", "no-namespace")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        build_upload_folder(run, tmp_path / "full", REPO)
    with pytest.raises(InputError, match=r"no grape\.json"):
        build_upload_folder(tiny_lm, tmp_path / "up", REPO)
    (run / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no safetensors"):
        build_upload_folder(run, tmp_path / "up", REPO)


def test_cli_dry_run_lists_files_and_sizes(tmp_path, trained_run, cli):
    run = make_run(tmp_path, trained_run)
    result = cli("push", run, REPO, "--dry-run", tmp_path / "up")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.stdout and "kB" in result.stdout
    assert "nothing uploaded" in result.stdout

    result = cli("push", run, REPO, "--dry-run", tmp_path / "up2", "--json")
    data = json.loads(result.stdout)
    assert {f["path"] for f in data["files"]} == MERGED_FILES
    assert data["total_bytes"] == sum(f["bytes"] for f in data["files"])


# --------------------------------------------------------------------------- auth failures


class _Hub(BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers.get("authorization")))
        body = b'{"error": "nope"}'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The Hub client told it is online, with a token, and no stored login of its own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    servers = []

    def serve(status: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
        server.status, server.seen = status, []
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        return server

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _push_fails(cli, run, *extra):
    result = cli("push", run, REPO, *extra)
    assert result.exit_code == HubError.exit_code, result.output
    assert TOKEN not in result.output
    return result.stderr.splitlines()[0]


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "rejected the token (401 Unauthorized)"),
        (403, f"not allowed to write to {REPO} (403 Forbidden): it belongs to someone else"),
    ],
)
def test_push_refused_by_the_hub(tmp_path, trained_run, cli, online, status, message):
    server = online(status)
    line = _push_fails(cli, make_run(tmp_path, trained_run))
    assert message in line
    assert server.seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in server.seen)
    assert not any("commit" in path for _, path, _ in server.seen)  # nothing half-pushed


def test_push_without_network(tmp_path, trained_run, cli, online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = _push_fails(cli, make_run(tmp_path, trained_run))
    assert f"could not reach the Hugging Face Hub at http://127.0.0.1:{port}: ConnectError" in line


def test_push_without_token(tmp_path, trained_run, cli, online, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert "no Hugging Face token" in _push_fails(cli, make_run(tmp_path, trained_run))


def test_push_offline(tmp_path, trained_run, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert "HF_HUB_OFFLINE is set" in _push_fails(cli, make_run(tmp_path, trained_run))


def test_push_is_one_commit_replacing_stale_files(tmp_path, trained_run, online):
    calls = []

    class RecordingApi:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw["private"], kw["exist_ok"]))

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", branch))

        def list_repo_files(self, repo_id, revision=None):
            return [".gitattributes", "adapter_model.safetensors", "notes/mine.txt", "extra.md"]

        def create_commit(self, repo_id, operations, commit_message, revision=None):
            ops = list(operations)
            calls.append(("commit", revision, commit_message))
            adds = {
                op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                for op in ops
                if hasattr(op, "path_or_fileobj")
            }
            deletes = [op.path_in_repo for op in ops if not hasattr(op, "path_or_fileobj")]
            calls.append(("ops", set(adds), deletes, adds["grape.json"]))
            return type(
                "Info", (), {"commit_url": f"https://hub/{repo_id}/commit/abc", "oid": "abc"}
            )()

    run = make_run(tmp_path, trained_run)
    result = push_rewriter(
        run, REPO, private=True, revision="v2", commit_message="first", api=RecordingApi
    )

    assert calls[0] == ("init", TOKEN)
    assert ("create_repo", REPO, True, True) in calls and ("create_branch", "v2") in calls
    commits = [c for c in calls if c[0] == "commit"]
    assert commits == [("commit", "v2", "first")]  # exactly one commit
    _, added, deleted, grape_json = next(c for c in calls if c[0] == "ops")
    assert added == MERGED_FILES and deleted == ["adapter_model.safetensors"]
    assert str(tmp_path).encode() not in grape_json and TOKEN.encode() not in grape_json
    assert result.url.endswith("/commit/abc") and result.deleted == ["adapter_model.safetensors"]


# --------------------------------------------------------------------------- round trip


def test_dry_run_folder_loads_like_a_hub_download(tmp_path, trained_run, hub_cache):
    import torch

    from grape_cli.models import load_causal_lm
    from grape_cli.rewrite import load_rewriter

    run = make_run(tmp_path, trained_run)
    push_rewriter(run, REPO, dry_run=tmp_path / "up")
    snapshot = fake_hub_cache(hub_cache, REPO, tmp_path / "up", refs=("main", "v2", "refs/pr/1"))

    original, _ = load_causal_lm(str(run), "cpu")
    for spec in (REPO, f"{REPO}@v2", f"{REPO}@refs/pr/1"):
        model, tokenizer = load_causal_lm(spec, "cpu")  # snapshot_download, offline, cached
        for (name, a), (_, b) in zip(
            original.state_dict().items(), model.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
        assert tokenizer.chat_template == (run / "chat_template.jinja").read_text()

    tuned = load_rewriter(str(snapshot), retriever=trained_run["retriever"])
    local = load_rewriter(str(run))
    assert tuned.prompt == trained_run["prompt"] and tuned.max_new_tokens == 12
    assert tuned.retriever == "tiny-clip"
    queries = queries_of(trained_run)[:3]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            tuned.model.state_dict().values(), local.model.state_dict().values(), strict=True
        )
    )
    assert tuned.rewrite(queries) == local.rewrite(queries)

    # The card's plain-transformers snippet runs as written (pointed at the snapshot).
    card = (snapshot / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace(f'"{REPO}"', repr(str(snapshot)))
    code = code.replace("print(", "printed = (")
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)
    assert isinstance(scope["printed"], str)


def test_hub_id_loads_as_a_tuned_rewriter(tmp_path, trained_run, hub_cache):
    """`--rewriter user/repo@rev` must read the repo's grape.json (prompt, retriever)."""
    from grape_cli.rewrite import load_rewriter

    push_rewriter(make_run(tmp_path, trained_run), REPO, dry_run=tmp_path / "up")
    fake_hub_cache(hub_cache, REPO, tmp_path / "up", refs=("main", "v2"))
    tuned = load_rewriter(f"{REPO}@v2")
    assert tuned.prompt == trained_run["prompt"]
    assert tuned.retriever == "tiny-clip"


# --------------------------------------------------------------------------- vision-language

VLM_BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
VLM_PROMPT = {"system": "Describe the wanted image in one caption.", "user": "Edit: {query}"}
VLM_FILES = {
    "README.md",
    "grape.json",
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
}
COMPOSED = ("the same dress in red", "this street at night")


def make_vlm_run(tmp_path: Path, vision: bool = True, **changes) -> Path:
    """A stand-in for a vision-language run folder: its grape.json says `vision`, small
    files are named as a processor saves them, and beside them lie what must never leave:
    the composed pairs, their reference images, a checkpoint."""
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    from grape_cli.prompt import PromptTemplate
    from grape_cli.runfolder import LocalFacts

    run = tmp_path / "runs" / "vlm"
    (run / "checkpoint-8").mkdir(parents=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ref.jpg", "street.png", "t1.jpg", "t2.jpg"):
        Image.new("RGB", (8, 8), (200, 20, 20)).save(photos / name)
    Image.new("RGB", (8, 8)).save(run / "ref.jpg")  # a stray image in the run folder
    save_file({"w": np.zeros((2, 2), np.float32)}, str(run / "model.safetensors"))
    (run / "checkpoint-8" / "model.safetensors").write_bytes(b"x")
    local_base = str(tmp_path / "models" / "qwen-vl")
    (run / "config.json").write_text(
        json.dumps({"model_type": "qwen2_5_vl", "_name_or_path": local_base})
    )
    for name in VLM_FILES - {"README.md", "grape.json", "model.safetensors", "config.json"}:
        (run / name).write_text("{}" if name.endswith(".json") else "{{ messages }}")
    pairs = run / "heldout.jsonl"
    pairs.write_text(
        json.dumps({"query": COMPOSED[0], "image": str(photos / "ref.jpg"), "target": "t1.jpg"})
        + "\n"
        + json.dumps({"query": COMPOSED[1], "image": "../../photos/street.png", "target": "t2.jpg"})
        + "\n"
    )
    info = RunInfo.for_models(
        VLM_BASE,
        "ViT-B-32:laion2b_s34b_b79k",
        reward="rank-top",
        vision=vision,
        prompt=PromptTemplate(**VLM_PROMPT),
        metrics={"tuned": {"recall@1": 0.25, "recall@10": 0.75, "mrr": 0.4, "n": 4}},
        local=LocalFacts(pairs=str(pairs), out=str(run)),
    )
    for key, value in changes.items():
        setattr(info, key, value)
    info.write(run)
    return run


def assert_no_image_leaves(folder: Path, tmp_path: Path) -> None:
    images = [p.read_bytes() for p in tmp_path.rglob("*") if p.suffix in (".jpg", ".png")]
    for f in folder.rglob("*"):
        assert f.suffix not in (".jpg", ".jpeg", ".png"), f"{f.name} was uploaded"
        if f.is_file():
            data = f.read_bytes()
            assert str(tmp_path).encode() not in data, f"{f.name} leaks a local path"
            assert not any(img in data for img in images), f"{f.name} holds image bytes"


def test_vlm_dry_run_card_metadata_and_processor_files(tmp_path, hub_cache):
    run = make_vlm_run(tmp_path)
    out = tmp_path / "upload"
    result = push_rewriter(run, REPO, dry_run=out)

    assert {p for p, _ in result.files} == VLM_FILES  # no images, pairs or checkpoints
    assert {f.name for f in out.iterdir()} == VLM_FILES
    assert_no_image_leaves(out, tmp_path)
    meta = json.loads((out / "grape.json").read_text())
    assert meta == RunInfo.read(run).public() and meta["vision"] is True
    assert "examples" not in meta
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "qwen-vl"

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers" and card.data.base_model == VLM_BASE
    text = card.text
    assert f'grape search "{COMPOSED_EXAMPLE}" --image ref.jpg --rewriter {REPO}' in text
    assert "reference image" in text and "AutoModelForCausalLM" not in text
    code = text.split("```python\n")[1].split("```")[0]
    assert "AutoProcessor.from_pretrained(repo)" in code
    assert "AutoModelForImageTextToText.from_pretrained(repo)" in code
    assert 'Image.open("ref.jpg")' in code and '{"type": "image"}' in code
    assert json.dumps(VLM_PROMPT["system"]) in code and '"Edit: {query}"' in code


def test_vlm_card_snippet_runs_with_the_processors_chat_format(tmp_path, hub_cache, monkeypatch):
    """The snippet, run against stand-ins for transformers' Auto classes, hands the
    processor the run's prompt as image and text parts, and the image beside them."""
    import sys
    import types

    import torch
    from PIL import Image

    push_rewriter(make_vlm_run(tmp_path), REPO, dry_run=tmp_path / "up", revision="v2")
    code = (tmp_path / "up" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    seen = {}

    class Processor:
        @classmethod
        def from_pretrained(cls, repo, revision=None):
            seen["processor"] = (repo, revision)
            return cls()

        def apply_chat_template(self, messages, add_generation_prompt):
            seen["messages"] = messages
            return "templated"

        def __call__(self, text, images, return_tensors):
            seen["images"] = [im.size for im in images]
            return {"input_ids": torch.zeros((1, 3), dtype=torch.long)}

        def decode(self, ids, skip_special_tokens):
            return " a red dress\nmore"

    class Model:
        @classmethod
        def from_pretrained(cls, repo, revision=None):
            seen["model"] = (repo, revision)
            return cls()

        def generate(self, input_ids, max_new_tokens, do_sample):
            return torch.zeros((1, 5), dtype=torch.long)

    fake = types.ModuleType("transformers")
    fake.AutoProcessor, fake.AutoModelForImageTextToText = Processor, Model
    monkeypatch.setitem(sys.modules, "transformers", fake)
    Image.new("RGB", (12, 10)).save(tmp_path / "ref.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("print(", "printed = ("), "card-snippet", "exec"), scope)

    assert scope["printed"] == "a red dress"
    assert seen["processor"] == seen["model"] == (REPO, "v2") and seen["images"] == [(12, 10)]
    assert seen["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": VLM_PROMPT["system"]}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"Edit: {COMPOSED_EXAMPLE}"}],
        },
    ]


def test_vlm_adapter_snippet_loads_the_base_then_the_adapter(tmp_path, hub_cache):
    run = make_vlm_run(tmp_path, adapter=True)
    (run / "model.safetensors").rename(run / "adapter_model.safetensors")
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    files = {p for p, _ in build_upload_folder(run, tmp_path / "up", REPO)}
    assert {"adapter_model.safetensors", "processor_config.json"} <= files
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "peft"
    assert f'AutoModelForImageTextToText.from_pretrained("{VLM_BASE}")' in card.text
    assert "PeftModel.from_pretrained(base, repo)" in card.text


def test_vlm_run_without_its_processor_is_refused(tmp_path):
    run = make_vlm_run(tmp_path)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (run / name).unlink()
    with pytest.raises(InputError, match="vision-language rewriter without its processor"):
        build_upload_folder(run, tmp_path / "up", REPO)


def test_vlm_examples_name_the_reference_image_and_never_send_it(tmp_path, hub_cache, monkeypatch):
    asked = []

    class Rewriter:
        def rewrite(self, queries):
            asked.extend(queries)
            return [[f"rewrite of {q.text}"] for q in queries]

    monkeypatch.setattr("grape_cli.rewrite.load_rewriter", lambda spec: Rewriter())
    run = make_vlm_run(tmp_path)
    build_upload_folder(run, tmp_path / "up", REPO, include_examples=2)

    assert [(q.text, Path(q.image).name) for q in asked] == [
        (COMPOSED[0], "ref.jpg"),
        (COMPOSED[1], "street.png"),
    ]  # the rewriter saw the composed queries
    meta = json.loads((tmp_path / "up" / "grape.json").read_text())
    assert meta["examples"] == [
        {"query": COMPOSED[0], "rewrite": f"rewrite of {COMPOSED[0]}", "image": "ref.jpg"},
        {"query": COMPOSED[1], "rewrite": f"rewrite of {COMPOSED[1]}", "image": "street.png"},
    ]
    card = (tmp_path / "up" / "README.md").read_text()
    assert f"| `ref.jpg` + {COMPOSED[0]} | rewrite of {COMPOSED[0]} |" in card
    assert_no_image_leaves(tmp_path / "up", tmp_path)


def test_a_text_run_keeps_its_text_card(tmp_path, hub_cache):
    """vision=False: no processor file goes even if one lies in the folder, and the card is
    the text rewriter's (pipeline text-generation, AutoModelForCausalLM, no --image)."""
    run = make_vlm_run(tmp_path, vision=False)
    files = {p for p, _ in build_upload_folder(run, tmp_path / "up", REPO)}
    assert files == VLM_FILES - {
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    }
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    assert "AutoModelForCausalLM.from_pretrained(repo)" in card.text
    assert "--image" not in card.text and "AutoProcessor" not in card.text
    assert "reference image" not in card.text
    assert json.loads((tmp_path / "up" / "grape.json").read_text())["vision"] is False
