"""The model card of a pushed rewriter: huggingface_hub's `ModelCard` filled from the
template `templates/modelcard.md`, with the held-out results as model-index metadata.

It reads only `RunInfo.public()`, so nothing local can reach the card through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grape_cli.reward import REWARDS

TEMPLATE = Path(__file__).parent / "templates" / "modelcard.md"
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
HUB_TAGS = ["grape", "query-rewriting", "clip", "grpo", "trl", "text-to-image-retrieval"]
METRIC_COLUMNS = (
    ("recall@1", "R@1"),
    ("recall@5", "R@5"),
    ("recall@10", "R@10"),
    ("mrr", "MRR"),
    ("median_rank", "median rank"),
    ("n", "n"),
)
ROLE_LABELS = {
    "none": "the query as is",
    "base": "the base model, before training",
    "tuned": "this rewriter",
}
# The composed query of a vision-language card's usage: one a user's own pairs are unlikely
# to hold word for word (the privacy scan refuses a card that quotes a pairs query).
COMPOSED_EXAMPLE = "like this one, but red and at night"
# Settings that say how the run was operated, or that the card already shows.
_NOT_TRAINING = {"reward"}


def render_model_card(public: dict, repo_id: str, revision: str | None = None) -> str:
    """README.md of a pushed rewriter from `RunInfo.public()`."""
    from huggingface_hub import ModelCard

    spec = f"{repo_id}@{revision}" if revision and revision != "main" else repo_id
    retriever = public["retriever"]
    card = ModelCard.from_template(
        _card_data(public, repo_id),
        template_path=str(TEMPLATE),
        name=repo_id.split("/")[-1],
        paper_title=PAPER_TITLE,
        paper_id=PAPER_ID,
        retriever_line=(
            f"`{retriever}`, a local open_clip model of the author's that is not on the Hub; "
            "the rewriter is meant for an index built with that same model"
            if public.get("retriever_local")
            else f"the open_clip retriever `{retriever}`: build your index with it"
        ),
        metrics_table=_metrics_table(public.get("metrics") or {}),
        training=_training_lines(public),
        examples=[
            {"query": _example_query(e), "rewrite": _cell(e["rewrite"])}
            for e in public.get("examples") or []
        ],
        index_model=f"path/to/{retriever}" if public.get("retriever_local") else retriever,
        spec=spec,
        vision=bool(public.get("vision")),
        composed_query=COMPOSED_EXAMPLE,
        snippet=(_vision_snippet if public.get("vision") else _transformers_snippet)(
            public, repo_id, revision
        ),
        limitations=_limitations(public),
        citation=CITATION,
    )
    return str(card)


def _card_data(g: dict, repo_id: str):
    from huggingface_hub import EvalResult, ModelCardData

    extra: dict[str, Any] = {}
    local_base = g.get("base_model_local")
    if not local_base:
        extra["base_model_relation"] = "adapter" if g.get("adapter") else "finetune"
    tuned = (g.get("metrics") or {}).get("tuned") or {}
    results = [
        EvalResult(
            task_type="text-to-image-retrieval",
            dataset_type="held-out-pairs",
            dataset_name="author's held-out query/target pairs",
            metric_type=key,
            metric_name=label,
            metric_value=tuned[key],
        )
        for key, label in METRIC_COLUMNS[:4]
        if isinstance(tuned.get(key), (int, float))
    ]
    return ModelCardData(
        base_model=None if local_base else g["base_model"].partition("@")[0],
        library_name="peft" if g.get("adapter") else "transformers",
        pipeline_tag="image-text-to-text" if g.get("vision") else "text-generation",
        license=g.get("license"),
        tags=[*HUB_TAGS, *(["lora", "peft"] if g.get("adapter") else [])],
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
        **extra,
    )


def _fmt(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-" if value is None else str(value)
    if key in ("n", "median_rank") and float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}" if key != "median_rank" else f"{value:.1f}"


def _metrics_table(metrics: dict) -> str:
    rows = [(role, metrics[role]) for role in ROLE_LABELS if isinstance(metrics.get(role), dict)]
    if not rows:
        return "No held-out evaluation was recorded for this run."
    cols = [(k, label) for k, label in METRIC_COLUMNS if any(k in m for _, m in rows)]
    lines = [
        "| rewriter | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for role, m in rows:
        lines.append(
            f"| {ROLE_LABELS[role]} | " + " | ".join(_fmt(k, m.get(k)) for k, _ in cols) + " |"
        )
    return "\n".join(lines)


def _training_lines(g: dict) -> list[str]:
    base = g["base_model"]
    form = (
        f"a LoRA adapter on `{base}` (loaded on top of the base model)"
        if g.get("adapter")
        else f"full weights, fine-tuned from `{base}`"
    )
    if g.get("base_model_local"):
        form += " (a local model of the author's, not on the Hub)"
    reward = g.get("reward") or "unknown"
    spec = REWARDS.get(reward)
    lines = [
        f"- Base model: {form}.",
        f"- Reward: `{reward}`, {spec.description if spec else 'as recorded in grape.json'}.",
        "- Trainer: GRPO (TRL's `GRPOTrainer`), the retriever frozen.",
    ]
    best = (g.get("metrics") or {}).get("best_step")
    if best is not None:
        lines.append(f"- Kept checkpoint: step {best} (best held-out Recall@10).")
    if g.get("grape_version"):
        lines.append(f"- grape {g['grape_version']}, created {g.get('created') or '-'}.")
    settings = {k: v for k, v in (g.get("settings") or {}).items() if k not in _NOT_TRAINING}
    if settings:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in settings.items() if v is not None]
    return lines


def _limitations(g: dict) -> list[str]:
    n = ((g.get("metrics") or {}).get("tuned") or {}).get("n")
    lines = [
        "- It is tuned for one retriever and one photo collection. Its rewrites use the words "
        "that retriever ranks well; with another retriever they are ordinary captions, with "
        "no guarantee.",
        "- The figures above come from the author's own held-out pairs"
        + (f" (n = {n})" if isinstance(n, int) else "")
        + ", which are not published; expect different numbers on another collection.",
        "- A rewriter can drop or invent details (colour, count, position) and inherits the "
        "base model's gaps in languages and knowledge. Look at the rewrite, which "
        "`grape search` prints above the results.",
        "- Each search runs one LLM generation before the retriever: it adds latency.",
        "- The base model's license, terms and limitations apply to this model.",
    ]
    if g.get("adapter") and g.get("base_model_local"):
        lines.append(
            f"- This adapter needs the author's local base model `{g['base_model']}`, which is "
            "not on the Hub: it cannot be loaded without it."
        )
    return lines


def _transformers_snippet(g: dict, repo_id: str, revision: str | None) -> str:
    """Plain transformers (or peft) code that prompts the model exactly as grape does."""
    prompt = g.get("prompt") or {}
    max_new = (g.get("generation") or {}).get("max_new_tokens")
    auto = "AutoPeftModelForCausalLM" if g.get("adapter") else "AutoModelForCausalLM"
    source = "peft" if g.get("adapter") else "transformers"
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    load = [
        f"from {source} import {auto}",
        *(["from transformers import AutoTokenizer"] if g.get("adapter") else []),
    ]
    if not g.get("adapter"):
        load = [f"from transformers import {auto}, AutoTokenizer"]
    messages = []
    if prompt.get("system"):
        system = json.dumps(prompt["system"], ensure_ascii=False)
        messages.append(f'    {{"role": "system", "content": {system}}},')
    user = json.dumps(prompt.get("user", "{query}"), ensure_ascii=False)
    messages.append(f'    {{"role": "user", "content": {user}.replace("{{query}}", query)}},')
    return "\n".join(
        [
            *load,
            "",
            f'repo = "{repo_id}"',
            f"tokenizer = AutoTokenizer.from_pretrained(repo{rev})",
            f"model = {auto}.from_pretrained(repo{rev})",
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


def _vision_snippet(g: dict, repo_id: str, revision: str | None) -> str:
    """transformers code for a composed query: the reference image and the edit text in the
    processor's chat format, an image part before the text, prompted exactly as grape does."""
    prompt = g.get("prompt") or {}
    max_new = (g.get("generation") or {}).get("max_new_tokens")
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    model_class = "AutoModelForImageTextToText"
    if g.get("adapter"):  # peft has no Auto class for image-text-to-text: base, then adapter
        base, _, base_rev = g["base_model"].partition("@")
        base_kw = f', revision="{base_rev}"' if base_rev else ""
        load = [
            "from peft import PeftModel",
            "from PIL import Image",
            f"from transformers import AutoProcessor, {model_class}",
            "",
            f'repo = "{repo_id}"',
            f"processor = AutoProcessor.from_pretrained(repo{rev})",
            f"base = {model_class}.from_pretrained({json.dumps(base)}{base_kw})",
            f"model = PeftModel.from_pretrained(base, repo{rev})",
        ]
    else:
        load = [
            "from PIL import Image",
            f"from transformers import AutoProcessor, {model_class}",
            "",
            f'repo = "{repo_id}"',
            f"processor = AutoProcessor.from_pretrained(repo{rev})",
            f"model = {model_class}.from_pretrained(repo{rev})",
        ]
    messages = []
    if prompt.get("system"):
        system = json.dumps(prompt["system"], ensure_ascii=False)
        messages.append(
            f'    {{"role": "system", "content": [{{"type": "text", "text": {system}}}]}},'
        )
    user = json.dumps(prompt.get("user", "{query}"), ensure_ascii=False)
    messages += [
        '    {"role": "user", "content": [',
        '        {"type": "image"},  # the reference image goes where this part is',
        f'        {{"type": "text", "text": {user}.replace("{{query}}", query)}},',
        "    ]},",
    ]
    return "\n".join(
        [
            *load,
            "",
            'image = Image.open("ref.jpg").convert("RGB")  # the reference image',
            f"query = {json.dumps(COMPOSED_EXAMPLE)}  # the edit, in any language",
            "messages = [",
            *messages,
            "]",
            "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
            'inputs = processor(text=[text], images=[image], return_tensors="pt")',
            f"out = model.generate(**inputs, max_new_tokens={max_new}, do_sample=False)",
            'rewrite = processor.decode(out[0, inputs["input_ids"].shape[1]:], '
            "skip_special_tokens=True)",
            'print(rewrite.strip().split("\\n")[0])  # the query to give the CLIP retriever',
        ]
    )


def _example_query(e: dict) -> str:
    """A table cell: the query, after the reference image's bare name when composed."""
    image = f"`{_cell(e['image'])}` + " if e.get("image") else ""
    return image + _cell(e["query"])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
