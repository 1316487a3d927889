"""The model seam: spec parsing, loading local open_clip folders, failing fast offline."""

from __future__ import annotations

import time

import pytest

from grape_cli.errors import ModelError
from grape_cli.models import canonical_clip_spec, load_clip, parse_clip_spec, pick_device


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline, with a Hub cache that holds nothing: every Hub model is a miss."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip, too
    return cache


def test_spec_kinds(tiny_clip, monkeypatch):
    assert parse_clip_spec("ViT-B-32:laion2b_s34b_b79k") == (
        "builtin",
        "ViT-B-32",
        "laion2b_s34b_b79k",
    )
    assert parse_clip_spec("ViT-B-32") == ("builtin", "ViT-B-32", None)
    assert parse_clip_spec("hf-hub:org/repo") == ("hf-hub", "org/repo", None)
    assert parse_clip_spec(str(tiny_clip)) == ("local", str(tiny_clip), None)
    assert parse_clip_spec(f"local-dir:{tiny_clip}") == ("local", str(tiny_clip), None)
    monkeypatch.chdir(tiny_clip.parent)
    assert parse_clip_spec(f"./{tiny_clip.name}") == ("local", str(tiny_clip), None)


def test_canonical_spec_is_what_an_index_records(tiny_clip):
    assert canonical_clip_spec("ViT-B-32") == "ViT-B-32:random"
    assert canonical_clip_spec("ViT-B-32:random") == "ViT-B-32:random"
    assert canonical_clip_spec("hf-hub:org/repo") == "hf-hub:org/repo"
    # Every way of naming one folder records the same absolute path.
    assert canonical_clip_spec(f"local-dir:{tiny_clip}") == str(tiny_clip)
    assert canonical_clip_spec(str(tiny_clip) + "/") == str(tiny_clip)


def test_load_local_folder(tiny_clip):
    import torch

    clip = load_clip(str(tiny_clip), device="cpu")
    assert clip.spec == str(tiny_clip)
    assert (clip.dim, clip.image_size, clip.device, clip.dtype) == (32, 32, "cpu", torch.float32)
    pixels = torch.randn(3, 3, 32, 32)
    v = clip.encode_images(pixels)
    assert v.shape == (3, 32) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    t = clip.encode_texts(["a red circle", "a blue square"])
    assert t.shape == (2, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert clip.encode_texts([]).shape == (0, 32)


def test_local_dir_prefix_loads_the_same_weights(tiny_clip):
    import torch

    a = load_clip(str(tiny_clip), device="cpu")
    b = load_clip(f"local-dir:{tiny_clip}", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(x), b.encode_images(x))
    assert a.spec == b.spec


def test_two_seeds_are_two_models(tiny_clip, tiny_clip_b):
    import torch

    x = torch.randn(2, 3, 32, 32)
    a = load_clip(str(tiny_clip), device="cpu").encode_images(x)
    b = load_clip(str(tiny_clip_b), device="cpu").encode_images(x)
    assert not torch.allclose(a, b)


def test_offline_pretrained_miss_fails_fast_naming_model_and_fix(empty_hub_cache):
    import open_clip  # noqa: F401  (imports are not what the 1 s budget is about)

    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_clip("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "ViT-B-32:laion2b_s34b_b79k" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "connect once to download it" in msg
    assert e.value.exit_code == 3


def test_offline_hf_hub_miss_fails_fast(empty_hub_cache):
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="hf-hub:someone/no-such-clip"):
        load_clip("hf-hub:someone/no-such-clip", device="cpu")
    assert time.perf_counter() - t0 < 1.0


def test_offline_miss_through_the_cli(empty_hub_cache, cli, photos, tmp_path):
    r = cli("index", photos, "--index", tmp_path / "idx", "--model", "ViT-B-32:laion2b_s34b_b79k")
    assert r.exit_code == 3
    assert "error:" in r.stderr and "ViT-B-32:laion2b_s34b_b79k" in r.stderr
    assert "Traceback" not in r.output + r.stderr
    assert not (tmp_path / "idx").exists()  # nothing half-created


@pytest.mark.parametrize(
    "spec, match",
    [
        ("NoSuchArch-99:whatever", "unknown open_clip architecture"),
        ("ViT-B-32:no_such_tag", "no pretrained tag 'no_such_tag'"),
        ("./does/not/exist", "is not an open_clip model folder"),
    ],
)
def test_bad_specs_are_model_errors(spec, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=match):
        load_clip(spec, device="cpu")


def test_pick_device(monkeypatch):
    import torch

    assert pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device(None) == pick_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == "cuda"
