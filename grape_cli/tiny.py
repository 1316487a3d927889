"""Tiny, locally built models: the test suite's fixtures and the bundled example's seeds.

No weights can be downloaded where grape is built and tested, so these build real
open_clip and transformers models from configs and save them in the exact layouts a
download produces (open_clip's local folder; `save_pretrained`). Loading them goes
through `grape_cli.models` like any Hub model. Each preset is a plain dict (minGPT
style): tests use "test", the example world uses the larger ones.
"""

from __future__ import annotations

import json
from pathlib import Path

# open_clip model_cfg presets. "test" is a ViT that runs thousands of images/s on a
# CPU; "resnet" uses open_clip's ModifiedResNet, which keeps the small-shape detail a
# 16-pixel ViT patch loses on 64-pixel images (examples/shapes/retriever.py measures it).
CLIP_PRESETS: dict[str, dict] = {
    "test": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "resnet": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": 128,
            "heads": 4,
            "layers": 2,
        },
    },
}

CLIP_PREPROCESS = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_clip_model(preset: str | dict = "test", seed: int = 0):
    """(model, model_cfg) with random weights, built by open_clip from a config."""
    import open_clip
    import torch

    cfg = dict(CLIP_PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    return model, cfg


def build_tiny_clip(folder: str | Path, preset: str | dict = "test", seed: int = 0) -> Path:
    """Save a random-weight tiny CLIP as an open_clip local folder; returns the folder."""
    from grape_cli.models import save_clip_folder

    model, cfg = build_clip_model(preset, seed)
    return save_clip_folder(model, cfg, CLIP_PREPROCESS, folder)


# ------------------------------------------------------------------------ causal LM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LM_PRESETS: dict[str, dict] = {
    "test": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer (any script, Chinese included) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Texts a tiny LM's tokenizer is trained on in tests and benchmarks: English, Chinese.
TINY_LM_TEXTS = [
    "a small red circle on the left, blue background",
    "a large green square at the top on a white background",
    "红色的圆形在左边 蓝色背景",
    "photo of a dog on the beach at sunset",
    "a cat sleeping on a sofa",
] * 20


def build_tiny_lm(
    folder: str | Path,
    texts: list[str],
    preset: str | dict = "test",
    vocab_size: int = 2000,
    seed: int = 0,
) -> Path:
    """Save a random-weight Qwen2-architecture LM and its trained tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size)
    arch = dict(LM_PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **arch,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # AutoTokenizer would otherwise pick Qwen2Tokenizer from the model type and change
    # pre-tokenisation; this keeps the tokenizer exactly as trained.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def teach_lm(base, out, examples: dict[str, str], prompt, steps: int = 60, lr: float = 1e-2):
    """Fine-tune the LM in `base` until it answers each query of `examples` with its text
    and then stops; save it to `out`. What tests and benchmarks use to make a tiny
    rewriter that behaves like a real one (short captions, then end-of-sequence)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from grape_cli.prompt import render_prompt

    tok = PreTrainedTokenizerFast.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    seqs = []
    for query, answer in examples.items():
        p = tok(render_prompt(tok, prompt, query), add_special_tokens=False)["input_ids"]
        a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append((p + a, [-100] * len(p) + a))
    n = max(len(s) for s, _ in seqs)
    ids = torch.tensor([[tok.pad_token_id] * (n - len(s)) + s for s, _ in seqs])
    labels = torch.tensor([[-100] * (n - len(lab)) + lab for _, lab in seqs])
    mask = (ids != tok.pad_token_id).long()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------ vision-language model

# Qwen2-VL's special tokens: the image placeholder the processor expands into one token
# per merged patch, and the markers around it.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, trimmed to what grape sends: string or [image, text] content.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The text part as in LM_PRESETS; the vision tower is a few-patch ViT. mrope sections
# split half of the head dimension (hidden / heads / 2) over time, height and width.
VLM_PRESETS: dict[str, dict] = {
    "test": {
        "text": {
            **LM_PRESETS["test"],
            "rope_scaling": {"type": "default", "mrope_section": [2, 1, 1]},
        },
        "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
        "patch_size": 8,
        "max_pixels": 64 * 64,
    },
    "small": {
        "text": {
            **LM_PRESETS["small"],
            "rope_scaling": {"type": "default", "mrope_section": [8, 4, 4]},
        },
        "vision": {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2},
        "patch_size": 8,
        "max_pixels": 64 * 64,
    },
}


def build_tiny_processor(tokenizer, patch_size: int = 8, max_pixels: int = 4096, merge: int = 2):
    """A Qwen2-VL processor built here around `tokenizer` (a byte-level BPE with a ChatML
    template, e.g. `train_tokenizer`'s): the vision tokens added to it, an image
    processor whose patches suit 32-64 px images, and the chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    sizes = {"patch_size": patch_size, "merge_size": merge, "temporal_patch_size": 2}
    image_processor = Qwen2VLImageProcessor(
        **sizes,
        min_pixels=(merge * patch_size) ** 2,
        max_pixels=max_pixels,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=VLM_CHAT_TEMPLATE,
    )


def build_tiny_vlm(
    folder: str | Path,
    texts: list[str],
    preset: str | dict = "test",
    vocab_size: int = 2000,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Save a random-weight Qwen2-VL and its locally built processor (the layout of a Hub
    download: config, safetensors weights, processor and tokenizer files). The tokenizer
    is trained on `texts`, or `tokenizer` (a language model's, to build a VLM on it)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    arch = dict(VLM_PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    tokenizer = tokenizer or train_tokenizer(texts, vocab_size)
    merge = arch.get("merge_size", 2)  # patches merged (per side) into one image token
    processor = build_tiny_processor(tokenizer, arch["patch_size"], arch["max_pixels"], merge)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    vision = {**arch["vision"], "hidden_size": arch["text"]["hidden_size"]}
    config = Qwen2VLConfig(
        text_config={
            **arch["text"],
            "vocab_size": len(tok),
            "max_position_embeddings": 512,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
        },
        vision_config={
            **vision,
            "patch_size": arch["patch_size"],
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def teach_vlm(base, out, examples: list[tuple], prompt, steps: int = 60, lr: float = 1e-2):
    """`teach_lm` for a vision-language model: fine-tune it until it answers each
    (Query, caption) of `examples` (reference image and all) with the caption and then
    stops; save it with its processor to `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grape_cli.query import read_image

    processor = AutoProcessor.from_pretrained(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    tok = processor.tokenizer
    batches = []
    for query, answer in examples:
        text = processor.apply_chat_template(
            prompt.vision_messages(query.text, query.image is not None),
            add_generation_prompt=True,
            tokenize=False,
        )
        images = [read_image(query.image)] if query.image else None
        n_prompt = len(processor(text=[text], images=images)["input_ids"][0])
        enc = processor(text=[text + answer + tok.eos_token], images=images, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[:, :n_prompt] = -100
        batches.append({**enc, "labels": labels})
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        for batch in batches:  # one example at a time: image patches differ in number
            (model(**batch).loss / len(batches)).backward()
        opt.step()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
