"""Query rewriters: one interface for search, eval and training.

A rewriter maps each query to one or more queries phrased for the CLIP retriever.
`load_rewriter` understands three kinds of spec:

* `none` (or nothing): the query as it is.
* a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, alias `zero-shot`) or a local folder of a causal
  LM, used zero-shot with `grape_cli.prompt`'s default prompt (or `--prompt-file`).
* a folder written by `grape train` (it has a `grape.json`): the tuned weights, or a LoRA
  adapter on its base model, with the prompt it was trained on and the retriever it was
  tuned for.

Every model comes through `grape_cli.models.load_causal_lm`: safetensors only, and
`trust_remote_code` off unless the user asks. Decoding is greedy unless several rewrites
or a temperature are asked for; each output is cleaned to one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from grape_cli.errors import ModelError, UsageError
from grape_cli.prompt import PromptTemplate, clean_rewrite, render_prompt

logger = logging.getLogger("grape")

DEFAULT_LM = "Qwen/Qwen2.5-0.5B-Instruct"
ALIASES = {"zero-shot": DEFAULT_LM}
TUNED_CONFIG = "grape.json"
TUNED_FORMAT = "grape-rewriter"
TUNED_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class Rewriter(Protocol):
    name: str

    def rewrite(
        self, queries: list[str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        """n rewrites per query; n > 1 samples; greedy when n == 1 and temperature is None."""
        ...


class IdentityRewriter:
    """`none`: every query as it is (once, whatever n: sampling it again adds nothing)."""

    name = "none"

    def rewrite(
        self, queries: list[str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        return [[q] for q in queries]


@dataclass
class LMRewriter:
    """A causal LM that writes one caption per sample from `prompt`."""

    name: str
    model: Any
    tokenizer: Any
    prompt: PromptTemplate
    max_new_tokens: int = 48
    batch_size: int = 16
    base_model: str | None = None
    retriever: str | None = None  # the CLIP spec a tuned rewriter was trained against
    fallbacks: int = 0  # empty generations replaced by the query itself, so far

    def rewrite(
        self, queries: list[str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        prompts = [render_prompt(self.tokenizer, self.prompt, q) for q in queries]
        out: list[list[str]] = []
        for i in range(0, len(prompts), self.batch_size):
            out += generate_rewrites(
                self.model,
                self.tokenizer,
                prompts[i : i + self.batch_size],
                n,
                temperature,
                self.max_new_tokens,
            )
        # An empty caption would search for nothing in particular; the query itself is the
        # honest fallback, and it is counted and logged rather than hidden.
        empty = 0
        for query, rewrites in zip(queries, out, strict=True):
            for j, text in enumerate(rewrites):
                if not text:
                    rewrites[j] = query
                    empty += 1
        if empty:
            self.fallbacks += empty
            logger.warning(
                "rewriter %s wrote %d empty rewrite(s); the query was used as is", self.name, empty
            )
        return out


def generate_rewrites(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 48,
) -> list[list[str]]:
    """n cleaned one-line completions per rendered prompt, generated as one batch."""
    import torch

    if n < 1:
        raise UsageError(f"asked for {n} rewrites per query", "ask for 1 or more")
    if temperature is not None and temperature < 0:
        raise UsageError(f"temperature {temperature} is negative", "use 0 (greedy) or more")
    if not prompts:
        return []
    sample = temperature != 0 and (n > 1 or temperature is not None)
    per_prompt = n if sample else 1  # greedy decoding gives the same text n times
    config = _generation_config(model, tokenizer, per_prompt, sample, temperature, max_new_tokens)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt
    try:
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not getattr(tokenizer, "chat_template", None),
        ).to(model.device)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    cleaned = [clean_rewrite(t) for t in texts]
    groups = [cleaned[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
    return [g * n for g in groups] if per_prompt == 1 and n > 1 else groups


def _generation_config(model, tokenizer, n: int, sample: bool, temperature, max_new_tokens: int):
    import copy

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.num_return_sequences = n
    config.do_sample = sample
    if sample:
        # The model's own sampling settings (Qwen ships top_p/top_k) unless told otherwise.
        if temperature is not None:
            config.temperature = temperature
        elif config.temperature is None:
            config.temperature = 1.0
    else:
        # Sampling knobs left set make transformers warn on every greedy call.
        for knob in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
            if hasattr(config, knob):
                setattr(config, knob, None)
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


# --------------------------------------------------------------------------- loading


def load_rewriter(
    spec: str | None,
    *,
    device: str | None = None,
    prompt: PromptTemplate | None = None,
    trust_remote_code: bool = False,
    retriever: str | None = None,
) -> Rewriter:
    """The rewriter a spec names; see the module docstring. `retriever` is the index's model."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return IdentityRewriter()
    from grape_cli.models import resolve_lm_folder

    spec = ALIASES.get(spec, spec)
    folder = resolve_lm_folder(spec)  # a Hub id through the cache, so its grape.json counts
    if (folder / TUNED_CONFIG).is_file():
        return _load_tuned(
            folder,
            spec,
            device=device,
            prompt=prompt,
            trust_remote_code=trust_remote_code,
            retriever=retriever,
        )
    model, tokenizer = _load_lm(str(folder), device, trust_remote_code)
    return LMRewriter(
        name=spec, model=model, tokenizer=tokenizer, prompt=prompt or PromptTemplate()
    )


def read_tuned_config(folder: str | Path) -> dict:
    """The `grape.json` of a tuned rewriter folder, checked."""
    path = Path(folder) / TUNED_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}", "re-run `grape train`") from None
    if not isinstance(cfg, dict) or cfg.get("format") != TUNED_FORMAT:
        raise ModelError(
            f"{path} is not a grape rewriter config (format {cfg.get('format')!r})"
            if isinstance(cfg, dict)
            else f"{path} is not a grape rewriter config",
            "pass a folder written by `grape train`",
        )
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or version > TUNED_FORMAT_VERSION:
        raise ModelError(
            f"{path} has format version {version}; this grape reads up to {TUNED_FORMAT_VERSION}",
            "upgrade grape (pip install -U grape-cli)",
        )
    return cfg


def _load_tuned(folder: Path, spec: str, *, device, prompt, trust_remote_code, retriever):
    from grape_cli.models import canonical_clip_spec

    cfg = read_tuned_config(folder)
    tuned_for = cfg.get("retriever")
    if retriever and tuned_for:
        try:
            differs = canonical_clip_spec(tuned_for) != canonical_clip_spec(retriever)
        except Exception:  # an odd spec: compare the text rather than fail the search
            differs = tuned_for != retriever
        if differs:
            logger.warning(
                "rewriter %s was tuned for retriever %s, but the index uses %s; "
                "its rewrites may suit this index less well",
                spec,
                tuned_for,
                retriever,
            )
    own_prompt = PromptTemplate.from_dict(cfg.get("prompt"))
    if prompt is not None and prompt != own_prompt:
        logger.warning(
            "rewriter %s was trained on its own prompt; the prompt file is ignored", spec
        )

    base = cfg.get("base_model")
    if cfg.get("adapter") or (folder / "adapter_config.json").is_file():
        if not base:
            raise ModelError(
                f"{folder / TUNED_CONFIG} names no base_model for its adapter",
                "add the base model's Hub id or folder as base_model",
            )
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise ModelError(
                f"{folder} has no {ADAPTER_WEIGHTS}",
                "grape loads safetensors only; save the adapter with save_pretrained",
            )
        if (folder / base).is_dir():  # a base saved next to the run
            base = str(folder / base)
        model, tokenizer = _load_lm(base, device, trust_remote_code)
        from peft import PeftModel

        try:
            # Merged once here, so each generation costs what the base model's does.
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except Exception as e:
            raise ModelError(
                f"could not apply the adapter in {folder} to {base}: {type(e).__name__}: "
                f"{e}".splitlines()[0],
                "check that base_model in grape.json is the model it was trained on",
            ) from e
        model.eval()
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = _load_tokenizer(folder, trust_remote_code)
    else:
        model, tokenizer = _load_lm(str(folder), device, trust_remote_code)
    max_new = int((cfg.get("generation") or {}).get("max_new_tokens", 48))
    return LMRewriter(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        prompt=own_prompt,
        max_new_tokens=max_new,
        base_model=base,
        retriever=tuned_for,
    )


def _load_lm(spec: str, device: str | None, trust_remote_code: bool):
    import torch

    from grape_cli.models import load_causal_lm, pick_device

    device = pick_device(device)
    # fp32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on accelerators.
    dtype = torch.float32 if device == "cpu" else None
    return load_causal_lm(spec, device, dtype, trust_remote_code=trust_remote_code)


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(
            f"could not load the tokenizer in {folder}: {type(e).__name__}: {e}".splitlines()[0],
            "save it with tokenizer.save_pretrained",
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
