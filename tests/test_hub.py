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

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import ModelCard

from grape_cli.errors import HubError, InputError, UsageError
from grape_cli.hub import (
    build_upload_folder,
    public_grape_json,
    push_rewriter,
    render_model_card,
)

TOKEN = "hf_grapeTestToken0123456789abcdef"
REPO = "alice/grape-shapes"
QUERIES = [
    "a zebra-striped teapot on grandma's windowsill",
    "我家猫在沙发上睡觉的那张照片",
    "the blurry one from the lake trip where the dog jumps in",
]
METRICS = {
    "before": {
        "none": {"recall@1": 0.1, "recall@5": 0.3, "recall@10": 0.4, "mrr": 0.2, "n": 3},
        "BASE": {"recall@1": 0.2, "recall@5": 0.4, "recall@10": 0.5, "mrr": 0.3, "n": 3},
    },
    "after": {"RUN": {"recall@1": 0.667, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.8, "n": 3}},
    "best_step": 40,
    "samples": [QUERIES[0]],  # free text in metrics must not survive
}
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


def make_run(tmp_path: Path, tiny_lm: Path, *, base: str | None = None, **overrides) -> Path:
    """A run folder as `grape train` writes it, full of local paths and private text."""
    private = tmp_path / "private"
    private.mkdir(parents=True, exist_ok=True)
    pairs = private / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"query": q, "target": f"img{i}.jpg"}) + "\n" for i, q in enumerate(QUERIES)
        ),
        encoding="utf-8",
    )
    run = tmp_path / "runs" / "shapes-rank"
    shutil.copytree(tiny_lm, run)
    config = json.loads((run / "config.json").read_text())
    config["_name_or_path"] = str(tiny_lm)
    (run / "config.json").write_text(json.dumps(config))
    (run / "training.png").write_bytes(b"\x89PNG\r\n\x1a\n fake plot")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "sample": QUERIES[0]}) + "\n")
    (run / "README.md").write_text(f"base_model: {tiny_lm}\n")  # e.g. PEFT's own card
    (run / "pytorch_model.bin").write_bytes(b"pickle")
    (run / "checkpoint-40").mkdir()
    (run / "checkpoint-40" / "model.safetensors").write_bytes(b"x")
    base = base or str(tiny_lm)
    meta = {
        "format": "grape-rewriter",
        "format_version": 1,
        "grape_version": "0.1.0",
        "base_model": base,
        "adapter": False,
        "retriever": str(tmp_path / "models" / "shapes-clip"),
        "index_fingerprint": "0123456789abcdef",
        "reward": "rank",
        "prompt": {"system": "Rewrite the query as a caption.", "user": "Query: {query}"},
        "generation": {"max_new_tokens": 8},
        "settings": {
            "pairs": str(pairs),
            "index": str(tmp_path / "grape-home" / "index"),
            "out": str(run),
            "steps": 60,
            "group_size": 4,
            "learning_rate": 1e-4,
            "loss_type": "dapo",
            "base_model": base,
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "query_note": QUERIES[1],
            "eval_split": 0.1,
        },
        "metrics": json.loads(
            json.dumps(METRICS)
            .replace('"BASE"', json.dumps(base))
            .replace('"RUN"', json.dumps(str(run)))
        ),
        "created": "2026-11-27T01:00:00+0000",
    }
    meta.update(overrides)
    (run / "grape.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return run


def assert_nothing_private(folder: Path, tmp_path: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for secret in (str(tmp_path), "/private/", *QUERIES):
                assert secret.encode() not in data, f"{f.name} leaks {secret!r}"


# --------------------------------------------------------------------------- dry run


def test_dry_run_folder_is_complete_public_and_parses(tmp_path, tiny_lm):
    run = make_run(tmp_path, tiny_lm)
    out = tmp_path / "upload"
    result = push_rewriter(run, REPO, dry_run=out)

    assert result.dry_run and result.url is None
    assert {p for p, _ in result.files} == MERGED_FILES
    assert {f.name for f in out.iterdir()} == MERGED_FILES  # exactly the listed files
    assert all(size == (out / p).stat().st_size for p, size in result.files)
    assert_nothing_private(out, tmp_path)

    meta = json.loads((out / "grape.json").read_text())
    assert meta["base_model"] == "tiny-lm" and meta["base_model_note"] == "local model"
    assert meta["retriever"] == "shapes-clip" and meta["retriever_note"] == "local model"
    assert "index_fingerprint" not in meta
    assert meta["settings"] == {
        "steps": 60,
        "group_size": 4,
        "learning_rate": 1e-4,
        "loss_type": "dapo",
        "base_model": "tiny-lm",
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "eval_split": 0.1,
    }
    assert set(meta["metrics"]["before"]) == {"none", "tiny-lm"}
    assert set(meta["metrics"]["after"]) == {"shapes-rank"}
    assert "samples" not in meta["metrics"] and meta["metrics"]["best_step"] == 40
    assert meta["prompt"]["user"] == "Query: {query}"
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "tiny-lm"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"grape", "query-rewriting", "clip", "grpo"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local base has no Hub id to point at
    text = card.text
    assert "| `shapes-rank` | after training | 0.667 | 1.000 | 1.000 | 0.800 |" in text
    assert "grape search" in text and f"--rewriter {REPO}" in text
    assert "AutoModelForCausalLM.from_pretrained(repo)" in text
    assert "2509.23370" in text and "Limitations" in text
    assert "shapes-clip" in text and "not on the Hub" in text


def test_card_metadata_for_a_hub_base_inherits_its_license(tmp_path, tiny_lm, monkeypatch):
    cache = tmp_path / "hf-cache"
    card = "---\nlicense: apache-2.0\n---\n# Qwen\n"
    seed = tmp_path / "qwen-card"
    seed.mkdir()
    (seed / "README.md").write_text(card)
    fake_hub_cache(cache, "Qwen/Qwen2.5-0.5B-Instruct", seed)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    run = make_run(tmp_path, tiny_lm, base="Qwen/Qwen2.5-0.5B-Instruct")

    build_upload_folder(run, tmp_path / "up", REPO, revision="v2")
    data = ModelCard.load(tmp_path / "up" / "README.md").data
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert data.license == "apache-2.0"
    assert data.to_dict()["base_model_relation"] == "finetune"
    meta = json.loads((tmp_path / "up" / "grape.json").read_text())
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and "base_model_note" not in meta
    assert f"--rewriter {REPO}@v2" in (tmp_path / "up" / "README.md").read_text()


def test_adapter_run_uploads_the_adapter_with_its_base_id(tmp_path, tiny_lm, caplog):
    import numpy as np
    from safetensors.numpy import save_file

    run = make_run(tmp_path, tiny_lm, adapter=True)
    (run / "model.safetensors").unlink()
    save_file(
        {"lora_A": np.zeros((2, 2), dtype=np.float32)}, str(run / "adapter_model.safetensors")
    )
    (run / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "base_model_name_or_path": str(tiny_lm)})
    )
    files = {p for p, _ in build_upload_folder(run, tmp_path / "up", REPO)}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files
    adapter_cfg = json.loads((tmp_path / "up" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-lm"
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "cannot be loaded without it" in card.text
    assert "base model is a local folder" in caplog.text
    assert_nothing_private(tmp_path / "up", tmp_path)


def test_render_model_card_scrubs_a_raw_grape_json(tmp_path, tiny_lm):
    meta = json.loads((make_run(tmp_path, tiny_lm) / "grape.json").read_text())
    card = render_model_card(meta, REPO)
    assert str(tmp_path) not in card and not any(q in card for q in QUERIES)
    assert ModelCard(card).data.pipeline_tag == "text-generation"
    assert public_grape_json(public_grape_json(meta)) == public_grape_json(meta)  # idempotent


def test_examples_only_when_asked(tmp_path, tiny_lm):
    run = make_run(tmp_path, tiny_lm)
    build_upload_folder(run, tmp_path / "up", REPO, include_examples=2)
    meta = json.loads((tmp_path / "up" / "grape.json").read_text())
    assert [e["query"] for e in meta["examples"]] == QUERIES[:2]
    assert all(isinstance(e["rewrite"], str) and e["rewrite"] for e in meta["examples"])
    card = (tmp_path / "up" / "README.md").read_text()
    assert "## Examples" in card and QUERIES[0].replace("|", "\\|") in card
    assert str(tmp_path) not in card


def test_privacy_scan_refuses_what_slipped_through(tmp_path, tiny_lm):
    prompt = {"system": f"Files live in {tmp_path}/photos.", "user": "Query: {query}"}
    run = make_run(tmp_path, tiny_lm, prompt=prompt)
    with pytest.raises(
        HubError, match=r"refusing to publish: (grape.json|README.md) contains the local path"
    ):
        build_upload_folder(run, tmp_path / "up", REPO)
    assert not (tmp_path / "up").exists() and not list(tmp_path.glob(".up.*"))

    prompt = {"system": f"Like: {QUERIES[0]}", "user": "Query: {query}"}
    run2 = make_run(tmp_path / "b", tiny_lm, prompt=prompt)
    with pytest.raises(HubError, match="contains a query from your pairs"):
        build_upload_folder(run2, tmp_path / "up", REPO)


def test_bad_inputs(tmp_path, tiny_lm):
    run = make_run(tmp_path, tiny_lm)
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


def test_cli_dry_run_lists_files_and_sizes(tmp_path, tiny_lm, cli):
    run = make_run(tmp_path, tiny_lm)
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
def test_push_refused_by_the_hub(tmp_path, tiny_lm, cli, online, status, message):
    server = online(status)
    line = _push_fails(cli, make_run(tmp_path, tiny_lm))
    assert message in line
    assert server.seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in server.seen)
    assert not any("commit" in path for _, path, _ in server.seen)  # nothing half-pushed


def test_push_without_network(tmp_path, tiny_lm, cli, online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = _push_fails(cli, make_run(tmp_path, tiny_lm))
    assert f"could not reach the Hugging Face Hub at http://127.0.0.1:{port}: ConnectError" in line


def test_push_without_token(tmp_path, tiny_lm, cli, online, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert "no Hugging Face token" in _push_fails(cli, make_run(tmp_path, tiny_lm))


def test_push_offline(tmp_path, tiny_lm, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert "HF_HUB_OFFLINE is set" in _push_fails(cli, make_run(tmp_path, tiny_lm))


def test_push_is_one_commit_replacing_stale_files(tmp_path, tiny_lm, online, monkeypatch):
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

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run = make_run(tmp_path, tiny_lm)
    result = push_rewriter(run, REPO, private=True, revision="v2", commit_message="first")

    assert calls[0] == ("init", TOKEN)
    assert ("create_repo", REPO, True, True) in calls and ("create_branch", "v2") in calls
    commits = [c for c in calls if c[0] == "commit"]
    assert commits == [("commit", "v2", "first")]  # exactly one commit
    _, added, deleted, grape_json = next(c for c in calls if c[0] == "ops")
    assert added == MERGED_FILES and deleted == ["adapter_model.safetensors"]
    assert str(tmp_path).encode() not in grape_json and TOKEN.encode() not in grape_json
    assert result.url.endswith("/commit/abc") and result.deleted == ["adapter_model.safetensors"]


# --------------------------------------------------------------------------- round trip


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, refs=("main",)) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "3" * 40
    snapshot = storage / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_dry_run_folder_loads_like_a_hub_download(tmp_path, tiny_lm, monkeypatch):
    import torch

    from grape_cli.models import load_causal_lm
    from grape_cli.rewrite import load_rewriter

    run = make_run(tmp_path, tiny_lm)
    push_rewriter(run, REPO, dry_run=tmp_path / "up")
    cache = tmp_path / "hf-cache"
    snapshot = fake_hub_cache(cache, REPO, tmp_path / "up", refs=("main", "v2", "refs/pr/1"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    original, _ = load_causal_lm(str(run), "cpu")
    for spec in (REPO, f"{REPO}@v2", f"{REPO}@refs/pr/1"):
        model, tokenizer = load_causal_lm(spec, "cpu")  # snapshot_download, offline, cached
        for (name, a), (_, b) in zip(
            original.state_dict().items(), model.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
        assert tokenizer.chat_template == (tiny_lm / "chat_template.jinja").read_text()

    tuned = load_rewriter(str(snapshot), retriever=str(tmp_path / "models" / "shapes-clip"))
    local = load_rewriter(str(run))
    assert tuned.prompt.system == "Rewrite the query as a caption." and tuned.max_new_tokens == 8
    assert tuned.retriever == "shapes-clip"
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            tuned.model.state_dict().values(), local.model.state_dict().values(), strict=True
        )
    )
    assert tuned.rewrite(QUERIES) == local.rewrite(QUERIES)

    # The card's plain-transformers snippet runs as written (pointed at the snapshot).
    card = (snapshot / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace(f'"{REPO}"', repr(str(snapshot)))
    code = code.replace("print(", "printed = (")
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)
    assert isinstance(scope["printed"], str)


def test_hub_id_loads_as_a_tuned_rewriter(tmp_path, tiny_lm, monkeypatch):
    """`--rewriter user/repo@rev` must read the repo's grape.json (prompt, retriever)."""
    from grape_cli.rewrite import load_rewriter

    push_rewriter(make_run(tmp_path, tiny_lm), REPO, dry_run=tmp_path / "up")
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, REPO, tmp_path / "up", refs=("main", "v2"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    tuned = load_rewriter(f"{REPO}@v2")
    assert tuned.prompt.system == "Rewrite the query as a caption."
    assert tuned.retriever == "shapes-clip"
