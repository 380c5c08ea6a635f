#!/usr/bin/env bash
# The GPU benchmarks in one device call: gpu_serve (the engine issue's figures), then gpu_fp16, then gpu_decode, each
# under its own time limit and all within a total budget, so one call of about 10 minutes gives every figure it can.
#
# Here, first: `bash benchmarks/gpu_wheels.sh` (the packages the GPU machine's image lacks, as wheels in .whl/).
# Then the device tool's `run`, with carry [".whl"] and timeout_s 600:
#     bash benchmarks/gpu_evidence.sh 540
# Each benchmark's output is printed and kept in $OUT/<name>.log (it comes back with the reply), and a summary of the
# headline lines (`name=value`) is printed last. A benchmark that would start with under 60 s left is not started.
set -uo pipefail
cd "$(dirname "$0")/.."

budget=${1:-540}
out=${OUT:-/tmp/gpu-evidence}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

wheels=${WHEELS:-.whl}  # another folder for a dry run elsewhere (see gpu_wheels.sh)
if compgen -G "$wheels/*.whl" >/dev/null; then
    # --target keeps them apart from the image's packages; PYTHONPATH puts them first.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF' || exit 1
import importlib.metadata as md
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
print(", ".join(f"{name} {md.version(name)}" for name in ("transformers", "huggingface_hub", "pydantic", "xgrammar")))
import internlm_app.backends.engine  # noqa: F401,E402  (every import the benchmarks need resolves)
EOF

run() {  # run NAME LIMIT_SECONDS [ARGS...]
    local name=$1 limit=$2 left
    shift 2
    left=$((budget - SECONDS))
    if ((left < 60)); then
        echo "== $name: not started, ${left} s of the budget left" | tee "$out/$name.log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s)"
    local began=$SECONDS
    timeout -k 10 "$limit" python3 "benchmarks/$name.py" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began)) s"
}

run gpu_serve 330
run gpu_fp16 90
run gpu_decode 240

echo "== headlines"
grep -h -E '^[a-z0-9_]+=' "$out"/*.log
