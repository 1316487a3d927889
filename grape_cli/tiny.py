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
