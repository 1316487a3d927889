"""Share a tuned rewriter on the Hugging Face Hub: the upload folder and the push.

What is published is decided by allow-lists: the model files below, and
`RunInfo.public()` for `grape.json` and the model card (`grape_cli.card`). Nothing from
the user's corpus leaves the machine unless asked (`--include-examples`; even then a
composed query's reference image is only named, never uploaded), and
`grape_cli.privacy` scans everything about to be uploaded as a second line of defence.

Loading works the other way round through `grape_cli.models.resolve_lm_folder`: a pushed
repo, or its `--dry-run` folder, is the same folder a Hub snapshot produces.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grape_cli.errors import GrapeError, HubError, InputError, UsageError
from grape_cli.runfolder import RunInfo

log = logging.getLogger("grape")

# What a run folder may contribute, besides grape.json and the generated README.md.
# Checkpoints, metrics.jsonl (per-step logs), grape.local.json and pickles never go.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What a transformers processor saves beside its tokenizer files (a vision-language
# rewriter's image and video preprocessing); chat templates are in TOKENIZER_FILES.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
MERGED_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")
EXTRA_FILES = ("training.png",)
HELDOUT_FILE = "heldout.jsonl"  # held-out pairs `grape train` keeps: queries, never uploaded
# Remote files a re-push replaces: whatever grape itself writes, so that switching from an
# adapter to merged weights leaves no stale adapter behind. Other files are left alone.
MANAGED_REMOTE = ("*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "training.png")


# --------------------------------------------------------------------------- results


@dataclass
class PushResult:
    """What was (or, with a dry run, would be) uploaded: paths relative to the repo root."""

    repo_id: str
    files: list[tuple[str, int]]
    dry_run: bool
    folder: str | None = None  # the dry-run folder
    revision: str | None = None
    private: bool = False
    url: str | None = None
    commit: str | None = None
    deleted: list[str] = field(default_factory=list)  # stale remote files the commit removed

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [{"path": p, "bytes": s} for p, s in self.files]
        d["total_bytes"] = self.total_bytes
        return d


# --------------------------------------------------------------------------- run folder


def read_run(run_dir: str | Path) -> RunInfo:
    """The run's description, after checking the folder has what a rewriter repo needs."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"run folder {run} not found", "pass the --out folder of `grape train`")
    try:
        info = RunInfo.read(run)
    except GrapeError as e:  # the same problem, reported as bad input to `grape push`
        raise InputError(e.message, e.hint) from None
    weights = ADAPTER_WEIGHTS if info.adapter else MERGED_WEIGHTS[:2]
    if not any(_matches(run, p) for p in weights if p.endswith(".safetensors")):
        kind = "LoRA adapter (adapter_model.safetensors)" if info.adapter else "weights"
        raise InputError(
            f"{run} has no safetensors {kind}",
            "grape publishes safetensors only; re-save the model with save_pretrained",
        )
    if info.adapter and not (run / "adapter_config.json").is_file():
        raise InputError(f"{run} holds an adapter but no adapter_config.json")
    if not info.adapter and not any((run / f).is_file() for f in TOKENIZER_FILES[:2]):
        raise InputError(
            f"{run} has no tokenizer (tokenizer.json or tokenizer_config.json)",
            "save the tokenizer into the run folder with save_pretrained",
        )
    if (
        info.vision
        and not info.adapter
        and not any((run / f).is_file() for f in PROCESSOR_FILES[:2])
    ):
        raise InputError(
            f"{run} is a vision-language rewriter without its processor "
            f"({' or '.join(PROCESSOR_FILES[:2])}): AutoProcessor could not load it",
            "save the processor into the run folder with processor.save_pretrained",
        )
    return info


def _matches(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def _upload_sources(run: Path, info: RunInfo) -> list[Path]:
    patterns = [
        *(ADAPTER_WEIGHTS if info.adapter else MERGED_WEIGHTS),
        *CONFIG_FILES,
        *TOKENIZER_FILES,
        *(PROCESSOR_FILES if info.vision else ()),
        *EXTRA_FILES,
    ]
    return sorted({p for pattern in patterns for p in _matches(run, pattern)})


def base_model_license(info: RunInfo, run: Path) -> str | None:
    """The base model's license from its model card, when the card is on this machine."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from grape_cli.models import split_revision

    readme: Path | None = None
    if info.base_model_local:
        path = info.local.base_model_path
        readme = Path(path) / "README.md" if path else None
    else:
        repo, revision = split_revision(info.base_model)
        try:
            cached = try_to_load_from_cache(repo, "README.md", revision=revision)
        except Exception:  # a malformed id: there is simply no card to read
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        lic = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:
        return None
    return lic if isinstance(lic, str) and lic else None


# --------------------------------------------------------------------------- examples


def collect_examples(
    run_dir: str | Path, info: RunInfo, n: int, examples_from: str | Path | None = None
) -> list[dict]:
    """n (query, greedy rewrite) pairs from the run's held-out (else training) pairs."""
    from grape_cli.pairs import load_pairs
    from grape_cli.rewrite import load_rewriter

    run = Path(run_dir)
    candidates = [examples_from, run / HELDOUT_FILE, info.local.eval_pairs, info.local.pairs]
    source = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if source is None:
        raise UsageError(
            "--include-examples: the run names no pairs file that exists here",
            "add --examples-from PAIRS to pick the queries",
        )
    queries = list(dict.fromkeys(p.query for p in load_pairs(source)))[:n]
    rewrites = load_rewriter(str(run)).rewrite(queries)
    # A composed query's reference image is named, never sent: `RunInfo.public()` keeps
    # only its bare file name.
    return [
        {"query": q.text, "rewrite": r[0] if r else "", **({"image": q.image} if q.image else {})}
        for q, r in zip(queries, rewrites, strict=True)
    ]


# --------------------------------------------------------------------------- upload folder


def _place(src: Path, dst: Path) -> None:
    # Hard links make a multi-GB staging folder free; across filesystems, copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _listing(folder: Path) -> list[tuple[str, int]]:
    return [
        (f.relative_to(folder).as_posix(), f.stat().st_size)
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    ]


def build_upload_folder(
    run_dir: str | Path,
    out_dir: str | Path,
    repo_id: str,
    include_examples: int = 0,
    *,
    examples_from: str | Path | None = None,
    revision: str | None = None,
) -> list[tuple[str, int]]:
    """Write exactly what `grape push` uploads into `out_dir` (new or empty); returns
    (relative path, bytes) for each file.
    """
    check_repo_id(repo_id)
    if include_examples < 0:
        raise UsageError("--include-examples must be 0 or more")
    run = Path(run_dir).expanduser().resolve()
    info = read_run(run)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty", "pass a new folder")
    if out == run or run in out.parents:
        raise UsageError("the output folder must not be inside the run folder")
    if info.adapter and info.base_model_local:
        log.warning(
            "the adapter's base model is a local folder: people who download it will not be "
            "able to load it; merge the adapter (train without --lora) to share it"
        )
    if include_examples:
        info.examples = collect_examples(run, info, include_examples, examples_from)
    info.license = info.license or base_model_license(info, run)
    public = info.public()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _stage(run, info, staging, public, repo_id, revision)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _listing(out)


def _stage(run: Path, info: RunInfo, staging: Path, public: dict, repo_id, revision) -> None:
    from grape_cli.card import render_model_card
    from grape_cli.privacy import forbidden_strings, pair_queries, privacy_scan, scrub_json_paths

    for src in _upload_sources(run, info):
        dst = staging / src.name
        if src.suffix == ".json" and src.name not in {
            "tokenizer.json",
            "model.safetensors.index.json",
        }:
            data = json.loads(src.read_text(encoding="utf-8"))
            dst.write_text(json.dumps(scrub_json_paths(data), indent=2, ensure_ascii=False))
        else:
            _place(src, dst)
    (staging / "grape.json").write_text(
        json.dumps(public, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (staging / "README.md").write_text(
        render_model_card(public, repo_id, revision), encoding="utf-8"
    )
    queries = set() if info.examples else pair_queries(info, run)
    privacy_scan(staging, forbidden_strings(info, run), queries)


def check_repo_id(repo_id: str) -> None:
    """'owner/name' with the Hub's characters; raise UsageError otherwise."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]{0,95}", repo_id or "") or (
        ".." in repo_id or repo_id.endswith((".git", "."))
    ):
        raise UsageError(
            f"{repo_id!r} is not a Hub repo id",
            "pass REPO_ID as owner/name, e.g. your-name/grape-rewriter",
        )


# --------------------------------------------------------------------------- push


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _hub_error(e: BaseException, repo_id: str, token: str) -> HubError:
    """One line for whatever the Hub client raised; the token never appears in it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    retry = "the upload is one commit, so re-running `grape push` is safe"
    if isinstance(e, OfflineModeIsEnabled):
        return HubError(
            "cannot push: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE (or use --dry-run DIR)"
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError(
                "the Hugging Face Hub rejected the token (401 Unauthorized)",
                "set HF_TOKEN to a valid token with write access, or run `hf auth login`",
            )
        if status == 403:
            return HubError(
                f"not allowed to write to {repo_id} (403 Forbidden): it belongs to someone "
                "else, or the token is read-only",
                "push to your own namespace (your-name/...) or use a token with write access",
            )
        if status == 404:
            return HubError(
                f"{repo_id} or its namespace was not found, or the token cannot see it (404)",
                "check the owner name and that the token may write there",
            )
        first = str(e).replace(token, "***").splitlines()[0] if str(e) else type(e).__name__
        return HubError(f"the Hub refused the push ({status}): {first}", retry)
    reason = str(e).replace(token, "***").splitlines()[0] if str(e) else ""
    return HubError(
        f"could not reach the Hugging Face Hub at {_endpoint()}: {type(e).__name__}"
        + (f": {reason}" if reason else ""),
        f"check your network; {retry}",
    )


def _stale_files(api, repo_id: str, revision: str | None, keep: set[str]) -> list[str]:
    remote = api.list_repo_files(repo_id, revision=revision)
    return sorted(
        f
        for f in remote
        if f not in keep
        and "/" not in f
        and any(fnmatch.fnmatch(f, p) for p in MANAGED_REMOTE)
        and f != ".gitattributes"
    )


def push_rewriter(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: str | Path | None = None,
    include_examples: int = 0,
    examples_from: str | Path | None = None,
    api=None,
) -> PushResult:
    """Publish a tuned rewriter as one Hub commit, or with `dry_run` write the folder only.

    The token comes from HF_TOKEN or the huggingface_hub login and is only handed to
    huggingface_hub. `api` replaces `huggingface_hub.HfApi` (a stand-in, in tests). Failures raise HubError with one line; the repo is created with
    exist_ok and the files go in a single commit, so a re-run repairs any failure.
    """
    check_repo_id(repo_id)
    if dry_run is not None:
        files = build_upload_folder(
            run_dir,
            dry_run,
            repo_id,
            include_examples,
            examples_from=examples_from,
            revision=revision,
        )
        return PushResult(
            repo_id=repo_id,
            files=files,
            dry_run=True,
            folder=str(Path(dry_run).expanduser().resolve()),
            revision=revision,
            private=private,
        )

    from huggingface_hub import constants, get_token

    from grape_cli.models import hub_offline

    read_run(run_dir)  # a bad run folder is reported before anything touches the network
    if hub_offline() or constants.is_offline_mode():
        raise HubError(
            "cannot push: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE (or use --dry-run DIR)"
        )
    token = get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: pushing needs one with write access",
            "set HF_TOKEN, or run `hf auth login`",
        )

    with tempfile.TemporaryDirectory(prefix="grape-push-") as tmp:
        folder = Path(tmp) / "upload"
        files = build_upload_folder(
            run_dir,
            folder,
            repo_id,
            include_examples,
            examples_from=examples_from,
            revision=revision,
        )
        public = json.loads((folder / "grape.json").read_text(encoding="utf-8"))
        message = commit_message or (
            f"grape rewriter: reward {public['reward']}, retriever {public['retriever']}"
        )
        info, deleted = _upload(folder, files, repo_id, token, private, revision, message, api)
    return PushResult(
        repo_id=repo_id,
        files=files,
        dry_run=False,
        revision=revision,
        private=private,
        url=getattr(info, "commit_url", None),
        commit=getattr(info, "oid", None),
        deleted=deleted,
    )


def _upload(folder, files, repo_id, token, private, revision, message, api_class=None):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = (api_class or HfApi)(endpoint=_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        deleted = _stale_files(api, repo_id, revision, {p for p, _ in files})
        # create_commit, not upload_folder: with hf_xet installed upload_folder may split a
        # large folder into several commits, and a half-pushed rewriter must never exist.
        ops = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p, _ in files
        ]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deleted]
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except (OfflineModeIsEnabled, HfHubHTTPError, *_network_errors()) as e:
        raise _hub_error(e, repo_id, token) from e
    return info, deleted
