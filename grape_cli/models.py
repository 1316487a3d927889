"""The one seam for model loading and the network.

Every model grape uses comes through here: the CLIP retriever (`load_clip`), the causal
LM rewriters (`load_causal_lm`), the vision-language rewriters (`load_vlm`) and any Hub
snapshot (`hub_snapshot`). Tests pass local
folders built by `grape_cli.tiny`, which go through exactly the same functions as a Hub
download; nothing else in the package imports open_clip's factory or calls the Hub.

A model that is not cached while the Hub cannot be reached fails here, in milliseconds,
with one line that names it and says what to do (huggingface_hub and open_clip would
otherwise retry for tens of seconds).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from grape_cli.errors import ModelError

if TYPE_CHECKING:  # heavy imports stay lazy: `grape --help` must not import torch
    import torch

DEFAULT_CLIP = "ViT-B-32:laion2b_s34b_b79k"
DEFAULT_LM = "Qwen/Qwen2.5-0.5B-Instruct"  # the default rewriter and base model
CLIP_CONFIG_NAME = "open_clip_config.json"
CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
# Files a transformers rewriter needs. Safetensors only: pickled weights can run code.
LM_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.md"]


# --------------------------------------------------------------------------- devices


def pick_device(requested: str | None = None) -> str:
    """CUDA when present, else Apple MPS, else CPU; `requested` ('cpu', 'cuda:1') wins."""
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(
                f"--device {requested} asked for, but CUDA is not available",
                "use --device cpu or leave --device out",
            )
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, precision: str | None = None) -> torch.dtype:
    """fp16 on CUDA/MPS by default (bf16 if asked), fp32 on CPU."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision:
        if precision not in table:
            raise ModelError(f"unknown precision {precision!r}", "use fp32, fp16 or bf16")
        return table[precision]
    return torch.float32 if device == "cpu" else torch.float16


# --------------------------------------------------------------------------- the Hub


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 2.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, hint: str) -> None:
    """Raise at once when `what` must be downloaded and the Hub cannot be reached."""
    if hub_offline():
        raise ModelError(f"{what} is not in the local cache and HF_HUB_OFFLINE is set", hint)
    if not _hub_reachable():
        raise ModelError(
            f"{what} is not in the local cache and the Hugging Face Hub is unreachable", hint
        )


def is_local_ref(ref: str) -> bool:
    """Whether a model reference names a local folder rather than a Hub id ('org/name',
    optionally '@revision'). The one place grape decides this.

    >>> is_local_ref("Qwen/Qwen2.5-0.5B-Instruct@main"), is_local_ref("./runs/a")
    (False, True)
    >>> is_local_ref("/home/ann/models/lm"), is_local_ref("local-dir:/data/clip")
    (True, True)
    """
    ref = str(ref)
    if ref.startswith(("/", "~", ".", "local-dir:")) or "\\" in ref or ref[1:3] == ":\\":
        return True
    name = ref.partition("@")[0]
    return name.count("/") > 1 or Path(ref).expanduser().is_dir()


def local_name(ref: str) -> str:
    """The bare folder name of a local reference (what may be shown or published).

    >>> local_name("/home/ann/models/tiny-lm/"), local_name("local-dir:/data/clip")
    ('tiny-lm', 'clip')
    """
    parts = [p for p in str(ref).removeprefix("local-dir:").replace("\\", "/").split("/") if p]
    return parts[-1] if parts else "model"


def split_revision(repo: str) -> tuple[str, str | None]:
    """'user/repo@rev' -> ('user/repo', 'rev').

    >>> split_revision("Qwen/Qwen2.5-0.5B-Instruct@main")
    ('Qwen/Qwen2.5-0.5B-Instruct', 'main')
    >>> split_revision("org/name")
    ('org/name', None)
    """
    name, _, rev = repo.partition("@")
    return name, (rev or None)


def hub_snapshot(
    repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """Local folder of a Hub repo: from the cache when there, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    require_hub(f"model {what}", "connect once to download it, or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # one line, whatever huggingface_hub raised
        raise ModelError(
            f"could not download {what}: {type(e).__name__}: {e}".splitlines()[0],
            "check the repo id and revision, and HF_TOKEN for private repos",
        ) from e


# --------------------------------------------------------------------------- CLIP


@dataclass
class ClipModel:
    """A loaded retriever: both encoders, preprocessing and the tokenizer.

    `spec` is the canonical name stored in an index; `encode_*` return L2-normalised
    float32 CPU tensors whatever the device and precision.
    """

    spec: str
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    dtype: Any
    dim: int
    image_size: int
    context_length: int

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            feats = self.model.encode_image(x).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[i : i + batch_size]).to(self.device)
                feats = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)

    def count_tokens(self, text: str) -> int:
        """Tokens the text encoder sees before truncation (start/end tokens included)."""
        inner = getattr(self.tokenizer, "encode", None)
        if inner is not None:
            return len(inner(text)) + 2
        return int((self.tokenize([text])[0] != 0).sum())


def parse_clip_spec(spec: str) -> tuple[str, str, str | None]:
    """Split a model spec into (kind, name, pretrained tag).

    Kinds: 'local' (a folder in open_clip's layout), 'hf-hub', 'builtin'.
    A builtin with tag 'random' (or no tag) has random weights: for benchmarks.

    >>> parse_clip_spec("ViT-B-32:laion2b_s34b_b79k")
    ('builtin', 'ViT-B-32', 'laion2b_s34b_b79k')
    >>> parse_clip_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    ('hf-hub', 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K', None)
    """
    if spec.startswith("hf-hub:"):
        return "hf-hub", spec[len("hf-hub:") :], None
    if spec.startswith("local-dir:"):
        return "local", str(Path(spec[len("local-dir:") :]).expanduser().resolve()), None
    path = Path(spec).expanduser()
    if path.is_dir() or spec.startswith((".", "/", "~")) or (os.sep in spec and ":" not in spec):
        return "local", str(path.resolve()), None
    name, _, tag = spec.partition(":")
    return "builtin", name, (tag or None)


def canonical_clip_spec(spec: str) -> str:
    """The spec as recorded in an index: local folders become absolute paths."""
    kind, name, tag = parse_clip_spec(spec)
    if kind == "local":
        return name
    if kind == "hf-hub":
        return f"hf-hub:{name}"
    return f"{name}:{tag}" if tag else f"{name}:random"


def _check_clip_available(kind: str, name: str, tag: str | None) -> None:
    """Fail fast, before open_clip's retry loops, on a model that is not on disk."""
    from huggingface_hub import try_to_load_from_cache

    hint = (
        "connect once to download it, or pass a local open_clip folder "
        "(open_clip_config.json + open_clip_model.safetensors) to --model"
    )
    if kind == "local":
        if not (Path(name) / CLIP_CONFIG_NAME).is_file():
            raise ModelError(
                f"{name} is not an open_clip model folder (no {CLIP_CONFIG_NAME})",
                "pass a folder written by open_clip or grape, or ARCH:TAG",
            )
        return
    if kind == "hf-hub":
        if not isinstance(try_to_load_from_cache(name, CLIP_CONFIG_NAME), str):
            require_hub(f"CLIP model hf-hub:{name}", hint)
        return
    import open_clip

    if name not in open_clip.list_models():
        raise ModelError(
            f"unknown open_clip architecture {name!r}",
            "see `python -c 'import open_clip; print(open_clip.list_models())'`",
        )
    if tag in (None, "random"):
        return
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelError(
            f"open_clip has no pretrained tag {tag!r} for {name}", f"known tags: {tags}"
        )
    if cfg.get("hf_hub"):
        repo_id, fname = _split_hub_file(cfg["hf_hub"])
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if fname and fname.endswith((".bin", ".pth")):
            names.insert(0, fname[:-4] + ".safetensors")
        if not any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names):
            require_hub(f"CLIP weights {name}:{tag} ({repo_id})", hint)
    elif cfg.get("url"):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if not cached.exists():
            require_hub(f"CLIP weights {name}:{tag}", hint)


def _split_hub_file(hf_hub: str) -> tuple[str, str]:
    """open_clip writes 'org/repo/' or 'org/repo/file.bin'.

    >>> _split_hub_file("laion/CLIP-ViT-B-32-laion2B-s34B-b79K/")
    ('laion/CLIP-ViT-B-32-laion2B-s34B-b79K', '')
    >>> _split_hub_file("timm/vit_base/open_clip_pytorch_model.bin")
    ('timm/vit_base', 'open_clip_pytorch_model.bin')
    """
    parts = hf_hub.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def load_clip(
    spec: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None
) -> ClipModel:
    """Load any open_clip model grape understands, ready for inference."""
    import open_clip

    kind, name, tag = parse_clip_spec(spec)
    _check_clip_available(kind, name, tag)
    device = pick_device(device)
    dtype = pick_dtype(device, precision)
    oc_name = {"local": f"local-dir:{name}", "hf-hub": f"hf-hub:{name}"}.get(kind, name)
    pretrained = None if tag in (None, "random") else tag
    oc_precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype)[6:]]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            oc_name, pretrained=pretrained, device=device, precision=oc_precision
        )
        tokenizer = open_clip.get_tokenizer(oc_name)
    except Exception as e:
        raise ModelError(
            f"could not load CLIP model {spec}: {type(e).__name__}: {e}".splitlines()[0],
            "check the model spec; see `grape index --help`",
        ) from e
    model.eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    dim = int(getattr(model, "embed_dim", 0) or _probe_dim(model, device, dtype, image_size))
    return ClipModel(
        spec=canonical_clip_spec(spec),
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        dim=dim,
        image_size=image_size,
        context_length=int(getattr(tokenizer, "context_length", 77)),
    )


def _probe_dim(model, device, dtype, image_size: int) -> int:
    import torch

    with torch.inference_mode():
        x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
        return int(model.encode_image(x).shape[-1])


def save_clip_folder(model, model_cfg: dict, preprocess_cfg: dict, folder: str | Path) -> Path:
    """Write a model in open_clip's local-folder layout (what `local-dir:` and Hub repos use)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / CLIP_WEIGHTS_NAME))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


# --------------------------------------------------------------------------- causal LMs


def resolve_lm_folder(spec: str) -> Path:
    """A local folder as is; 'org/repo[@rev]' through the Hub cache (safetensors only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    repo_id, revision = split_revision(spec)  # before counting: 'org/name@refs/pr/1'
    if is_local_ref(spec) or repo_id.count("/") != 1:
        raise ModelError(
            f"rewriter {spec!r} is neither a folder nor a Hub id (org/name)",
            "pass an existing folder or a Hub repo id",
        )
    return hub_snapshot(repo_id, revision, LM_ALLOW_PATTERNS)


def load_causal_lm(
    spec: str, device: str | None = None, dtype: Any = None, trust_remote_code: bool = False
):
    """(model, tokenizer) for a Hub id or local folder; safetensors weights only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return _load_pretrained(
        spec, AutoModelForCausalLM, AutoTokenizer, device, dtype, trust_remote_code,
        "check that it is a causal LM",
    )  # fmt: skip


def _load_pretrained(spec, model_class, processor_class, device, dtype, trust_remote_code, hint):
    """(model, tokenizer or processor) through the Auto classes given, in eval mode, with
    left padding (decoder-only batched generation pads on the left)."""
    folder = resolve_lm_folder(spec)
    if not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"{spec} has no safetensors weights",
            "grape loads safetensors only; convert the model with save_pretrained",
        )
    device = pick_device(device)
    try:
        processor = processor_class.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = model_class.from_pretrained(
            folder, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=trust_remote_code
        ).to(device)
    except Exception as e:
        msg = f"could not load rewriter {spec}: {type(e).__name__}: {e}".splitlines()[0]
        if "trust_remote_code" in str(e):
            hint = "this model needs custom code: add --trust-remote-code if you trust it"
        raise ModelError(msg, hint) from e
    # A VLM's processor carries its tokenizer; a causal LM's "processor" is the tokenizer.
    tokenizer = processor.tokenizer if hasattr(processor, "image_processor") else processor
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, processor


# --------------------------------------------------------------------------- vision-language models


def is_vlm_folder(folder: str | Path) -> bool:
    """Whether a model folder holds a vision-language model (one that reads images as well
    as text): its config names an architecture transformers loads with
    `AutoModelForImageTextToText`, or has a vision tower. Reads one JSON file."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if "vision_config" in config:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_vlm(
    spec: str, device: str | None = None, dtype: Any = None, trust_remote_code: bool = False
):
    """(model, processor) of a vision-language model, by Hub id or folder; safetensors
    weights only. The processor carries the tokenizer (`processor.tokenizer`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = _load_pretrained(
        spec, AutoModelForImageTextToText, AutoProcessor, device, dtype, trust_remote_code,
        "check that it is a vision-language model that AutoModelForImageTextToText loads, "
        "with its processor files",
    )  # fmt: skip
    if not hasattr(processor, "image_processor"):
        raise ModelError(
            f"{spec} has no image processor (its processor is {type(processor).__name__})",
            "save the model's processor with processor.save_pretrained",
        )
    return model, processor
