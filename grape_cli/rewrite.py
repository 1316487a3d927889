"""Query rewriters: one interface for search, eval and training.

A rewriter maps each query to one or more texts phrased for the CLIP retriever.
`load_rewriter` picks the kind of rewriter a spec names from `REWRITER_KINDS`, a
registry tried in order (adding a kind is one entry):

* `none` (or nothing): the query as it is.
* `tuned`: a folder written by `grape train` (it has a `grape.json`), or a Hub repo
  pushed from one: the tuned weights, or a LoRA adapter on its base model, with the
  prompt it was trained on and the retriever it was tuned for.
* `causal-lm`: a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, alias `zero-shot`) or a local
  folder of a causal LM, used zero-shot with `grape_cli.prompt`'s default prompt (or
  `--prompt-file`).
* `vlm`: a vision-language model (`Qwen/Qwen2.5-VL-3B-Instruct`, or any that transformers'
  `AutoModelForImageTextToText` loads, with its processor), zero-shot. It reads a composed
  query's reference image with its text and writes a caption of the wanted image; it
  rewrites text-only queries too.

Every model comes through `grape_cli.models`: safetensors only, and `trust_remote_code`
off unless the user asks. Decoding is greedy unless several rewrites or a temperature
are asked for; each output is cleaned to one line. A text rewriter rewrites a query's
text, and a reference image is added to the rewrite's embedding by `grape_cli.query`; a
vision-language rewriter's caption is searched alone (`sees_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from grape_cli.errors import ModelError, UsageError
from grape_cli.models import DEFAULT_LM, is_vlm_folder
from grape_cli.prompt import DEFAULT_MAX_NEW_TOKENS, PromptTemplate, clean_rewrite, render_prompt
from grape_cli.query import Query, as_query

logger = logging.getLogger("grape")

ALIASES = {"zero-shot": DEFAULT_LM}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class Rewriter(Protocol):
    name: str

    def rewrite(
        self, queries: Sequence[Query | str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        """n rewrites per query; n > 1 samples; greedy when n == 1 and temperature is None."""
        ...


class IdentityRewriter:
    """`none`: every query as it is (once, whatever n: sampling it again adds nothing)."""

    name = "none"

    def rewrite(
        self, queries: Sequence[Query | str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        return [[as_query(q).text] for q in queries]


@dataclass
class LMRewriter:
    """A causal LM that writes one caption per sample from `prompt`."""

    name: str
    model: Any
    tokenizer: Any
    prompt: PromptTemplate
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 16
    base_model: str | None = None
    retriever: str | None = None  # the CLIP spec a tuned rewriter was trained against
    fallbacks: int = 0  # empty generations replaced by the query itself, so far

    sees_images = False  # the query's text only; a reference image is blended in after

    def rewrite(
        self, queries: Sequence[Query | str], n: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        queries = [as_query(q) for q in queries]
        out: list[list[str]] = []
        for i in range(0, len(queries), self.batch_size):
            out += self.generate(queries[i : i + self.batch_size], n, temperature)
        # An empty caption would search for nothing in particular; the query itself is the
        # honest fallback, and it is counted and logged rather than hidden.
        empty = 0
        for query, rewrites in zip(queries, out, strict=True):
            for j, text in enumerate(rewrites):
                if not text:
                    rewrites[j] = query.text
                    empty += 1
        if empty:
            self.fallbacks += empty
            logger.warning(
                "rewriter %s wrote %d empty rewrite(s); the query was used as is", self.name, empty
            )
        return out

    def generate(self, queries: list[Query], n: int = 1, temperature=None) -> list[list[str]]:
        """n raw rewrites of each query of one batch (an empty one stays empty)."""
        prompts = [render_prompt(self.tokenizer, self.prompt, q.text) for q in queries]
        return generate_rewrites(
            self.model, self.tokenizer, prompts, n, temperature, self.max_new_tokens
        )


@dataclass
class VLMRewriter(LMRewriter):
    """A vision-language model: it reads a composed query's reference image with its text
    and writes one caption of the wanted image, searched without the image's embedding.
    `tokenizer` is the model's processor (which carries the text tokenizer)."""

    sees_images = True

    def generate(self, queries: list[Query], n: int = 1, temperature=None) -> list[list[str]]:
        enc = encode_vision_prompts(self.tokenizer, self.prompt, queries)
        return generate_from(
            self.model, self.tokenizer.tokenizer, enc, n, temperature, self.max_new_tokens
        )


def rewriter_for(model, processing_class, prompt: PromptTemplate, max_new_tokens: int, **kw):
    """The rewriter of a loaded model: a VLMRewriter when `processing_class` is a
    vision-language processor, else an LMRewriter over a tokenizer."""
    vision = hasattr(processing_class, "image_processor")
    kind = VLMRewriter if vision else LMRewriter
    return kind(
        model=model,
        tokenizer=processing_class,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        **{"name": "training", **kw},
    )


# Longest side of a reference image given to a vision-language model: its processor turns
# pixels into tokens, and a 12-megapixel photo would make thousands of them for detail a
# caption cannot use.
REFERENCE_MAX_SIDE = 448


def encode_vision_prompts(processor, template: PromptTemplate, queries: Sequence[Query]):
    """The processor's batch for `queries`: each rendered chat prompt (with an image
    placeholder where the query has a reference image) and the reference images."""
    from grape_cli.query import read_image

    texts = [
        processor.apply_chat_template(
            template.vision_messages(q.text, q.image is not None),
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in queries
    ]
    images = [read_image(q.image, max_side=REFERENCE_MAX_SIDE) for q in queries if q.image]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt
    try:
        return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def generate_rewrites(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[list[str]]:
    """n cleaned one-line completions per rendered prompt, generated as one batch."""
    if not prompts:
        _check_sampling(n, temperature)
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt
    try:
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not getattr(tokenizer, "chat_template", None),
        )
    finally:
        tokenizer.padding_side = side
    return generate_from(model, tokenizer, enc, n, temperature, max_new_tokens)


def _check_sampling(n: int, temperature: float | None) -> None:
    if n < 1:
        raise UsageError(f"asked for {n} rewrites per query", "ask for 1 or more")
    if temperature is not None and temperature < 0:
        raise UsageError(f"temperature {temperature} is negative", "use 0 (greedy) or more")


def generate_from(
    model, tokenizer, enc, n: int = 1, temperature=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS
) -> list[list[str]]:
    """n cleaned one-line completions for each prompt of an encoded, left-padded batch
    (`enc`: what a tokenizer or processor returned)."""
    import torch

    _check_sampling(n, temperature)
    sample = temperature != 0 and (n > 1 or temperature is not None)
    per_prompt = n if sample else 1  # greedy decoding gives the same text n times
    config = _generation_config(model, tokenizer, per_prompt, sample, temperature, max_new_tokens)
    enc = enc.to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    cleaned = [clean_rewrite(t) for t in texts]
    rows = len(enc["input_ids"])
    groups = [cleaned[i * per_prompt : (i + 1) * per_prompt] for i in range(rows)]
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


@dataclass(frozen=True)
class RewriterKind:
    """A kind of rewriter: `matches(folder)` says whether a resolved model folder is one,
    `load(folder, spec, options)` loads it."""

    name: str
    matches: Callable[[Path], bool]
    load: Callable[..., Rewriter]
    description: str


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None
    prompt: PromptTemplate | None = None
    trust_remote_code: bool = False
    retriever: str | None = None  # the index's model, to warn about a mismatch


def load_rewriter(
    spec: str | None,
    *,
    device: str | None = None,
    prompt: PromptTemplate | None = None,
    trust_remote_code: bool = False,
    retriever: str | None = None,
) -> Rewriter:
    """The rewriter a spec names; see the module docstring. `retriever` is the index's model."""
    if is_none(spec):
        return IdentityRewriter()
    from grape_cli.models import resolve_lm_folder

    spec = ALIASES.get(spec, spec)
    folder = resolve_lm_folder(spec)  # a Hub id through the cache, so its grape.json counts
    options = LoadOptions(device, prompt, trust_remote_code, retriever)
    kind = next(k for k in REWRITER_KINDS if k.matches(folder))
    return kind.load(folder, spec, options)


def reads_images(spec: str) -> bool:
    """Whether the rewriter a spec names reads reference images (a vision-language model),
    decided from its files without loading it."""
    from grape_cli.models import resolve_lm_folder

    if is_none(spec):
        return False
    folder = resolve_lm_folder(ALIASES.get(spec, spec))
    if _is_run(folder):
        from grape_cli.runfolder import RunInfo

        return RunInfo.read(folder).vision
    return is_vlm_folder(folder)


def is_none(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "none")


def _load_causal_lm(folder: Path, spec: str, options: LoadOptions) -> LMRewriter:
    model, tokenizer = _load_lm(str(folder), options.device, options.trust_remote_code)
    return LMRewriter(
        name=spec, model=model, tokenizer=tokenizer, prompt=options.prompt or PromptTemplate()
    )


def _load_vlm(folder: Path, spec: str, options: LoadOptions) -> VLMRewriter:
    model, processor = _load_lm(str(folder), options.device, options.trust_remote_code)
    prompt = options.prompt or PromptTemplate.default(vision=True)
    return VLMRewriter(name=spec, model=model, tokenizer=processor, prompt=prompt)


def _load_tuned(folder: Path, spec: str, options: LoadOptions) -> LMRewriter:
    from grape_cli.runfolder import RunInfo

    info = RunInfo.read(folder)
    _warn_if_other_retriever(spec, info.retriever_spec, options.retriever)
    if options.prompt is not None and options.prompt != info.prompt:
        logger.warning(
            "rewriter %s was trained on its own prompt; the prompt file is ignored", spec
        )
    if info.adapter or (folder / "adapter_config.json").is_file():
        model, tokenizer, base = _load_adapter(folder, info, options)
    else:
        model, tokenizer = _load_lm(str(folder), options.device, options.trust_remote_code)
        base = info.base_model
    return rewriter_for(
        model,
        tokenizer,
        info.prompt,
        info.max_new_tokens,
        name=spec,
        base_model=base,
        retriever=info.retriever_spec,
    )


def _warn_if_other_retriever(spec: str, tuned_for: str, retriever: str | None) -> None:
    from grape_cli.models import canonical_clip_spec

    if not (retriever and tuned_for):
        return
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


def _load_adapter(folder: Path, info, options: LoadOptions):
    """(merged model, tokenizer, base reference) of a LoRA run folder."""
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(
            f"{folder} has no {ADAPTER_WEIGHTS}",
            "grape loads safetensors only; save the adapter with save_pretrained",
        )
    base = info.base_model_ref(folder)
    model, tokenizer = _load_lm(base, options.device, options.trust_remote_code)
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
    if hasattr(tokenizer, "image_processor"):
        pass  # a VLM's processor: the base model's, which training does not change
    elif (folder / "tokenizer_config.json").is_file():
        tokenizer = _load_tokenizer(folder, options.trust_remote_code)
    return model, tokenizer, base


def _is_run(folder: Path) -> bool:
    from grape_cli.runfolder import is_run_folder

    return is_run_folder(folder)


# Tried in order; the first that matches loads. `none` never reaches here (no folder).
REWRITER_KINDS: list[RewriterKind] = [
    RewriterKind("tuned", _is_run, _load_tuned, "a run folder written by `grape train`"),
    RewriterKind("vlm", is_vlm_folder, _load_vlm, "a vision-language model used zero-shot"),
    RewriterKind("causal-lm", lambda folder: True, _load_causal_lm, "a causal LM used zero-shot"),
]


def _load_lm(spec: str, device: str | None, trust_remote_code: bool):
    """(model, tokenizer) of a causal LM, or (model, processor) of a vision-language model."""
    import torch

    from grape_cli.models import load_causal_lm, load_vlm, pick_device, resolve_lm_folder

    device = pick_device(device)
    # fp32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on accelerators.
    dtype = torch.float32 if device == "cpu" else None
    load = load_vlm if is_vlm_folder(resolve_lm_folder(spec)) else load_causal_lm
    return load(spec, device, dtype, trust_remote_code=trust_remote_code)


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
