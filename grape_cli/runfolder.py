"""The run folder's description, `grape.json`: one type writes, reads, validates and versions it.

A run folder written by `grape train` holds the rewriter (weights or a LoRA adapter and
its tokenizer) plus two descriptions:

- `grape.json` (`RunInfo`): what anyone who uses the rewriter needs: base model,
  retriever, reward, prompt, generation settings, training settings and held-out
  metrics. It holds no machine-local fact, so it can travel with the weights.
- `grape.local.json` (`LocalFacts`): where things were on the machine that trained it
  (the base model's folder, the pairs files, the index, the output folder). Loading uses
  it to find a local base model; it is never published.

`RunInfo.public()` is the explicit allow-list of what `grape push` publishes. Version 1
files (grape 0.1.0), which mixed local paths into `grape.json`, still load: `read`
moves their local facts aside.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grape_cli
from grape_cli.errors import ModelError
from grape_cli.models import is_local_ref, local_name
from grape_cli.prompt import DEFAULT_MAX_NEW_TOKENS, PromptTemplate

FILENAME = "grape.json"
LOCAL_FILENAME = "grape.local.json"
FORMAT = "grape-rewriter"
FORMAT_VERSION = 2

# Training settings a rewriter's user may see: numbers, flags and fixed vocabularies only.
PUBLIC_SETTINGS = (
    "reward",
    "steps",
    "group_size",
    "queries_per_step",
    "beta",
    "learning_rate",
    "temperature",
    "max_completion_length",
    "loss_type",
    "lora",
    "lora_rank",
    "eval_split",
    "eval_every",
    "negatives",
    "format_weight",
    "max_words",
    "seed",
)
# Held-out metrics, by role. Keys are fixed names, never paths.
METRIC_ROLES = ("none", "base", "tuned")
_METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "mrr", "median_rank", "n")
# v1 settings that named local files (moved to LocalFacts on read).
_V1_LOCAL_SETTINGS = ("pairs", "eval_pairs", "index", "out")


@dataclass
class LocalFacts:
    """Where things were on the training machine. Never published."""

    base_model_path: str | None = None  # a local base model's folder (absolute)
    retriever_path: str | None = None  # a local retriever's spec (its folder)
    pairs: str | None = None
    eval_pairs: str | None = None
    index: str | None = None
    out: str | None = None


@dataclass
class RunInfo:
    base_model: str  # a Hub id ('org/name[@rev]'), or the bare name of a local base model
    retriever: str  # the open_clip spec of the index it was tuned against
    reward: str
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    adapter: bool = False  # a LoRA adapter on base_model rather than full weights
    # A vision-language rewriter: it sees a composed query's reference image and is loaded
    # with AutoProcessor + AutoModelForImageTextToText. Files from before it read as False.
    vision: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    base_model_local: bool = False  # base_model is a local folder's name, not on the Hub
    retriever_local: bool = False
    index_fingerprint: str | None = None
    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # {role: {metric: value}, "best_step": ...}
    grape_version: str = grape_cli.__version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    license: str | None = None
    examples: list[dict] = field(default_factory=list)  # published only with --include-examples
    local: LocalFacts = field(default_factory=LocalFacts)

    # ------------------------------------------------------------------ building

    @classmethod
    def for_models(cls, base_model: str, retriever: str, **kw) -> RunInfo:
        """A RunInfo whose local base model is recorded by name here and by path aside."""
        from grape_cli.models import parse_clip_spec

        local = kw.pop("local", None) or LocalFacts()
        base_local = is_local_ref(base_model)
        if base_local:
            local.base_model_path = str(Path(base_model).expanduser().resolve())
        retriever_local = parse_clip_spec(retriever)[0] == "local"
        if retriever_local:
            local.retriever_path = retriever
        return cls(
            base_model=local_name(base_model) if base_local else base_model,
            retriever=local_name(retriever) if retriever_local else retriever,
            base_model_local=base_local,
            retriever_local=retriever_local,
            local=local,
            **kw,
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        """grape.json as written in the run folder (no local facts)."""
        d = asdict(self)
        d.pop("local")
        d["settings"] = {k: v for k, v in self.settings.items() if k in PUBLIC_SETTINGS}
        d["prompt"] = self.prompt.to_dict()
        d["generation"] = {"max_new_tokens": d.pop("max_new_tokens")}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        _write_json(folder / FILENAME, self.to_dict())
        _write_json(folder / LOCAL_FILENAME, asdict(self.local))

    @classmethod
    def read(cls, folder: str | Path) -> RunInfo:
        """The run folder's description, checked; version 1 files are converted."""
        folder = Path(folder)
        path = folder / FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(
                f"{folder} has no {FILENAME}: it is not a run folder written by `grape train`",
                "pass the --out folder of `grape train`",
            ) from None
        except (OSError, ValueError) as e:
            raise ModelError(
                f"cannot read {path}: {e}".splitlines()[0], "re-run `grape train`"
            ) from None
        local = _read_local(folder / LOCAL_FILENAME)
        return cls.from_dict(data, local, where=str(path))

    @classmethod
    def from_dict(
        cls, data: Any, local: LocalFacts | None = None, where: str = FILENAME
    ) -> RunInfo:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fmt = data.get("format") if isinstance(data, dict) else None
            raise ModelError(
                f"{where} is not a grape rewriter description (format {fmt!r})",
                "pass a folder written by `grape train`",
            )
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(
                f"{where} has format version {version}; this grape reads up to {FORMAT_VERSION}",
                "upgrade grape (pip install -U grape-cli)",
            )
        if version == 1:
            data, local = _from_v1(data, local or LocalFacts())
        try:
            gen = data.get("generation") or {}
            return cls(
                base_model=str(data["base_model"]),
                retriever=str(data.get("retriever") or ""),
                reward=str(data.get("reward") or ""),
                prompt=PromptTemplate.from_dict(data.get("prompt")),
                adapter=bool(data.get("adapter")),
                vision=bool(data.get("vision")),
                max_new_tokens=int(gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                base_model_local=bool(data.get("base_model_local")),
                retriever_local=bool(data.get("retriever_local")),
                index_fingerprint=data.get("index_fingerprint"),
                settings=dict(data.get("settings") or {}),
                metrics=dict(data.get("metrics") or {}),
                grape_version=str(data.get("grape_version") or ""),
                created=str(data.get("created") or ""),
                license=data.get("license"),
                examples=list(data.get("examples") or []),
                local=local or LocalFacts(),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"{where} is incomplete or malformed ({type(e).__name__}: {e})",
                "re-run `grape train`, or fix the file",
            ) from None

    # ------------------------------------------------------------------ using

    @property
    def retriever_spec(self) -> str:
        """The retriever as this machine names it (its folder, when it was local here)."""
        return self.local.retriever_path or self.retriever

    def base_model_ref(self, folder: str | Path) -> str:
        """What to load as the base model: a folder saved beside the run, the recorded
        local folder, or the Hub id."""
        beside = Path(folder) / self.base_model
        if self.base_model_local and beside.is_dir():
            return str(beside)
        if self.base_model_local:
            path = self.local.base_model_path
            if path and Path(path).is_dir():
                return path
            raise ModelError(
                f"the run's base model {self.base_model!r} was a local folder"
                + (f" ({path}) that is not here" if path else " not recorded on this machine"),
                f"copy that model into {Path(folder) / self.base_model}",
            )
        return self.base_model

    def public(self) -> dict:
        """What `grape push` publishes: an allow-list of fields, nothing local."""
        out = self.to_dict()
        out["settings"] = {
            k: v for k, v in self.settings.items() if k in PUBLIC_SETTINGS and _plain(v)
        }
        out["metrics"] = _public_metrics(self.metrics)
        out["prompt"] = {k: str(v) for k, v in out["prompt"].items() if k in ("system", "user")}
        if not self.license:
            out.pop("license")
        if not self.examples:
            out.pop("examples")
        else:
            out["examples"] = [_public_example(e) for e in self.examples]
        return out


def _public_example(e: dict) -> dict:
    """An example's query and rewrite, and of a composed query's reference image at most its
    bare file name: never its bytes, never the folder it sits in."""
    out = {"query": e["query"], "rewrite": e["rewrite"]}
    image = e.get("image")
    name = re.split(r"[\\/]", image.strip())[-1] if isinstance(image, str) else ""
    if name:  # split on POSIX and Windows separators alike
        out["image"] = name
    return out


def _plain(value: Any) -> bool:
    """A number, a flag, None, or a short identifier (a reward or loss name)."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and len(value) <= 40 and value.replace("-", "_").isidentifier()


def _public_metrics(metrics: dict) -> dict:
    out: dict[str, Any] = {}
    for role in METRIC_ROLES:
        m = metrics.get(role)
        if isinstance(m, dict):
            out[role] = {
                k: m[k]
                for k in _METRIC_KEYS
                if k in m and isinstance(m[k], (int, float, type(None)))
            }
    for key in ("best_step", "heldout_pairs", "train_pairs", "seconds_per_step"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = metrics[key]
    return out


def _read_local(path: Path) -> LocalFacts:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return LocalFacts()
    if not isinstance(data, dict):
        return LocalFacts()
    known = LocalFacts.__dataclass_fields__
    return LocalFacts(**{k: v for k, v in data.items() if k in known and isinstance(v, str)})


def _from_v1(data: dict, local: LocalFacts) -> tuple[dict, LocalFacts]:
    """grape 0.1.0's grape.json: local paths in base_model, settings and metric keys."""
    data = dict(data)
    settings = dict(data.get("settings") or {})
    for key in _V1_LOCAL_SETTINGS:
        value = settings.pop(key, None)
        if isinstance(value, str) and getattr(local, key) is None:
            setattr(local, key, value)
    data["settings"] = settings
    base = str(data.get("base_model") or "")
    if base and is_local_ref(base) and not data.get("base_model_note"):
        local.base_model_path = local.base_model_path or base
        data["base_model"] = local_name(base)
        data["base_model_local"] = True
    if data.get("base_model_note") == "local model":  # a published v1 file
        data["base_model_local"] = True
    if data.get("retriever_note") == "local model":
        data["retriever_local"] = True
    retriever = str(data.get("retriever") or "")
    if retriever and not data.get("retriever_note"):
        from grape_cli.models import parse_clip_spec

        if parse_clip_spec(retriever)[0] == "local":
            local.retriever_path = local.retriever_path or retriever
            data["retriever"] = local_name(retriever)
            data["retriever_local"] = True
    old = data.get("metrics") or {}
    before, after = old.get("before") or {}, old.get("after") or {}
    metrics = {k: v for k, v in old.items() if k not in ("before", "after")}
    if isinstance(before.get("none"), dict):
        metrics["none"] = before["none"]
    base_m = [v for k, v in before.items() if k != "none" and isinstance(v, dict)]
    if base_m:
        metrics["base"] = base_m[0]
    tuned = [v for v in after.values() if isinstance(v, dict)]
    if tuned:
        metrics["tuned"] = tuned[0]
    data["metrics"] = metrics
    return data, local


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)  # readers never see half a file


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / FILENAME).is_file()
