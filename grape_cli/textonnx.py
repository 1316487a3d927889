"""The CLIP text tower on ONNX Runtime: exported once at index time, loaded in
milliseconds by a cold `grape search`.

Export (`export_text_tower`, needs torch and onnx) traces `encode_text` plus the L2
normalisation into an ONNX graph, lets ONNX Runtime apply its graph optimisations once
and saves the result with the weights in a separate file, each tensor at a 64 KiB
boundary. Loading (`OnnxTextEncoder`, needs only numpy and onnxruntime) then skips
graph optimisation and weight pre-packing and maps the weights instead of parsing a
quarter-gigabyte protobuf: for ViT-B-32 the session opens in about 30 ms instead of
0.6-0.7 s (measured on 2 cores, benchmarks/search_latency.py).

An export is kept only if ONNX Runtime's embeddings match torch's (within 1e-4) on
probe texts; a model whose text tower cannot be traced raises `ExportError`.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from grape_cli.errors import ModelError

if TYPE_CHECKING:
    import numpy as np

ALIGN = 64 * 1024  # ORT maps external weights when their offset is page-aligned
INPUT, OUTPUT = "tokens", "text_embeds"
TOLERANCE = 1e-4  # the largest |difference| allowed between ORT's and torch's embeddings
TMP_PREFIX = "export-tmp-"  # what a killed export leaves behind (see remove_leftovers)


class ExportError(ModelError):
    """The text tower could not be exported, or its export does not match torch."""


# --------------------------------------------------------------------------- loading


class OnnxTextEncoder:
    """L2-normalised float32 text embeddings from token ids, on ONNX Runtime (CPU)."""

    def __init__(self, model_path: str | Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Both already done at export time (or not worth it for one query): skipping them
        # is what makes opening the session fast.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.log_severity_level = 4  # silent: an error is raised, and search falls back
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped Fail/InvalidGraph
            raise ExportError(f"cannot load {model_path}: {e}".splitlines()[0]) from e

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """tokens: int64 (n, context_length) -> float32 (n, dim), one text at a time (the
        export has a fixed batch of one)."""
        import numpy as np

        out = [self.session.run([OUTPUT], {INPUT: row[None]})[0] for row in tokens]
        return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- export


def export_text_tower(clip, folder: str | Path, stem: str, token_probes: np.ndarray) -> Path:
    """Export `clip`'s (a `grape_cli.models.ClipModel`) text tower to
    `folder/stem.onnx` + `folder/stem.weights`; returns the .onnx path.

    `token_probes` (int64, n x context_length) are encoded by torch and by the export,
    which must agree within `TOLERANCE`.
    """
    import torch

    folder = Path(folder)
    text_tower = _text_tower(_cpu_float32(clip.model))
    with torch.inference_mode():
        expected = text_tower(torch.from_numpy(token_probes)).numpy()
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=folder) as tmp:
        traced = Path(tmp) / "traced.onnx"
        _trace(text_tower, token_probes[:1], traced)
        optimized = Path(tmp) / "optimized.onnx"
        _optimize(traced, optimized)
        model_path = _save_aligned(optimized, folder / f"{stem}.onnx", f"{stem}.weights")
    try:
        got = OnnxTextEncoder(model_path).encode(token_probes)
        diff = float(abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise ExportError(f"the exported text tower differs from torch's by {diff:.2g}")
    except Exception:
        remove_export(model_path)
        raise
    return model_path


def remove_export(model_path: Path) -> None:
    for path in (model_path, model_path.with_suffix(".weights")):
        path.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> None:
    """The working folders of exports killed halfway (a copy of the weights each)."""
    import shutil

    for path in Path(folder).glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def _text_tower(model):
    """encode_text + L2 normalisation, as `ClipModel.encode_texts` computes it, as a
    module of its own (torch is imported only when exporting)."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            feats = self.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(feats, dim=-1)

    return TextTower(model).eval()


def _cpu_float32(model):
    """The model itself when already on the CPU in float32, else a CPU float32 copy."""
    import copy

    import torch

    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


def _trace(module, example: np.ndarray, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (dynamo), which
        # took twice as long here and needs onnxscript; it warns on every export.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (torch.from_numpy(example),),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=17,  # fixed shape (1, context_length): tracing bakes it in
                dynamo=False,
            )
        except Exception as e:
            raise ExportError(
                f"cannot export the text tower to ONNX: {type(e).__name__}: {e}".splitlines()[0]
            ) from e


def _optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's portable graph optimisations (fusions, constant folding), saved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    # Weights go to a side file: a text tower over 2 GB cannot be one protobuf.
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.name + ".data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # an operator ONNX Runtime cannot run on the CPU
        raise ExportError(f"ONNX Runtime cannot run the export: {e}".splitlines()[0]) from e


def _save_aligned(src: Path, dst: Path, weights_name: str) -> Path:
    """Re-save `src` with every large tensor in `weights_name` at an ALIGN boundary."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(src))  # loads external data too
    weights = dst.parent / weights_name
    with open(weights, "wb") as out:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue
            out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            out.write(tensor.raw_data)
            set_external_data(tensor, weights_name, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dst))
    return dst
