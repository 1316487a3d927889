"""Share a tuned rewriter on the Hugging Face Hub: the upload folder, its model card, the push.

Nothing from the user's corpus leaves the machine unless asked. The upload folder is built
from an allow-list of model files and a `grape.json` rebuilt field by field: local folders
become their bare names, paths (pairs, index, output) are dropped, free text outside the
prompt is dropped. A last scan of everything about to be uploaded refuses the push if a
local path, or query text from the run's pairs files, slipped through anyway.

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
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grape_cli.errors import GrapeError, HubError, InputError, UsageError

log = logging.getLogger("grape")

GRAPE_FORMAT = "grape-rewriter"
GRAPE_FORMAT_VERSION = 1
PAPER_ID = "2509.23370"
PAPER_TITLE = "GRAPE: Let GRPO Supervise Query Rewriting by Ranking for Retrieval"
CITATION = """@article{zhang2025grape,
  title   = {GRAPE: Let GRPO Supervise Query Rewriting by Ranking for Retrieval},
  author  = {Zhang, Zhaohua and Zhuo, Jianhuan and Chen, Muxi and Zhao, Chenchen and
             Jiang, Wenyu and Jiang, Tianwen and Chen, Mingyang and Tang, Yu and
             Xiao, Qiuyong and Zhang, Jihong and Su, Zhixun},
  journal = {arXiv preprint arXiv:2509.23370},
  year    = {2025}
}"""

# What a run folder may contribute, besides grape.json and the generated README.md.
# Checkpoints, metrics.jsonl (per-step logs) and any pickled weights never go.
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
MERGED_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")
EXTRA_FILES = ("training.png",)
HELDOUT_FILE = "heldout.jsonl"  # held-out pairs `grape train` keeps: queries, never uploaded
# Remote files a re-push replaces: whatever grape itself writes, so that switching from an
# adapter to merged weights leaves no stale adapter behind. Other files are left alone.
MANAGED_REMOTE = ("*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "training.png")

HUB_TAGS = ["grape", "query-rewriting", "clip", "grpo", "trl", "text-to-image-retrieval"]
METRIC_COLUMNS = (
    ("recall@1", "R@1"),
    ("recall@5", "R@5"),
    ("recall@10", "R@10"),
    ("mrr", "MRR"),
    ("median_rank", "median rank"),
    ("n", "n"),
)
REWARDS = {
    "rank": "the corpus-relative rank reward of GRAPE, 1 - (r - 1)/(N - 1), where r is the "
    "target image's rank among all N images of the collection under the rewritten query. "
    "It depends on the ranking only, so raising every image's similarity at once earns nothing",
    "rank-top": "a top-weighted rank reward, 1/log2(r + 1), where r is the target image's rank "
    "among all images of the collection under the rewritten query: it pays most for the "
    "first page of results",
    "similarity": "the naive reward, the cosine similarity between the rewrite and the target "
    "image. It is prone to score inflation (every image's similarity rises, the ranking "
    "need not) and is kept as the ablation the GRAPE paper argues against",
}

# Settings whose string values name local things (files, folders, queries): never published.
_PATH_WORDS = {"pairs", "index", "path", "paths", "dir", "file", "files", "folder", "out", "output"}
_PATH_WORDS |= {"resume", "queries", "query", "image", "images", "cache", "home"}
_PATH_NAMES = {"eval", "target", "targets", "data", "dataset"}
_MODEL_KEYS = {"base_model", "model", "base", "retriever", "clip", "rewriter"}
_PLAIN = re.compile(r"^[A-Za-z0-9_.+\-:@/,=]{0,80}$")


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


def read_run(run_dir: str | Path) -> dict:
    """The run's grape.json, after checking the folder has what a rewriter repo needs."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"run folder {run} not found", "pass the --out folder of `grape train`")
    meta_path = run / "grape.json"
    if not meta_path.is_file():
        raise InputError(
            f"{run} has no grape.json: it is not a run folder written by `grape train`",
            "pass the --out folder of `grape train`",
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{meta_path} is not valid JSON: {e}".splitlines()[0]) from e
    if not isinstance(meta, dict) or meta.get("format") != GRAPE_FORMAT:
        raise InputError(f"{meta_path} is not a grape rewriter description (format)")
    if int(meta.get("format_version", 0)) > GRAPE_FORMAT_VERSION:
        raise InputError(
            f"{meta_path} has format_version {meta['format_version']}, newer than this grape "
            f"understands ({GRAPE_FORMAT_VERSION})",
            "upgrade grape: pip install -U grape-cli",
        )
    weights = ADAPTER_WEIGHTS if meta.get("adapter") else MERGED_WEIGHTS[:2]
    if not any(_matches(run, p) for p in weights if p.endswith(".safetensors")):
        kind = "LoRA adapter (adapter_model.safetensors)" if meta.get("adapter") else "weights"
        raise InputError(
            f"{run} has no safetensors {kind}",
            "grape publishes safetensors only; re-save the model with save_pretrained",
        )
    if meta.get("adapter") and not (run / "adapter_config.json").is_file():
        raise InputError(f"{run} holds an adapter but no adapter_config.json")
    if not meta.get("adapter") and not any((run / f).is_file() for f in TOKENIZER_FILES[:2]):
        raise InputError(
            f"{run} has no tokenizer (tokenizer.json or tokenizer_config.json)",
            "save the tokenizer into the run folder with save_pretrained",
        )
    return meta


def _matches(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def _upload_sources(run: Path, meta: dict) -> list[Path]:
    patterns = [
        *(ADAPTER_WEIGHTS if meta.get("adapter") else MERGED_WEIGHTS),
        *CONFIG_FILES,
        *TOKENIZER_FILES,
        *EXTRA_FILES,
    ]
    found = {p for pattern in patterns for p in _matches(run, pattern)}
    return sorted(found)


# --------------------------------------------------------------------------- scrubbing


def _looks_local(ref: str) -> bool:
    """A filesystem path rather than a Hub id ('org/name' or a bare legacy name)."""
    if ref.startswith(("/", "~", ".", "local-dir:")) or "\\" in ref or re.match(r"^[A-Za-z]:", ref):
        return True
    name = ref.partition("@")[0]
    return name.count("/") > 1 or Path(ref).expanduser().exists()


def _basename(ref: str) -> str:
    ref = ref.removeprefix("local-dir:")
    return next((p for p in reversed(re.split(r"[\\/]+", ref)) if p), "model")


def public_model_ref(ref: str, retriever: bool = False) -> tuple[str, bool]:
    """(what may be published for a model reference, whether it was a local folder).

    >>> public_model_ref("Qwen/Qwen2.5-0.5B-Instruct")
    ('Qwen/Qwen2.5-0.5B-Instruct', False)
    >>> public_model_ref("/home/ann/models/tiny-lm/")
    ('tiny-lm', True)
    >>> public_model_ref("ViT-B-32:laion2b_s34b_b79k", retriever=True)
    ('ViT-B-32:laion2b_s34b_b79k', False)
    >>> public_model_ref("local-dir:/data/clip", retriever=True)
    ('clip', True)
    """
    if retriever:
        from grape_cli.models import parse_clip_spec

        if parse_clip_spec(ref)[0] != "local":
            return ref, False
        return _basename(ref), True
    return (_basename(ref), True) if _looks_local(ref) else (ref, False)


def _path_key(key: str) -> bool:
    """
    >>> [_path_key(k) for k in ("pairs", "output_dir", "eval", "eval_split", "lora_dropout")]
    [True, True, True, False, False]
    """
    return key.lower() in _PATH_NAMES or bool(_PATH_WORDS & set(re.split(r"[_\-]", key.lower())))


def _public_settings(value: Any, key: str = "") -> Any:
    """Numbers and plain identifiers stay; paths, file names and free text go (None)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            clean = _public_settings(v, str(k))
            if clean is not None or v is None:
                out[str(k)] = clean
        return out
    if isinstance(value, (list, tuple)):
        items = [_public_settings(v, key) for v in value]
        return (
            items
            if all(i is not None or v is None for i, v in zip(items, value, strict=True))
            else None
        )
    if isinstance(value, str):
        if key in _MODEL_KEYS:
            return public_model_ref(value, retriever=key in {"retriever", "clip"})[0]
        if _path_key(key) or _looks_local(value) or not _PLAIN.match(value):
            return None
        return value
    return None


def _public_metrics(value: Any) -> Any:
    """Numbers only; rewriter names that are local folders become bare names."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            clean = _public_metrics(v)
            if clean is not None:
                out[public_model_ref(str(k))[0]] = clean
        return out or None
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return None


def public_grape_json(meta: dict, examples: list[dict] | None = None) -> dict:
    """grape.json as published: the fields a user of the rewriter needs, nothing local."""
    base, base_local = public_model_ref(str(meta.get("base_model") or "unknown"))
    retriever, retriever_local = public_model_ref(
        str(meta.get("retriever") or "unknown"), retriever=True
    )
    # An already-published grape.json keeps its notes (a second pass must not lose them).
    base_local = base_local or meta.get("base_model_note") == "local model"
    retriever_local = retriever_local or meta.get("retriever_note") == "local model"
    prompt = meta.get("prompt") or {}
    out: dict[str, Any] = {
        "format": GRAPE_FORMAT,
        "format_version": GRAPE_FORMAT_VERSION,
        "grape_version": str(meta.get("grape_version", "")),
        "base_model": base,
        "adapter": bool(meta.get("adapter")),
        "retriever": retriever,
        "reward": str(meta.get("reward", "")),
        "prompt": {k: str(prompt[k]) for k in ("system", "user") if k in prompt},
        "generation": _public_settings(meta.get("generation") or {}),
        "settings": _public_settings(meta.get("settings") or {}),
        "metrics": _public_metrics(meta.get("metrics") or {}) or {},
        "created": str(meta.get("created", "")),
    }
    if base_local:
        out["base_model_note"] = "local model"
    if retriever_local:
        out["retriever_note"] = "local model"
    if meta.get("license"):
        out["license"] = str(meta["license"])
    if examples:
        out["examples"] = [{"query": e["query"], "rewrite": e["rewrite"]} for e in examples]
    return out


_PATH_FIELDS = re.compile(r"(name_or_path|_path|_dir|_file)$")


def _is_path(s: str) -> bool:
    """An absolute, home-relative or explicitly relative path (one token, no spaces)."""
    return (
        2 < len(s) < 4096
        and not re.search(r"\s", s)
        and (
            s.startswith(("/", "~", "./", "../", "local-dir:"))
            or bool(re.match(r"^[A-Za-z]:[\\/]", s))
        )
    )


def _scrub_json_paths(value: Any, key: str = "") -> Any:
    """Path fields of a saved config (`_name_or_path`, ...) become bare folder names."""
    if isinstance(value, dict):
        return {k: _scrub_json_paths(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json_paths(v, key) for v in value]
    if isinstance(value, str) and _PATH_FIELDS.search(key) and _is_path(value):
        return _basename(value)
    return value


def base_model_license(base_model: str) -> str | None:
    """The base model's license from its model card, when the card is on this machine."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: Path | None = None
    if _looks_local(base_model):
        readme = Path(base_model).expanduser() / "README.md"
    else:
        from grape_cli.models import split_revision

        repo, revision = split_revision(base_model)
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


# --------------------------------------------------------------------------- model card


def _fmt(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-" if value is None else str(value)
    if key in ("n", "median_rank") and float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}" if key != "median_rank" else f"{value:.1f}"


def _metrics_table(metrics: dict) -> str:
    rows = []
    for stage in ("before", "after"):
        for name, m in (metrics.get(stage) or {}).items():
            if isinstance(m, dict):
                rows.append((stage, name, m))
    if not rows:
        return "No held-out evaluation was recorded for this run."
    cols = [(k, label) for k, label in METRIC_COLUMNS if any(k in m for _, _, m in rows)]
    lines = [
        "| rewriter | | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for stage, name, m in rows:
        cells = " | ".join(_fmt(k, m.get(k)) for k, _ in cols)
        lines.append(f"| `{name}` | {stage} training | {cells} |")
    return "\n".join(lines)


# Settings that say how the run was operated, not how the rewriter was trained (or that the
# card already shows): kept in grape.json, left out of the card's table.
_NOT_TRAINING = {"base_model", "reward", "resume", "strict", "device", "use_vllm", "chunk_size"}
_NOT_TRAINING |= {"trust_remote_code"}


def _settings_table(settings: dict) -> str:
    flat: list[tuple[str, Any]] = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat.append((prefix + k, v))

    walk({k: v for k, v in settings.items() if k not in _NOT_TRAINING and v is not None})
    if not flat:
        return ""
    body = "\n".join(f"| {k} | `{json.dumps(v, ensure_ascii=False)}` |" for k, v in flat)
    return "| setting | value |\n|---|---|\n" + body


def _card_data(g: dict) -> Any:
    from huggingface_hub import ModelCardData

    extra: dict[str, Any] = {}
    local_base = g.get("base_model_note") == "local model"
    if not local_base:
        extra["base_model_relation"] = "adapter" if g.get("adapter") else "finetune"
    tags = [*HUB_TAGS, *(["lora", "peft"] if g.get("adapter") else [])]
    return ModelCardData(
        base_model=None if local_base else g["base_model"].partition("@")[0],
        library_name="peft" if g.get("adapter") else "transformers",
        pipeline_tag="text-generation",
        license=g.get("license"),
        tags=tags,
        **extra,
    )


def render_model_card(grape_json: dict, repo_id: str, revision: str | None = None) -> str:
    """The README.md of a pushed rewriter: Hub metadata, then what it is and how it did.

    `grape_json` may be the run's own grape.json: it is made public here first.
    """
    g = public_grape_json(grape_json, grape_json.get("examples"))
    spec = f"{repo_id}@{revision}" if revision and revision != "main" else repo_id
    name = repo_id.split("/")[-1]
    base, retriever = g["base_model"], g["retriever"]
    base_local = g.get("base_model_note") == "local model"
    retriever_local = g.get("retriever_note") == "local model"
    reward = g.get("reward") or "unknown"
    best = (g.get("metrics") or {}).get("best_step")

    form = (
        f"a LoRA adapter on `{base}` (loaded on top of the base model)"
        if g["adapter"]
        else f"full weights, fine-tuned from `{base}`"
    )
    if base_local:
        form += " (a local model of the author's, not on the Hub)"
    retriever_line = (
        f"`{retriever}`, a local open_clip model of the author's that is not on the Hub; "
        "the rewriter is meant for an index built with that same model"
        if retriever_local
        else f"the open_clip retriever `{retriever}`: build your index with it"
    )
    index_model = f"path/to/{retriever}" if retriever_local else retriever
    training = [
        f"- Base model: {form}.",
        f"- Reward: `{reward}`, {REWARDS.get(reward, 'as recorded in grape.json')}.",
        "- Trainer: GRPO (TRL's `GRPOTrainer`), the retriever frozen.",
    ]
    if best is not None:
        training.append(f"- Kept checkpoint: step {best} (best held-out Recall@10).")
    if g.get("grape_version"):
        training.append(f"- grape {g['grape_version']}, created {g.get('created') or '-'}.")
    settings = _settings_table(g.get("settings") or {})
    if settings:
        training += ["", settings]

    examples = g.get("examples") or []
    examples_md = ""
    if examples:
        rows = "\n".join(f"| {_cell(e['query'])} | {_cell(e['rewrite'])} |" for e in examples)
        examples_md = (
            "\n## Examples\n\nQueries from the author's own pairs, published on "
            "purpose (`--include-examples`), with this rewriter's greedy rewrite.\n\n"
            f"| query | rewrite |\n|---|---|\n{rows}\n"
        )

    limitations = [
        "- It is tuned for one retriever and one photo collection. Its rewrites use the words "
        "that retriever ranks well; with another retriever they are ordinary captions, with "
        "no guarantee.",
        "- The figures above come from the author's own held-out pairs"
        + (f" (n = {_first_n(g)})" if _first_n(g) else "")
        + ", which are not published; expect different numbers on another collection.",
        "- A rewriter can drop or invent details (colour, count, position) and inherits the "
        "base model's gaps in languages and knowledge. Look at the rewrite, which "
        "`grape search` prints above the results.",
        "- Each search runs one LLM generation before the retriever: it adds latency.",
        "- The base model's license, terms and limitations apply to this model.",
    ]
    if g["adapter"] and base_local:
        limitations.append(
            f"- This adapter needs the author's local base model `{base}`, which is not on the "
            "Hub: it cannot be loaded without it."
        )

    body = f"""
# {name}

A query rewriter for CLIP image search, tuned with grape (`pip install grape-cli`) following
"{PAPER_TITLE}" ([arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID})).

## What it does

It turns a search query (in another language, long and rambling, or worded unlike an image
caption) into one short English caption in the style the retriever below understands, so
that the retriever ranks the wanted image higher. It was fine-tuned with GRPO, rewarded by
how high the frozen retriever ranks the target image among a whole photo collection.

## Retriever

Tuned for {retriever_line}. The rewrites were optimised against that retriever's text
encoder: use the two together.

## Evaluation

Held-out query/target pairs from the author's collection. Recall@k: share of queries whose
target image is in the top k of the whole collection; MRR: mean reciprocal rank; median rank
of the target (lower is better).

{_metrics_table(g.get("metrics") or {})}

## Training

{chr(10).join(training)}
{examples_md}
## How to use

With grape (`pip install grape-cli`), on an index built with the retriever above:

```bash
grape index ~/Pictures --model {index_model}
grape search "一只在海滩上奔跑的狗" --rewriter {spec}
grape eval pairs.jsonl --rewriter none --rewriter {spec}
```

With transformers alone (the prompt is the one it was tuned with; it is also in
`grape.json`):

```python
{_transformers_snippet(g, repo_id, revision)}
```

## Limitations

{chr(10).join(limitations)}

## Citation

```bibtex
{CITATION}
```
"""
    return f"---\n{_card_data(g).to_yaml()}\n---\n{body}"


def _transformers_snippet(g: dict, repo_id: str, revision: str | None) -> str:
    """Plain transformers (or peft) code that prompts the model exactly as grape does."""
    prompt = g.get("prompt") or {}
    max_new = (g.get("generation") or {}).get("max_new_tokens", 48)
    if g["adapter"]:
        load = (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f'repo = "{repo_id}"\n'
            "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(repo)"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'repo = "{repo_id}"\n'
            "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
            "model = AutoModelForCausalLM.from_pretrained(repo)"
        )
    if revision and revision != "main":
        load = load.replace(
            "from_pretrained(repo)", f'from_pretrained(repo, revision="{revision}")'
        )
    messages = []
    if prompt.get("system"):
        messages.append(
            f'    {{"role": "system", "content": {json.dumps(prompt["system"], ensure_ascii=False)}}},'
        )
    user = json.dumps(prompt.get("user", "{query}"), ensure_ascii=False)
    messages.append(f'    {{"role": "user", "content": {user}.replace("{{query}}", query)}},')
    return "\n".join(
        [
            load,
            "",
            'query = "一只在海滩上奔跑的狗"  # any language, any length',
            "messages = [",
            *messages,
            "]",
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
            f"out = model.generate(**inputs, max_new_tokens={max_new}, do_sample=False)",
            'rewrite = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], '
            "skip_special_tokens=True)",
            'print(rewrite.strip().split("\\n")[0])  # the query to give the CLIP retriever',
        ]
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _first_n(g: dict) -> int | None:
    for stage in ("after", "before"):
        for m in ((g.get("metrics") or {}).get(stage) or {}).values():
            if isinstance(m, dict) and isinstance(m.get("n"), int):
                return m["n"]
    return None


# --------------------------------------------------------------------------- examples


def collect_examples(
    run_dir: str | Path, meta: dict, n: int, examples_from: str | Path | None = None
) -> list[dict]:
    """n (query, greedy rewrite) pairs from the run's held-out (else training) pairs."""
    from grape_cli.pairs import load_pairs
    from grape_cli.rewrite import load_rewriter

    source = Path(examples_from) if examples_from else _pairs_file(Path(run_dir), meta)
    if source is None:
        raise UsageError(
            "--include-examples: the run does not name a pairs file that exists here",
            "add --examples-from PAIRS to pick the queries",
        )
    queries = list(dict.fromkeys(p.query for p in load_pairs(source)))[:n]
    rewriter = load_rewriter(str(Path(run_dir)))
    rewrites = rewriter.rewrite(queries)
    return [
        {"query": q, "rewrite": r[0] if r else ""} for q, r in zip(queries, rewrites, strict=True)
    ]


def _pairs_file(run: Path, meta: dict) -> Path | None:
    if (run / HELDOUT_FILE).is_file():  # the held-out split `grape train` keeps
        return run / HELDOUT_FILE
    settings = meta.get("settings") or {}
    for key in ("eval", "eval_pairs", "pairs", "train_pairs"):
        value = settings.get(key)
        if isinstance(value, str) and value:
            for candidate in (Path(value).expanduser(), run / value):
                if candidate.is_file():
                    return candidate
    return None


def _local_strings(value: Any) -> set[str]:
    """Every path-looking string (values and keys) in a grape.json: none may be published."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            found |= _local_strings(k) | _local_strings(v)
    elif isinstance(value, list):
        for v in value:
            found |= _local_strings(v)
    elif isinstance(value, str) and (
        _is_path(value)
        or (not re.search(r"\s", value) and "/" in value and Path(value).expanduser().exists())
    ):
        path = value.removeprefix("local-dir:")
        found.add(path.rstrip("/\\"))
        if not path.startswith(("/", "~")) and not re.match(r"^[A-Za-z]:", path):
            found.add(str(Path(path).expanduser().resolve()))
    return {s for s in found if len(s) > 2}


def _pair_queries(run: Path, meta: dict) -> set[str]:
    """Queries of every pairs file the run names or holds, to check none is published."""
    from grape_cli.pairs import load_pairs

    settings = meta.get("settings") or {}
    named = [v for k, v in settings.items() if isinstance(v, str) and v and _path_key(k)]
    queries: set[str] = set()
    for value in [*named, *map(str, run.glob("*.jsonl"))]:
        for candidate in (Path(value).expanduser(), run / value):
            if candidate.is_file():
                with contextlib.suppress(GrapeError):  # not a pairs file after all
                    queries |= {p.query for p in load_pairs(candidate)}
                break
    # Very short queries ("dog") also occur in ordinary card text; they reveal little.
    return {q for q in queries if len(q.strip()) >= 8}


# An absolute path with at least two parts, not inside a URL ('https://a/b' or '~/Pictures').
_ABS_PATH = re.compile(r"(?<![\w.:/~])/(?:[^\s/\"'`]+/)+[^\s/\"'`]+|\b[A-Za-z]:\\\\?[^\s\"']+")


def _privacy_scan(folder: Path, forbidden_paths: set[str], queries: set[str]) -> None:
    """Refuse to publish a file that still holds a local path or a training query."""
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            text = _safetensors_header(f)
        elif f.suffix in {".json", ".md", ".txt", ".jinja", ".model"}:
            text = f.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        found = next((s for s in forbidden_paths if s in text), None)
        if found is None and f.name in {"grape.json", "README.md"}:
            match = _ABS_PATH.search(text)  # what grape wrote itself: no path of any kind
            found = match.group(0) if match else None
        if found:
            raise HubError(
                f"refusing to publish: {f.name} contains the local path {found}",
                "remove it from the run folder's files or prompt, or report a grape bug",
            )
        if f.name in {"grape.json", "README.md"}:
            for q in queries:
                if q in text:
                    raise HubError(
                        f"refusing to publish: {f.name} contains a query from your pairs",
                        "remove it from the prompt or settings, or report this as a grape bug",
                    )


def _safetensors_header(path: Path) -> str:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return ""
        (size,) = struct.unpack("<Q", raw)
        return fh.read(min(size, 100_000_000)).decode("utf-8", errors="replace")


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
    meta = read_run(run)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty", "pass a new folder")
    if out == run or run in out.parents:
        raise UsageError("the output folder must not be inside the run folder")

    if meta.get("adapter") and _looks_local(str(meta.get("base_model", ""))):
        log.warning(
            "the adapter's base model is a local folder: people who download it will not be "
            "able to load it; merge the adapter (train without --lora) to share it"
        )
    examples = (
        collect_examples(run, meta, include_examples, examples_from) if include_examples else []
    )
    public = public_grape_json(meta, examples)
    if "license" not in public and meta.get("base_model"):
        lic = base_model_license(str(meta["base_model"]))
        if lic:
            public["license"] = lic

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for src in _upload_sources(run, meta):
            dst = staging / src.name
            if src.suffix == ".json" and src.name not in {
                "tokenizer.json",
                "model.safetensors.index.json",
            }:
                data = json.loads(src.read_text(encoding="utf-8"))
                dst.write_text(json.dumps(_scrub_json_paths(data), indent=2, ensure_ascii=False))
            else:
                _place(src, dst)
        (staging / "grape.json").write_text(
            json.dumps(public, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (staging / "README.md").write_text(
            render_model_card(public, repo_id, revision), encoding="utf-8"
        )
        forbidden = _local_strings(meta) | {str(run)}
        home = str(Path.home())
        if len(home) >= 5:
            forbidden.add(home)
        _privacy_scan(staging, forbidden, set() if examples else _pair_queries(run, meta))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _listing(out)


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
) -> PushResult:
    """Publish a tuned rewriter as one Hub commit, or with `dry_run` write the folder only.

    The token comes from HF_TOKEN or the huggingface_hub login and is only handed to
    huggingface_hub. Failures raise HubError with one line; the repo is created with
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
        meta = json.loads((folder / "grape.json").read_text(encoding="utf-8"))
        message = commit_message or (
            f"grape rewriter: reward {meta['reward']}, retriever {meta['retriever']}"
        )
        info, deleted = _upload(folder, files, repo_id, token, private, revision, message)
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


def _upload(folder, files, repo_id, token, private, revision, message):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=_endpoint(), token=token)
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
