#!/usr/bin/env bash
# grape on a GPU machine, in one call of a few minutes: CUDA indexing throughput with
# ViT-B-32 (random weights) in fp16, model-only fp16/fp32, faiss-gpu search time if
# faiss-gpu is installed, and a few bf16 GRPO steps through `grape train` if it exists.
# Every figure is printed as a "FIGURE name: value" line, repeated together at the end.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, repo root
#   GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh    # CPU dry run, tiny sizes
#   bash benchmarks/gpu_check.sh --fetch-wheels           # here, before a machine with no
#                                                         # network: fills .whl/ to carry
# Python: $PYTHON, else ./.venv/bin/python if it imports torch, else python3. Missing
# packages come from .whl/*.whl when present (offline machines), else from pip's index.
# Sizes: GPU_CHECK_IMAGES (8000), GPU_CHECK_BATCH (256), GPU_CHECK_SEARCH_N (100000),
# GPU_CHECK_STEPS (5, text and composed), GPU_CHECK_MODEL (ViT-B-32:random),
# GPU_CHECK_WORK (/tmp/grape-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# What grape needs beyond torch/torchvision, as import name=pip requirement.
NEEDED="open_clip=open_clip_torch lancedb=lancedb typer=typer rich=rich safetensors=safetensors"
NEEDED="$NEEDED huggingface_hub=huggingface_hub PIL=pillow pyarrow=pyarrow"
OPTIONAL="faiss=faiss-gpu-cu12 trl=trl"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Wheels for the lent machines' python3 (3.12, x86-64), without their dependencies
    # that the machine's image already holds (torch, numpy, pyarrow, transformers, ...).
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    mkdir -p .whl
    # faiss-gpu-cu12 is not fetched: it needs CUDA 12's cuBLAS and runtime wheels (hundreds
    # of MiB, over the 64 MiB a call carries; the lent image has CUDA 13). Section 2 then
    # gives faiss CPU and torch-on-GPU figures, and says faiss-gpu is missing.
    for req in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 lancedb==0.40.0 \
        lance-namespace==0.13.0 lance-namespace-urllib3-client==0.13.0 deprecation==2.1.0 \
        overrides==7.7.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19 ${GPU_CHECK_EXTRA_WHEELS:-}; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$req" ||
            echo "could not fetch $req (that part of the check will say it is missing)"
    done
    # lancedb's wheel is 75 MB (its one native library is 185 MB unpacked): over what a call
    # carries. xz packs the installed files to about 47 MB, unpacked on the machine below.
    for big in .whl/lancedb-*.whl; do
        [[ -e "$big" ]] || continue
        rm -rf .whl/unpacked && mkdir -p .whl/unpacked
        python3 -m pip install -q --no-deps --no-compile --target .whl/unpacked "$big" &&
            tar -C .whl/unpacked -cf - . | xz -T2 -6 >"${big%.whl}.site.tar.xz" && rm "$big"
        rm -rf .whl/unpacked
    done
    du -sh .whl
    echo "carry .whl (64 MiB at most travel)"
    exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
"$PY" -c 'import torch, torchvision' || {
    echo "torch and torchvision must be installed first (pip install torch torchvision)" >&2
    exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo "nvidia-smi: not available"

missing() { # the pip names of the modules in "$@" (module=pip-name) that cannot be found
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
pairs = [a.split("=", 1) for a in sys.argv[1:]]
print("".join(" " + pip for mod, pip in pairs if importlib.util.find_spec(mod) is None))
EOF
}

# shellcheck disable=SC2086  # word splitting of the lists is intended
if [[ -n "$(missing $NEEDED $OPTIONAL)" ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing carried wheels from .whl/ into /tmp/grape-site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/grape-site .whl/*.whl || echo "some carried wheels did not install"
        mkdir -p /tmp/grape-site
        for packed in .whl/*.site.tar.xz; do
            [[ -e "$packed" ]] && xz -T0 -dc "$packed" | tar -C /tmp/grape-site -xf -
        done
        export PYTHONPATH="/tmp/grape-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        need="$(missing $NEEDED $OPTIONAL)"
        echo "installing from pip's index:$need"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --timeout 15 --retries 1 $need ||
            echo "pip could not install them (no network?): see --fetch-wheels"
    fi
fi
still="$(missing $NEEDED)"
if [[ -n "$still" ]]; then
    echo "cannot run: missing$still (carry wheels: bash benchmarks/gpu_check.sh --fetch-wheels)" >&2
    exit 1
fi
echo "optional, missing:$(missing $OPTIONAL)"

# The checkout itself, without installing it (its pins need not match the machine's torch).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to torch: set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run" >&2
    exit 1
fi
exec "$PY" benchmarks/gpu_check.py
